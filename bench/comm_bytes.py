"""Gradient bytes per optimizer step under DDP, 2 CPU ranks: SpaRA vs PEFT LoRA vs full fine-tuning.

    HF_HUB_OFFLINE=1 python bench/comm_bytes.py [--layers 2] [--methods spra lora full]

Each method runs as its own 2-rank ``torchrun`` job (gloo) on a random-init Llama of SmolLM2-135M shapes; the
targets are every attention and MLP linear, with SpaRA at the LoRA r=8 budget (k = 8·(n_in + n_out) per
matrix). ``spra_dist.distributed.comm.CommCounter`` counts the bytes each rank hands to reducing collectives, and
``count_ddp`` routes DDP's buckets through them. Prints a markdown table; the ratio column is bytes /
(trainable parameters × 4): 1.00 means exactly the fp32 gradient of the trainable parameters crosses the
wire, nothing of the frozen model.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("spra", "lora", "full")
LABELS = {"spra": "SpaRA (spra_dist, LoRA r=8 budget)", "lora": "PEFT LoRA r=8", "full": "full fine-tuning"}


def run_method(method: str, *, layers: int, batch: int, seq: int, steps: int) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "bench._comm_worker", "--method", method, "--layers", str(layers), "--batch", str(batch),
           "--seq", str(seq), "--steps", str(steps)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p))
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    if out["world_size"] != 2:
        raise RuntimeError(f"{method}: ran with world size {out['world_size']}, expected 2")
    out["wall_s"] = time.perf_counter() - started
    return out


def table(rows: list[dict]) -> str:
    full = next((r for r in rows if r["method"] == "full"), None)
    lines = ["| method | trainable params | gradient bytes / step | all-reduce calls / step "
             "| bytes / (trainable × 4) | vs full fine-tuning |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        ratio = r["grad_bytes_per_step"] / (r["trainable"] * 4)
        share = f"{100 * r['grad_bytes_per_step'] / full['grad_bytes_per_step']:.2f}%" if full else "—"
        lines.append(f"| {LABELS[r['method']]} | {r['trainable']:,} | {int(r['grad_bytes_per_step']):,} "
                     f"| {r['calls_per_step']:g} | {ratio:.3f} | {share} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2, help="decoder layers of the SmolLM2-135M-shaped model")
    ap.add_argument("--batch", type=int, default=2, help="sequences per rank per step")
    ap.add_argument("--seq", type=int, default=64, help="tokens per sequence")
    ap.add_argument("--steps", type=int, default=2, help="counted steps (after one warm-up step)")
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    a = ap.parse_args()
    rows = []
    for method in a.methods:
        row = run_method(method, layers=a.layers, batch=a.batch, seq=a.seq, steps=a.steps)
        print(f"  {method:<5} {int(row['grad_bytes_per_step']):>13,} bytes/step  ({row['wall_s']:.0f} s)",
              file=sys.stderr)
        rows.append(row)
    print(f"DDP, 2 ranks (gloo, CPU), SmolLM2-135M shapes with {a.layers} layers (random init), "
          f"batch {a.batch}×{a.seq} tokens per rank, median of {a.steps} steps after one warm-up step.\n")
    print(table(rows))


if __name__ == "__main__":
    main()
