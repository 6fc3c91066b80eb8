"""Time and peak memory to rebuild every mask of Llama-2-7B / Llama-3-8B / 70B / 405B shapes, no weight allocated.

    python -m bench.masks                 # all shapes and budgets, each in a fresh process pinned to one core
    python -m bench.masks --one llama3-8b r8
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

from spra_dist.core.layer import mask_buffers
from spra_dist.core.masks import budget

# (hidden, intermediate, layers, key/value width) of each model's linears.
SHAPES = {"llama2-7b": (4096, 11008, 32, 4096), "llama3-8b": (4096, 14336, 32, 1024),
          "llama3-70b": (8192, 28672, 80, 1024), "llama3.1-405b": (16384, 53248, 126, 1024)}
BUDGETS = {"r8": {"lora_rank": 8, "density": None}, "d1%": {"lora_rank": None, "density": 0.01}}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def linears(model: str) -> list[tuple[str, tuple[int, int]]]:
    """(weight key, (out, in)) of every attention and MLP linear, as nn.Linear stores them."""
    h, inter, n_layers, kv = SHAPES[model]
    per_layer = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
                 "self_attn.o_proj": (h, h), "mlp.gate_proj": (inter, h), "mlp.up_proj": (inter, h),
                 "mlp.down_proj": (h, inter)}
    return [(f"model.layers.{i}.{n}.weight", s) for i in range(n_layers) for n, s in per_layer.items()]


def rebuild(model: str, budget_name: str) -> dict:
    """Rebuild and keep every mask as a layer holds it (int32 indices and CSR row pointers), on one core."""
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    torch.set_num_threads(1)  # two threads on one core would spin against each other in every parallel op
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    kept = [mask_buffers(key, s, ((0, budget(s, **BUDGETS[budget_name])),)) for key, s in linears(model)]
    seconds = time.perf_counter() - start
    total_k = sum(idx.numel() for idx, _ in kept)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"model": model, "budget": budget_name, "matrices": len(kept), "total_k": total_k, "seconds": seconds,
            "kept_bytes": sum(t.nbytes for pair in kept for t in pair), "peak_rss_growth": peak - rss0}


def measure(log=print) -> list[dict]:
    rows = []
    for model in SHAPES:
        for b in BUDGETS:
            cmd = [sys.executable, "-m", "bench.masks", "--one", model, b]
            proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), capture_output=True,
                                  text=True, check=True)
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            log(f"  masks {model} {b}: {r['matrices']} matrices, k={r['total_k']:,}, {r['seconds']:.2f} s, "
                f"peak RSS +{r['peak_rss_growth'] / 2**20:.0f} MiB (indices kept: {r['kept_bytes'] / 2**20:.0f} MiB)")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--one", nargs=2, metavar=("MODEL", "BUDGET"))
    a = ap.parse_args()
    if a.one:
        print(json.dumps(rebuild(*a.one)))
    else:
        print(json.dumps(measure(), indent=1))


if __name__ == "__main__":
    main()
