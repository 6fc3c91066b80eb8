"""One method under DDP on this rank; rank 0 prints one JSON line with the gradient bytes of each step.

    HF_HUB_OFFLINE=1 torchrun --standalone --nproc_per_node 2 -m bench._comm_worker --method spra --layers 2

Run by ``bench/comm_bytes.py``. The model, targets and methods are those of the step-time benchmark
(``bench._worker``), so both benchmarks compare the same three set-ups.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from torch.nn.parallel import DistributedDataParallel

from bench._worker import TARGETS, apply_method, build_model, loss_fn
from spra_dist.distributed.comm import GRADIENT_OPS, CommCounter, count_ddp
from spra_dist.distributed.group import init_distributed, shutdown

METHODS = ("spra", "lora", "full")
MODEL = "smollm2"


def measure(method: str, *, layers: int, batch: int, seq: int, steps: int) -> dict:
    """One unmeasured step (DDP rebuilds its buckets after the first), then ``steps`` counted steps."""
    rank, size = init_distributed(backend="gloo")
    counter = CommCounter.install()  # before DDP exists, so its hook calls the counted all_reduce
    model, vocab = build_model(MODEL, layers)
    model = apply_method(model, method, TARGETS[MODEL])  # spra agrees on the seed across ranks here
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    ddp = DistributedDataParallel(model)
    count_ddp(ddp)
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(rank))
    per_step: list[dict[str, int]] = []
    for i in range(1 + steps):
        counter.reset()
        loss_fn(ddp, MODEL, ids).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 1:
            per_step.append({"bytes": counter.gradient_bytes(),
                             "calls": sum(n for op, n in counter.calls.items() if op in GRADIENT_OPS)})
    shutdown()
    trainable = sum(p.numel() for p in params)
    return {"method": method, "world_size": size, "layers": layers, "batch": batch, "seq": seq,
            "trainable": trainable, "trainable_bytes": sum(p.numel() * p.element_size() for p in params),
            "grad_bytes_per_step": statistics.median(s["bytes"] for s in per_step),
            "calls_per_step": statistics.median(s["calls"] for s in per_step), "steps": per_step, "rank": rank}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", choices=METHODS, required=True)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=2, help="sequences per rank")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--steps", type=int, default=2, help="counted steps after one warm-up step")
    a = ap.parse_args()
    out = measure(a.method, layers=a.layers, batch=a.batch, seq=a.seq, steps=a.steps)
    if out["rank"] == 0:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
