"""Repeated 2-rank jobs through every launcher: count non-zero exits and aborts, or time a kill -9.

    python tests/stress.py --runs 20                   # make stress: every engine x launcher, 20 times each
    python tests/stress.py --runs 3 --engines zero2     # a smaller sweep
    python tests/stress.py --kill --runs 1              # kill -9 rank 1 mid-run: seconds until the job ends

An abort is a rank that died of a signal at exit ("terminate called ...", SIGABRT), which a launcher reports as
a failed job although training finished. Exit status 1 when any run failed (or a killed job outlived 60 s).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = "configs/train/debug_tiny_llama.yaml"
ENGINES = ("ddp", "fsdp2", "zero1", "zero2", "zero3")
LAUNCHERS = ("torchrun", "accelerate", "deepspeed")
ABORT_MARKS = ("terminate called", "SIGABRT", "Signal 6", "exitcode  : -6", "return code = -6")


def applies(engine: str, launcher: str) -> bool:
    """deepspeed.sh runs DeepSpeed presets only."""
    return launcher != "deepspeed" or engine.startswith("zero")


def env() -> dict[str, str]:
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return dict(os.environ, PATH=path, HF_HUB_OFFLINE="1", NPROC="2", PYTHONUNBUFFERED="1")


def command(engine: str, launcher: str, out: Path, *overrides: str) -> list[str]:
    return [f"launch/{launcher}.sh", engine, CONFIG, f"output_dir={out}", *overrides]


def run_once(engine: str, launcher: str, out: Path, *overrides: str, timeout: int = 600) -> dict:
    """One job to the end: exit status, whether a rank aborted, wall seconds, and whether the outputs exist."""
    started = time.monotonic()
    proc = subprocess.run(command(engine, launcher, out, "max_steps=3", "eval_every=0", *overrides), cwd=ROOT,
                          env=env(), capture_output=True, text=True, timeout=timeout)
    log = proc.stdout + proc.stderr
    return {"engine": engine, "launcher": launcher, "rc": proc.returncode,
            "abort": any(mark in log for mark in ABORT_MARKS), "seconds": round(time.monotonic() - started, 1),
            "outputs": (out / "summary.json").is_file() and (out / "adapter" / "adapter.safetensors").is_file(),
            "tail": log[-3000:] if proc.returncode else ""}


def rank_pids(root_pid: int) -> dict[int, int]:
    """{rank: pid} of the training processes under a launcher (read from their environment)."""
    import psutil

    ranks = {}
    for child in psutil.Process(root_pid).children(recursive=True):
        try:
            if "spra_dist" in " ".join(child.cmdline()) and "RANK" in child.environ():
                ranks[int(child.environ()["RANK"])] = child.pid
        except (psutil.Error, ValueError):
            continue
    return ranks


def wait_for_step(metrics: Path, step: int, proc: subprocess.Popen, *, timeout: float = 300) -> None:
    """Until rank 0 has logged optimizer step ``step`` (training is under way on every rank)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the job ended (status {proc.returncode}) before step {step}")
        if metrics.is_file():
            steps = [json.loads(line).get("step", 0) for line in metrics.read_text().splitlines() if line.strip()]
            if steps and max(steps) >= step:
                return
        time.sleep(0.1)
    raise TimeoutError(f"step {step} not reached in {timeout} s")


def start(engine: str, launcher: str, out: Path, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen(command(engine, launcher, out, "log_every=1", "eval_every=0", *overrides), cwd=ROOT,
                            env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def signal_rank(engine: str, launcher: str, out: Path, *, sig: int, rank: int = 1, at_step: int = 2,
                overrides: tuple[str, ...] = ("max_steps=2000",), limit: float = 120) -> dict:
    """Start a long job, send ``sig`` to one rank once training runs, and time until the launcher exits."""
    proc = start(engine, launcher, out, *overrides)
    try:
        wait_for_step(out / "metrics.jsonl", at_step, proc)
        pid = rank_pids(proc.pid)[rank]
        sent = time.monotonic()
        os.kill(pid, sig)
        log, _ = proc.communicate(timeout=limit)
        return {"engine": engine, "launcher": launcher, "rc": proc.returncode, "pid": pid,
                "seconds": round(time.monotonic() - sent, 1), "log": log}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=int(os.environ.get("N", "20")), help="runs per engine x launcher")
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    parser.add_argument("--launchers", nargs="+", default=list(LAUNCHERS), choices=LAUNCHERS)
    parser.add_argument("--kill", action="store_true", help="kill -9 rank 1 mid-run instead (fsdp2, zero2, zero3)")
    args = parser.parse_args(argv)
    engines = [e for e in args.engines if not args.kill or e in ("fsdp2", "zero2", "zero3")]
    failed = 0
    with tempfile.TemporaryDirectory(prefix="spra-stress-") as tmp:
        for engine in engines:
            for launcher in [name for name in args.launchers if applies(engine, name)]:
                counts = {"runs": 0, "nonzero": 0, "aborts": 0, "seconds": []}
                for i in range(args.runs):
                    out = Path(tmp) / f"{engine}-{launcher}-{i}"
                    if args.kill:
                        r = signal_rank(engine, launcher, out, sig=signal.SIGKILL)
                        bad = r["rc"] == 0 or r["seconds"] > 60 or "rank 1" not in r["log"].replace("rank: 1", "rank 1")
                    else:
                        r = run_once(engine, launcher, out)
                        bad = r["rc"] != 0 or r["abort"] or not r["outputs"]
                        counts["aborts"] += r["abort"]
                    counts["runs"] += 1
                    counts["nonzero"] += r["rc"] != 0
                    counts["seconds"].append(r["seconds"])
                    failed += bad
                    if bad:
                        print(r.get("tail") or r.get("log", "")[-3000:], file=sys.stderr)
                secs = counts.pop("seconds")
                print(json.dumps({"engine": engine, "launcher": launcher, "mode": "kill" if args.kill else "exit",
                                  **counts, "seconds_min": min(secs), "seconds_max": max(secs)}), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
