"""``make gpu-check``: on a machine with a CUDA GPU, within 8 minutes, check and measure the GPU path and write
docs/benchmarks-gpu.md.

    HF_HUB_OFFLINE=1 python -m bench.gpu_check [--out docs/benchmarks-gpu.md] [--batch 8] [--seq 1024]

Three parts, each in a process group of its own with a time limit (killed whole when it runs over; what it
printed by then is kept):
  tests  (200 s)  pytest tests/test_cuda.py tests/test_triton.py: the layer, the Triton SDDMM, a tiny Llama and
                  `spra train` (engine none and fsdp2, against the CPU run) on CUDA
  bench  (200 s)  python -m bench.gpu_bench: the values' gradient alone, then bf16 training steps of SmolLM2-135M
                  shapes (30 layers) with SpaRA (Triton / sampled_addmm), PEFT LoRA, PEFT SHiRA and the floor
  fsdp2   (60 s)  torchrun --nproc_per_node 1 -m bench.fsdp2_smoke: FSDP2 over nccl on the debug tiny Llama
A watchdog ends everything at 8 minutes. Without a CUDA device it prints one line saying so, writes nothing and
exits 0. The exit status is 1 when a part failed or ran out of time (the report is written all the same).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import gpu_report

STARTED = time.monotonic()
ROOT = Path(__file__).resolve().parent.parent
TOTAL_S = 480
REPORT_RESERVE_S = 10
LIMITS = {"tests": 200, "bench": 200, "fsdp2": 60}


@dataclass
class Part:
    name: str
    limit_s: float
    returncode: int | None = None
    timed_out: bool = False
    seconds: float = 0.0
    output: str = ""
    records: list[dict] = field(default_factory=list)
    """The JSON lines the part printed."""

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


_running: subprocess.Popen | None = None


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the part's own group: torchrun's workers go with it
    except ProcessLookupError:
        pass


def run_part(name: str, cmd: list[str], *, limit_s: float, env: dict | None = None) -> Part:
    """Run ``cmd`` in a new process group for at most ``limit_s`` seconds; keep its output and JSON lines."""
    global _running
    part = Part(name, limit_s)
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    _running = proc
    try:
        out, _ = proc.communicate(timeout=max(1.0, limit_s))
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        out, _ = proc.communicate()
        part.timed_out = True
    finally:
        _running = None
    part.returncode, part.seconds, part.output = proc.returncode, time.monotonic() - start, out or ""
    for line in part.output.splitlines():
        if line.startswith("{"):
            try:
                part.records.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return part


class Watchdog(Exception):
    """The whole check reached TOTAL_S."""


def _on_alarm(signum, frame):
    if _running is not None:
        _kill_group(_running)
    raise Watchdog


def child_env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env.pop("TRITON_INTERPRET", None)
    env.pop("SPRA_SDDMM", None)
    return env


def commands(a: argparse.Namespace) -> dict[str, list[str]]:
    py = sys.executable
    return {
        "tests": [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_cuda.py", "tests/test_triton.py"],
        "bench": [py, "-m", "bench.gpu_bench", "--batch", str(a.batch), "--seq", str(a.seq), "--layers",
                  str(a.layers)],
        "fsdp2": [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "-m",
                  "bench.fsdp2_smoke"],
    }


def machine() -> dict:
    import torch

    info = {"gpu": torch.cuda.get_device_name(0), "cuda": torch.version.cuda, "torch": torch.__version__,
            "python": sys.version.split()[0], "when": datetime.datetime.now().isoformat(timespec="seconds")}
    for name in ("triton", "transformers", "peft"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = "not installed"
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks-gpu.md")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=30)
    a = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print(f"gpu-check: skipped: no CUDA device (torch {torch.__version__}: torch.cuda.is_available() is False); "
              f"nothing written")
        return 0
    info, parts = machine(), []
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(TOTAL_S - int(time.monotonic() - STARTED))
    try:
        for name, cmd in commands(a).items():
            left = TOTAL_S - REPORT_RESERVE_S - (time.monotonic() - STARTED)
            print(f"gpu-check: {name} (limit {min(LIMITS[name], left):.0f} s)", flush=True)
            parts.append(run_part(name, cmd, limit_s=min(LIMITS[name], left), env=child_env()))
            print(f"gpu-check: {name} {'ok' if parts[-1].ok else 'FAILED'} in {parts[-1].seconds:.0f} s", flush=True)
    except Watchdog:
        info["watchdog"] = f"stopped at {TOTAL_S} s"
    finally:
        signal.alarm(0)
    a.out.write_text(gpu_report.render(info, parts, batch=a.batch, seq=a.seq, layers=a.layers, limits=LIMITS))
    print(f"gpu-check: wrote {a.out}", flush=True)
    return 0 if len(parts) == len(LIMITS) and all(p.ok for p in parts) and "watchdog" not in info else 1


if __name__ == "__main__":
    sys.exit(main())
