"""Where a layer's mask lives: the cost per step, bytes moved and peak of each design, and the start-up mask work.

    HF_HUB_OFFLINE=1 python -m bench.mask_design                  # all three parts, about 2 minutes
    HF_HUB_OFFLINE=1 python -m bench.mask_design --part step      # step cost on SmolLM2-135M shapes only
    HF_HUB_OFFLINE=1 python -m bench.mask_design --part startup --models llama3-70b

The designs (DESIGN.md, "Memory per rank"): ``device`` keeps every mask on the weight's device (the whole model's
indices on every GPU); ``host`` keeps them in host memory and each op copies the one matrix's mask it needs
(counted here by the bytes the ops ask to have on their device; on a CPU the copy is a no-op); ``rebuild`` would
recompute each layer's mask from the seed at each use, forward and backward, so its cost per step is two
rebuilds of every mask (three with activation checkpointing), timed here as ``build_masks`` of the whole model.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from bench._worker import TARGETS, build_model, loss_fn
from bench.masks import linears
from spra_dist.core.config import SpraConfig
from spra_dist.core.kernels import ops
from spra_dist.core.layer import build_masks
from spra_dist.core.masks import budget, fingerprint
from spra_dist.core.model import apply_spra, spra_modules


class OpMaskBytes:
    """Counts the bytes of host-kept mask the ops copy to their device: what host residency moves to a GPU.

    On a CPU the host copy is the device copy, so the count hands out a clone in its place, as a GPU copy would:
    an op that passes its copy on to another (the backward's two gradients share one) is then not counted twice.
    """

    def __init__(self, host: list[torch.Tensor]):
        self.host = {id(t) for t in host}
        self.bytes, self.largest, self._orig = 0, 0, ops.to_device

    def __enter__(self) -> OpMaskBytes:
        def counting(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
            if id(mask) not in self.host:
                return self._orig(mask, like)
            self.bytes += mask.nbytes
            self.largest = max(self.largest, mask.nbytes)
            return mask.clone()

        ops.to_device = counting
        return self

    def __exit__(self, *exc) -> None:
        ops.to_device = self._orig


def _step(model, ids, opt) -> float:
    start = time.perf_counter()
    loss_fn(model, "smollm2", ids).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def step_cost(*, layers: int, batch: int, seq: int, rounds: int) -> dict:
    """Step time under host and device residency (interleaved), the bytes host residency moves per step, the
    peak each adds, and the rebuild design's cost per step, all on one model."""
    model, vocab = build_model("smollm2", layers)
    apply_spra(model, SpraConfig(target_modules=TARGETS["smollm2"], lora_rank=8, seed=0))
    layers_ = [m for _, m in spra_modules(model)]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1))
    _step(model, ids, opt)  # warm-up
    times: dict[str, list[float]] = {"host": [], "device": []}
    for _ in range(rounds):
        for residency in times:  # interleaved, so drift in machine load hits both alike
            for m in layers_:
                m.mask_residency = residency
            times[residency].append(_step(model, ids, opt))
    for m in layers_:
        m.mask_residency = "host"
    with OpMaskBytes([t for m in layers_ for t in (m.spra_indices, m.spra_crow)]) as moved:
        _step(model, ids, opt)
    requests = [(m.spra_key, m.weight_shape, m.mask_parts) for m in layers_]
    rebuild = []
    for _ in range(3):
        start = time.perf_counter()
        build_masks(requests)
        rebuild.append(time.perf_counter() - start)
    step = statistics.median(times["host"] + times["device"])
    mask = [m.mask_bytes()["host"] for m in layers_]
    return {"layers": layers, "batch": batch, "seq": seq, "total_k": sum(m.k for m in layers_),
            "step_s": {r: statistics.median(t) for r, t in times.items()}, "host_over_device":
            statistics.median(times["host"]) / statistics.median(times["device"]),
            "host_bytes_per_step": moved.bytes, "host_largest_copy": moved.largest, "mask_bytes_total": sum(mask),
            "device_resident": sum(mask), "host_transient_peak": max(mask),
            "rebuild_s": statistics.median(rebuild), "rebuild_per_step_share": 2 * statistics.median(rebuild) / step,
            "threads": torch.get_num_threads()}


def startup(model: str, *, threads: tuple[int, ...] = (1, 2)) -> dict:
    """Every rank's start-up mask work at real shapes: building every mask, then hashing them all."""
    requests = [(key, s, ((0, budget(s, lora_rank=8, density=None)),)) for key, s in linears(model)]
    out = {"model": model, "matrices": len(requests), "total_k": sum(r[2][0][1] for r in requests)}
    masks = None
    for n in threads:
        start = time.perf_counter()
        masks = build_masks(requests, threads=n)
        out[f"build_s_{n}_threads"] = time.perf_counter() - start
    start = time.perf_counter()
    fingerprint([(key, s, idx) for (key, s, _), (idx, _) in zip(requests, masks, strict=True)], config="")
    out["fingerprint_s"] = time.perf_counter() - start
    out["host_bytes"] = sum(i.nbytes + c.nbytes for i, c in masks)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("step", "startup", "all"), default="all")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--models", default="llama3-70b,llama3.1-405b")
    a = ap.parse_args()
    res = {}
    if a.part in ("step", "all"):
        res["step"] = step_cost(layers=a.layers, batch=a.batch, seq=a.seq, rounds=a.rounds)
    if a.part in ("startup", "all"):
        res["startup"] = [startup(m) for m in a.models.split(",")]
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
