"""Step time, peak RSS and tokens/s of each method, each run in a fresh process, methods interleaved A B C A B C.

    HF_HUB_OFFLINE=1 python -m bench.step_time --model smollm2 --layers 6 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

from bench._worker import METHODS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_worker(method: str, model: str, *, layers: int, batch: int, seq: int, steps: int, warmup: int,
               autocast: str | None = None) -> dict:
    cmd = [sys.executable, "-m", "bench._worker", "--method", method, "--model", model, "--layers", str(layers),
           "--batch", str(batch), "--seq", str(seq), "--steps", str(steps), "--warmup", str(warmup),
           *(["--autocast", autocast] if autocast else [])]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=REPO)
    load_before = os.getloadavg()[0]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["load_before"] = load_before  # other work on the machine shows up here, not silently in the times
    return out


def measure(model: str, *, layers: int, batch: int, seq: int, rounds: int, steps: int, warmup: int,
            methods: tuple[str, ...] = METHODS, autocast: str | None = None, log=print) -> dict:
    """Per method: all timed steps pooled over ``rounds`` fresh processes, their median, worst peak RSS."""
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    for r in range(rounds):
        for m in methods:  # interleaved, so drift in machine load hits every method alike
            out = run_worker(m, model, layers=layers, batch=batch, seq=seq, steps=steps, warmup=warmup,
                             autocast=autocast)
            runs[m].append(out)
            tag = f"{model} L{layers}" + (f" {autocast}" if autocast else "")
            log(f"  {tag} round {r + 1}/{rounds} {m:<10} median {out['median_s']:.3f} s  "
                f"peak RSS {out['peak_rss'] / 2**30:.2f} GiB  load {out['load_before']:.1f}")
    rows = {}
    for m, outs in runs.items():
        steps_all = [t for o in outs for t in o["step_s"]]
        med = statistics.median(steps_all)
        rows[m] = {"median_s": med, "round_medians": [o["median_s"] for o in outs],
                   "peak_rss": max(o["peak_rss"] for o in outs), "tokens_s": batch * seq / med,
                   "trainable": outs[0]["trainable"], "load": [o["load_before"] for o in outs]}
    return {"model": model, "layers": layers, "batch": batch, "seq": seq, "rounds": rounds, "steps": steps,
            "warmup": warmup, "autocast": autocast, "methods": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--autocast", choices=("bf16", "fp16"))
    a = ap.parse_args()
    res = measure(a.model, layers=a.layers, batch=a.batch, seq=a.seq, rounds=a.rounds, steps=a.steps,
                  warmup=a.warmup, methods=tuple(a.methods.split(",")), autocast=a.autocast)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
