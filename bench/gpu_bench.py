"""Part (b) of ``make gpu-check``: the values' gradient alone, then training steps of SmolLM2-135M shapes in bf16.
Prints one JSON line per result, as soon as it has it (so a part stopped at its time limit keeps what it did).

    HF_HUB_OFFLINE=1 python -m bench.gpu_bench                      # CUDA, 30 layers, batch 8 x 1024
    HF_HUB_OFFLINE=1 TRITON_INTERPRET=1 python -m bench.gpu_bench --device cpu --layers 1 --batch 1 --seq 16 \\
        --steps 1 --warmup 0 --reps 1 --tokens 64                   # the same code path on CPU (tests)

Methods, on one random-init model per run (weights in bf16, each adapter in its default dtype: fp32 SpaRA values,
fp32 PEFT adapter weights), all seven attention and MLP projections of every layer (what PEFT's all-linear picks
on Llama): ``spra_triton`` and ``spra_sampled_addmm`` (SpaRA at the LoRA r=8 budget, its values' gradient by
each backend, chosen with SPRA_SDDMM; masks in host memory, the default), ``spra_mask_on_gpu`` (Triton, every mask
kept on the GPU: the cost of the per-op mask copy is the difference), PEFT LoRA r=8, PEFT SHiRA r=8, and the
floor (everything frozen, input gradients still run back through every layer), as bench/_worker.py defines them.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time

import torch

from bench._worker import TARGETS, apply_method, build_model
from spra_dist.core.kernels.sddmm import sampled_weight_grad
from spra_dist.core.masks import budget, sample_indices

METHODS = {"spra_triton": ("spra", "triton"), "spra_mask_on_gpu": ("spra", "triton"),
           "spra_sampled_addmm": ("spra", "sampled_addmm"), "lora": ("lora", None), "shira": ("shira", None),
           "floor": ("floor", None)}
# SpaRA keeps its masks in host memory and copies one matrix's per op (the default); this one keeps them all on
# the GPU, so the two side by side give the cost of the per-op copy and the memory it saves.
MASK_ON_DEVICE = {"spra_mask_on_gpu"}
# SmolLM2-135M's projections as (out, in): q and o, k and v, gate and up, down.
SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536)]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _median_ms(fn, device: str, reps: int) -> float:
    fn()  # warm-up: Triton compiles on first use
    times = []
    for _ in range(reps):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def sddmm_times(shape: tuple[int, int], *, tokens: int, device: str, reps: int,
                backends: tuple[str, ...] = ("triton", "sampled_addmm")) -> dict:
    """Median ms of the values' gradient of one (out, in) Linear at the r=8 budget from bf16 activations."""
    n_out, n_in = shape
    k = budget(shape, lora_rank=8, density=None)
    idx = sample_indices(0, "model.layers.0.proj.weight", n_out * n_in, k).to(device)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(tokens, n_in, device=device, generator=g).bfloat16()
    dy = torch.randn(tokens, n_out, device=device, generator=g).bfloat16()
    out = {"shape": list(shape), "k": k, "tokens": tokens}
    for backend in backends:
        os.environ["SPRA_SDDMM"] = backend
        out[backend] = _median_ms(lambda: sampled_weight_grad(x, dy, idx, transposed=False), device, reps)
    out["dense"] = _median_ms(lambda: (dy.t() @ x).view(-1)[idx], device, reps)  # cuBLAS dYᵀX, then a gather
    return out


def step_times(name: str, *, device: str, layers: int, batch: int, seq: int, steps: int, warmup: int) -> dict:
    """Warm-up, then timed steps of forward + backward + AdamW; peak memory from the start of the first step."""
    method, backend = METHODS[name]
    if backend is not None:
        os.environ["SPRA_SDDMM"] = backend
    with torch.device(device):
        model, vocab = build_model("smollm2", layers)
    model = apply_method(model.to(torch.bfloat16), method, TARGETS["smollm2"]).train()
    if name in MASK_ON_DEVICE:
        for m in model.modules():
            if hasattr(m, "mask_residency"):
                m.mask_residency = "device"
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1)).to(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(warmup + steps):
        _sync(device)
        start = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    del model, opt, params
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    median = statistics.median(times)
    return {"method": name, "trainable": trainable, "median_s": median, "tokens_per_s": batch * seq / median,
            "peak_bytes": peak, "step_s": times}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2, help="each method runs once per round, methods interleaved")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--tokens", type=int, default=None, help="tokens of the SDDMM timings (default batch x seq)")
    ap.add_argument("--reps", type=int, default=20)
    a = ap.parse_args()
    for shape in SHAPES:
        print(json.dumps({"sddmm": sddmm_times(shape, tokens=a.tokens or a.batch * a.seq, device=a.device,
                                               reps=a.reps)}), flush=True)
    for r in range(a.rounds):
        for name in a.methods.split(","):
            res = step_times(name, device=a.device, layers=a.layers, batch=a.batch, seq=a.seq, steps=a.steps,
                             warmup=a.warmup)
            print(json.dumps({"step": {**res, "round": r}}), flush=True)


if __name__ == "__main__":
    main()
