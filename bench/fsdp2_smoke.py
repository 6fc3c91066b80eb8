"""Part (c) of ``make gpu-check``: FSDP2 on one GPU over nccl, a few steps of the debug tiny Llama; one JSON line.

    HF_HUB_OFFLINE=1 torchrun --standalone --nproc_per_node 1 -m bench.fsdp2_smoke [--steps 8]

The model and the SpaRA settings come from configs/train/debug_tiny_llama.yaml; the path is the one users take in
their own loop: ``apply_spra`` on the plain model, ``apply_fsdp2`` (bf16 compute, fp32 master values, fp32
gradient reduction), AdamW over the sharded values, ``save_adapter`` gathering them. On a machine without CUDA
the same script runs on gloo and the CPU, which is how the tests check it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from spra_dist import apply_spra, load_adapter, save_adapter
from spra_dist.distributed.devices import backend_for, train_device
from spra_dist.distributed.fsdp import apply_fsdp2
from spra_dist.train.config import load_config
from spra_dist.train.models import build_model

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "train" / "debug_tiny_llama.yaml"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    a = ap.parse_args()
    device = train_device("auto")
    backend = backend_for(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend)
    cfg = load_config(CONFIG)
    model = apply_spra(build_model(cfg.model, seed=cfg.seed).model, cfg.spra)
    apply_fsdp2(model)
    values = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(values, lr=cfg.lr)
    motif = torch.tensor([97, 98, 99, 100, 101, 102, 103, 104])  # 'abcdefgh' repeated: learnable in a few steps
    ids = motif.repeat(cfg.data.max_length // 8).repeat(8, 1).to(device)
    losses, start = [], time.perf_counter()
    for _ in range(a.steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        save_adapter(model, tmp)  # gathers the sharded values on every rank; rank 0 writes
        plain = load_adapter(build_model(cfg.model, seed=cfg.seed).model, tmp)
        saved = {n: p.detach() for n, p in plain.named_parameters() if n.endswith("spra_values")}
    full = {n: p.full_tensor().detach().cpu() for n, p in model.named_parameters() if n.endswith("spra_values")}
    result = {"backend": backend, "device": str(device), "world_size": dist.get_world_size(), "steps": a.steps,
              "losses": losses, "seconds": seconds, "sharded": type(values[0]).__name__,
              "values_device": str(values[0].device), "k_total": sum(v.numel() for v in full.values()),
              "adapter_roundtrip": saved.keys() == full.keys() and all(torch.equal(saved[n], full[n]) for n in full),
              "ok": bool(torch.isfinite(torch.tensor(losses)).all()) and losses[-1] < losses[0]}
    result["ok"] = result["ok"] and result["adapter_roundtrip"] and result["sharded"] == "DTensor"
    print(json.dumps({"fsdp2": result}), flush=True)
    dist.barrier()
    dist.destroy_process_group()
    if not result["ok"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
