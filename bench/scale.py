"""Memory per GPU of SpaRA and PEFT LoRA on Llama-3-8B / 70B / Llama-3.1-405B under FSDP2 at 8 to 512 ranks,
simulated on a CPU (fake process group, FakeTensorMode, FSDPMemTracker), with a ZeRO-3 estimate and SpaRA's
time to first step. See docs/scale.md for what the simulation is and is not.

    HF_HUB_OFFLINE=1 python -m bench.scale --json scale.json            # everything: 75 minutes on 2 cores
    HF_HUB_OFFLINE=1 python -m bench.scale --models 70b --worlds 64 --ranks 8   # about 4 minutes
    HF_HUB_OFFLINE=1 python -m bench.scale --models 70b --ranks 8 --methods spra --worlds 2,8,64 \
        --quantize-base none,nf4 --no-startup --jobs 1                           # SpaRA over bf16 and NF4 bases

Each (model, method, r, base) runs in its own process (``bench.scale_sim``), two at a time, and that process covers
every world size, rank 0 and the last rank, with and without activation checkpointing: its masks are built once.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench import scale_report as report
from bench.scale_sim import LLAMA3, METHODS
from spra_dist.core.quantized import QUANTIZE_BASE

REPO = Path(__file__).resolve().parent.parent
WORLDS = {"8b": [8, 64], "70b": [8, 64], "405b": [8, 64, 512]}
STARTUP_MODELS = ("70b", "405b")


def mask_host_bytes(model: str, lora_rank: int) -> int:
    """SpaRA's masks of ``model`` in host memory (int32 indices, 4 B each; row pointers are small): what a
    worker holds for the whole run."""
    hidden, inter, layers, heads = LLAMA3[model]
    kv = 8 * hidden // heads
    per_layer = 2 * (hidden + hidden) + 2 * (hidden + kv) + 3 * (hidden + inter)
    return 4 * lora_rank * per_layer * layers


def worker(model: str, method: str, lora_rank: int, base: str = "none", *, worlds: list[int],
           args: argparse.Namespace, startup: bool = False) -> list[str]:
    cmd = [sys.executable, "-m", "bench.scale_sim", "--model", model, "--method", method,
           "--lora-rank", str(lora_rank), "--worlds", ",".join(map(str, worlds)), "--seq", str(args.seq),
           "--batch", str(args.batch), "--mask-residency", args.mask_residency, "--quantize-base", base]
    return cmd + ["--startup"] if startup else cmd


def _result(proc: subprocess.Popen, cmd: list[str]) -> object:
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd[1:])}` exited with {proc.returncode}:\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1])


def run_all(cells: list[tuple[str, str, int, str]], *, args: argparse.Namespace, log=print) -> list[dict]:
    """Run each (model, method, r, base) worker, at most ``args.jobs`` at once, and never two whose masks together pass
    ``args.host_budget_gb`` (405B at r = 64 holds 10 GB of masks, so it runs alone)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    pending = sorted(cells, key=lambda c: (-LLAMA3[c[0]][2], c[1], c[2], c[3]))  # the longest first
    running: list[tuple[subprocess.Popen, list[str], int, tuple, float]] = []
    rows = []
    while pending or running:
        held = sum(r[2] for r in running)
        for cell in list(pending):
            need = mask_host_bytes(cell[0], cell[2]) if cell[1] == "spra" else 0
            if len(running) >= args.jobs or (running and held + need > args.host_budget_gb * 2**30):
                continue
            cmd = worker(*cell, worlds=args.worlds or WORLDS[cell[0]], args=args)
            log(f"  start {' '.join(map(str, cell))}")
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            running.append((proc, cmd, need, cell, time.perf_counter()))
            pending.remove(cell)
            held += need
        time.sleep(1)
        for item in [r for r in running if r[0].poll() is not None]:
            running.remove(item)
            rows += _result(item[0], item[1])
            log(f"  done  {' '.join(map(str, item[3]))} in {time.perf_counter() - item[4]:.0f} s")
    order = {m: i for i, m in enumerate(LLAMA3)}
    return sorted(rows, key=lambda r: (order[r["model"]], r["lora_rank"], r["world"], r["rank"], r["method"],
                                       r["quantize_base"] != "none"))


def startup_times(models: list[str], ranks: list[int], *, args: argparse.Namespace, log=print) -> list[dict]:
    """``apply_spra`` on the meta model, one process at a time (nothing else of ours running: it uses every core)."""
    out = []
    for model in [m for m in models if m in STARTUP_MODELS]:
        for r in ranks:
            cmd = worker(model, "spra", r, worlds=[8], args=args, startup=True)
            proc = subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            out.append(_result(proc, cmd))
            log(f"  apply_spra {model} r={r}: {out[-1]['apply_s']:.1f} s")
    return out


def print_report(res: dict) -> None:
    rows = report.dense_base(res["rows"])
    print("\n## Memory per GPU under FSDP2 (simulated)")
    print("\n".join(report.memory_tables(rows)))
    if line := report.headline(rows):
        print(line + "\n")
    if any(r["quantize_base"] == "nf4" for r in res["rows"]):
        print("## SpaRA over a 4-bit NF4 base (simulated)")
        print("\n".join(report.nf4_table(res["rows"])))
    if any(r["method"] == "spra" for r in rows):
        print("## SpaRA's mask per GPU\n")
        print("\n".join(report.mask_table(rows)))
    print("## ZeRO-3, closed form\n")
    print("\n".join(report.zero3_table(res["zero3"])))
    if res["startup"]:
        print(f"## Time to first step: apply_spra ({os.cpu_count()} CPUs here)\n")
        print("\n".join(report.startup_table(res["startup"])))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(LLAMA3), help=f"comma-separated, of {', '.join(LLAMA3)}")
    ap.add_argument("--ranks", default="8,64", help="LoRA ranks r (SpaRA's budget k = r·(n_in + n_out) per matrix)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--worlds", help="comma-separated world sizes (default: 8,64, and 512 for 405b)")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=1, help="micro batch per GPU")
    ap.add_argument("--mask-residency", choices=("host", "device"), default="host", help="SpaRA's mask_residency")
    ap.add_argument("--quantize-base", default="none",
                    help=f"comma-separated, of {', '.join(QUANTIZE_BASE)}: the frozen base as loaded (nf4: SpaRA only)")
    ap.add_argument("--jobs", type=int, default=2, help="workers at once")
    ap.add_argument("--host-budget-gb", type=float, default=8.0, help="masks in host memory held at once, at most")
    ap.add_argument("--no-startup", action="store_true", help="skip timing apply_spra for 70b and 405b")
    ap.add_argument("--json", type=Path, help="write every figure here")
    args = ap.parse_args()
    models, ranks, methods = args.models.split(","), [int(r) for r in args.ranks.split(",")], args.methods.split(",")
    bases = args.quantize_base.split(",")
    for name, given, known in (("model", models, LLAMA3), ("method", methods, METHODS), ("base", bases, QUANTIZE_BASE)):
        if bad := [g for g in given if g not in known]:
            ap.error(f"{name} {bad[0]!r}: use one of {', '.join(known)}")
    args.worlds = [int(w) for w in args.worlds.split(",")] if args.worlds else None
    start = time.perf_counter()
    startup = [] if args.no_startup or "spra" not in methods else startup_times(models, ranks, args=args)
    if "lora" in methods and any(b != "none" for b in bases):
        print("note: a quantized base is simulated under SpaRA only; LoRA runs over the bf16 base", file=sys.stderr)
    cells = [(m, method, r, b) for m in models for method in methods for r in ranks for b in bases
             if b == "none" or method == "spra"]  # a quantized base is simulated under SpaRA only
    rows = run_all(cells, args=args)
    res = {"settings": {"seq": args.seq, "batch": args.batch, "mask_residency": args.mask_residency,
                        "cpus": os.cpu_count(), "seconds": time.perf_counter() - start},
           "rows": rows, "zero3": report.zero3(report.dense_base(rows)), "startup": startup}
    print_report(res)
    if args.json:
        args.json.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
