"""One rank of a Llama-3 fine-tune at full scale, simulated: FSDP2 over torch's fake process group, a step under
FakeTensorMode, memory by FSDPMemTracker (no real compute, no real memory). ``bench.scale`` runs it and prints tables.

    HF_HUB_OFFLINE=1 python -m bench.scale_sim --model 70b --method spra --lora-rank 8 --worlds 64
    HF_HUB_OFFLINE=1 python -m bench.scale_sim --model 70b --method spra --lora-rank 8 --worlds 64 --quantize-base nf4

Prints one JSON list, one row per (world size, rank): rank 0 and the last rank, whose shards FSDP2 cuts shorter.
The model is built once per process on the meta device (for SpaRA: every mask built in host memory from the seed);
each row shards a copy of it, sharing those masks. ``--quantize-base nf4`` packs the copy's adapted linears in
torchao's NF4 (``quantize_targets``) before FSDP2 shards it, as ``spra train`` does with ``model.quantize_base=nf4``.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import time
import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule
from torch.multiprocessing.reductions import StorageWeakRef
from torch.testing._internal.distributed.fake_pg import FakeStore
from torch.utils._python_dispatch import is_traceable_wrapper_subclass
from transformers import LlamaConfig, LlamaForCausalLM

from spra_dist.core.config import SpraConfig
from spra_dist.core.layer import SpraLinear
from spra_dist.core.masks import host_threads
from spra_dist.core.model import apply_spra, quantize_targets
from spra_dist.core.quantized import QUANTIZE_BASE, is_nf4, nf4_on_meta_for
from spra_dist.distributed.fsdp import apply_fsdp2

# (hidden, intermediate, layers, attention heads); all three have 8 key/value heads and a 128256-token vocabulary.
LLAMA3 = {"8b": (4096, 14336, 32, 32), "70b": (8192, 28672, 80, 64), "405b": (16384, 53248, 126, 128)}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = ("spra", "lora")

# ModTracker warns on every FSDP2 root forward that its hierarchy "may be messed up"; the per-category figures
# used here don't depend on the hierarchy.
warnings.filterwarnings("ignore", message="The module hierarchy tracking maybe be messed up")
# torchao's NF4 post-all-gather asserts that FSDP2 reuses its buffers by comparing storage pointers, which fake tensors
# warn about and report as 0: under fake mode that check passes without checking anything.
warnings.filterwarnings("ignore", message="Accessing the data pointer of FakeTensor is deprecated")


def llama3_config(name: str) -> LlamaConfig:
    """Llama-3-8B / 70B or Llama-3.1-405B's shapes (nothing downloaded); SDPA attention as in training."""
    if name not in LLAMA3:
        raise ValueError(f"model {name!r}: use one of {', '.join(LLAMA3)}")
    hidden, inter, layers, heads = LLAMA3[name]
    return LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=8, vocab_size=128256,
                       max_position_embeddings=131072, tie_word_embeddings=False, use_cache=False,
                       attn_implementation="sdpa")


def build(config: LlamaConfig, *, method: str, lora_rank: int, mask_residency: str = "host") -> tuple[nn.Module, float]:
    """The bf16 model on the meta device with the adapter applied (fp32 values / fp32 LoRA weights); returns it
    and the seconds the adapter took to apply (for SpaRA: every mask built from the seed and fingerprinted)."""
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    start = time.perf_counter()
    match method:
        case "spra":
            apply_spra(model, SpraConfig(target_modules="all-linear", lora_rank=lora_rank, seed=0,
                                         mask_residency=mask_residency))
        case "lora":
            from peft import LoraConfig, get_peft_model

            # get_peft_model keeps the adapter weights in fp32 on a bf16 base (autocast_adapter_dtype), and with
            # low_cpu_mem_usage creates them on the meta device (else 10 GB of host memory at 405B, r = 64).
            # FSDP2 shards the inner model, whose layers hold the LoRA modules.
            lora = LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0, target_modules=LORA_TARGETS)
            peft_model = get_peft_model(model, lora, low_cpu_mem_usage=True)
            model = peft_model.base_model.model
        case _:
            raise ValueError(f"method {method!r}: use one of {', '.join(METHODS)}")
    return model, time.perf_counter() - start


def mask_state(model: nn.Module) -> dict[str, int]:
    """Per rank, from ``SpraLinear.mask_bytes``: the mask kept on the device, kept in host memory, and the
    transient peak (the largest matrix's per-use copy, twice: the one in use and the next)."""
    sizes = [m.mask_bytes() for m in model.modules() if isinstance(m, SpraLinear)]
    return {"mask_device": sum(s["device"] for s in sizes), "mask_host": sum(s["host"] for s in sizes),
            "mask_transient_peak": 2 * max((s["transient"] for s in sizes), default=0)}


def _plain(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors holding the data: an NF4 shard (a wrapper subclass) stands for its packed data, scales, scale
    factors, scales' mean and code book."""
    out = []
    for t in tensors:
        if is_traceable_wrapper_subclass(t):
            names, _ = t.__tensor_flatten__()
            out += _plain([getattr(t, n) for n in names])
        else:
            out.append(t)
    return out


def _bytes(tensors: list[torch.Tensor]) -> tuple[int, int]:
    """(allocated, logical) bytes of local tensors: allocated counts each storage once, whole (FSDP2 pads every
    rank's shard to the first rank's size); logical is numel × element size of the views themselves."""
    tensors = _plain(tensors)
    storages = {StorageWeakRef(t.untyped_storage()): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values()), sum(t.numel() * t.element_size() for t in tensors)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _categories(snapshot: dict) -> dict[str, int]:
    """FSDPMemTracker's snapshot of the one device (the CPU here) as {category name: bytes}."""
    (per_device,) = snapshot.values()
    return {getattr(k, "value", k): int(v) for k, v in per_device.items()}


def _shared_masks(model: nn.Module) -> dict[int, torch.Tensor]:
    """A deepcopy memo that makes a copy of ``model`` share its host-built masks instead of copying them."""
    masks = [t for m in model.modules() if isinstance(m, SpraLinear) for t in (m.spra_indices, m.spra_crow)]
    return {id(t): t for t in masks}


def simulate(model: nn.Module, *, world: int, rank: int, checkpointing: bool, seq: int, batch: int,
             quantize_base: str = "none") -> dict:
    """Shard a copy of the meta ``model`` for ``rank`` of ``world`` and track one training step's memory; with
    ``quantize_base="nf4"`` the copy's adapted linears are packed in NF4 first."""
    model = copy.deepcopy(model, memo=_shared_masks(model))
    # Packed after the copy: torchao 0.18 copies an NF4Tensor by re-quantizing it with its default 256 blocks per
    # scale, which would undo nf4_scaler_block's row-aligned scales (and fails on rows of fewer blocks).
    quantize_targets(model, quantize_base)
    for m in model.modules():
        # to_empty materialises an NF4 shard's packed data, scales and factors, not the mean scale and code book
        # every rank holds whole: place those before sharding, as loading a packed base does
        if isinstance(m, SpraLinear) and is_nf4(m.weight):
            m.weight = nn.Parameter(nf4_on_meta_for(m.weight, torch.device("cpu")), requires_grad=False)
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    dist.init_process_group("fake", rank=rank, world_size=world, store=FakeStore())
    try:
        mesh = init_device_mesh("cpu", (world,))  # built outside FakeTensorMode, as torchtitan does
        # allow_non_fake_inputs: the masks are real host tensors, built before; fake mode reads them as fakes.
        with FakeTensorMode(allow_non_fake_inputs=True):
            return _tracked_step(model, mesh=mesh, seq=seq, batch=batch)
    finally:
        dist.destroy_process_group()


def _tracked_step(model: nn.Module, *, mesh: DeviceMesh, seq: int, batch: int) -> dict:
    apply_fsdp2(model, mesh=mesh)  # each decoder layer, then the root; bf16 compute, fp32 reduction
    model.to_empty(device="cpu")
    model.train()
    # Under FakeTensorMode FSDP2 re-pads an uneven shard at its first unshard (its same-storage check wants a plain
    # torch.Tensor), which the tracker would book as an activation: unshard every group once, untracked.
    for module in reversed(list(model.modules())):
        if isinstance(module, FSDPModule):
            module.unshard()
            module.reshard()
    trained = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=1e-4)
    # Warm the optimizer untracked, so the tracked step holds Adam's moments from its start, as every step after
    # the first does (torchtitan runs two tracked steps instead, at twice the time).
    for p in trained:
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq))
    tracker = FSDPMemTracker(model, opt)
    tracker.track_inputs((ids,))
    with tracker:
        at_start = _categories(tracker.get_tracker_snapshot("current"))
        model(input_ids=ids, labels=ids).loss.backward()
        grads = _bytes([_local(p.grad) for p in trained])
        after_backward = _categories(tracker.get_tracker_snapshot("current"))
        opt.step()
        opt.zero_grad(set_to_none=True)
    state = [_local(t) for p in trained for name, t in opt.state[p].items() if name in ("exp_avg", "exp_avg_sq")]
    snaps = [s for stats in tracker.memory_tracking.values() for per_state in stats.snapshots.values()
             for s in per_state]
    base, base_logical = _bytes([_local(p) for p in frozen])
    values, values_logical = _bytes([_local(p) for p in trained])
    adam, adam_logical = _bytes(state)
    return {"base_shard": base, "base_shard_logical": base_logical, "values": values,
            "values_logical": values_logical, "grads": grads[0], "grads_logical": grads[1],
            "adam": adam, "adam_logical": adam_logical,
            "tracker_sharded_param": at_start["Sharded Param"], "tracker_sharded_grad": after_backward["Sharded Grad"],
            "all_gather_max": max(_categories(s)["All Gather"] for s in snaps),
            "peak": _categories(tracker.get_tracker_snapshot("peak"))}


def run(config: LlamaConfig, *, method: str, lora_rank: int, worlds: list[int], seq: int, batch: int,
        mask_residency: str = "host", checkpointing: tuple[bool, ...] = (False, True),
        quantize_base: str = "none") -> list[dict]:
    """Every (world size, rank 0 / last rank) row for one model and adapter, the model built once."""
    if quantize_base not in QUANTIZE_BASE:
        raise ValueError(f"quantize_base {quantize_base!r}: use one of {', '.join(QUANTIZE_BASE)}")
    if quantize_base != "none" and method != "spra":
        raise ValueError(f"quantize_base={quantize_base} packs SpaRA's adapted linears; use --method spra")
    model, apply_s = build(config, method=method, lora_rank=lora_rank, mask_residency=mask_residency)
    masks = mask_state(model)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    rows = []
    for world in worlds:
        for rank in sorted({0, world - 1}):
            row = {"method": method, "lora_rank": lora_rank, "world": world, "rank": rank, "seq": seq,
                   "batch": batch, "trainable": trained, "frozen": frozen, "apply_s": apply_s,
                   "mask_residency": mask_residency if method == "spra" else None, "quantize_base": quantize_base,
                   **masks}
            for ckpt in checkpointing:
                step = simulate(model, world=world, rank=rank, checkpointing=ckpt, seq=seq, batch=batch,
                                quantize_base=quantize_base)
                peak = step.pop("peak")
                row.update(step)
                row["ckpt" if ckpt else "no_ckpt"] = peak
            rows.append(row)
    return rows


def startup(config: LlamaConfig, *, lora_rank: int) -> dict:
    """Time to first step, SpaRA's share of it: ``apply_spra`` on the meta model (every mask built in host memory
    from the seed and hashed into the fingerprint), with the threads and host memory it used."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model, seconds = build(config, method="spra", lora_rank=lora_rank)
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss) * 1024
    return {"lora_rank": lora_rank, "apply_s": seconds, "threads": host_threads(), "peak_rss_growth": grown,
            "k": sum(p.numel() for p in model.parameters() if p.requires_grad), **mask_state(model)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(LLAMA3), help="a Llama-3 shape")
    ap.add_argument("--shape", help="LlamaConfig fields as JSON, instead of --model (the tests' tiny models)")
    ap.add_argument("--method", choices=METHODS, required=True)
    ap.add_argument("--lora-rank", type=int, default=8, help="LoRA's rank; SpaRA's k = r·(n_in + n_out)")
    ap.add_argument("--worlds", default="8,64", help="comma-separated world sizes")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=1, help="micro batch")
    ap.add_argument("--mask-residency", choices=("host", "device"), default="host")
    ap.add_argument("--checkpointing", choices=("both", "off", "on"), default="both")
    ap.add_argument("--quantize-base", choices=QUANTIZE_BASE, default="none",
                    help="nf4: the adapted linears' frozen weights packed in torchao's NF4 (SpaRA only)")
    ap.add_argument("--startup", action="store_true", help="only time apply_spra (SpaRA's time to first step)")
    a = ap.parse_args()
    if (a.model is None) == (a.shape is None):
        ap.error("give --model or --shape")
    config = llama3_config(a.model) if a.model else LlamaConfig(**json.loads(a.shape))
    if a.startup:
        print(json.dumps(dict(startup(config, lora_rank=a.lora_rank), model=a.model or "custom")))
        return
    ckpt = {"both": (False, True), "off": (False,), "on": (True,)}[a.checkpointing]
    torch.set_num_threads(1)  # fake tensors compute nothing; leave the cores to the masks and the other cell
    rows = run(config, method=a.method, lora_rank=a.lora_rank, worlds=[int(w) for w in a.worlds.split(",")],
               seq=a.seq, batch=a.batch, mask_residency=a.mask_residency, checkpointing=ckpt,
               quantize_base=a.quantize_base)
    print(json.dumps([dict(r, model=a.model or "custom") for r in rows]))


if __name__ == "__main__":
    main()
