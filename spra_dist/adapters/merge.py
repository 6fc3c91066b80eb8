"""``merge_adapter``: fold the active adapter's deltas into the weights, in memory, under any engine; and
``merged_named_parameters``: the same merged weights one tensor at a time, leaving the model as it is.

    plain = merge_adapter(model)     # nn.Linear / Conv1D modules again, W + Δ in their weights
    for name, tensor in merged_named_parameters(model):     # e.g. an inference engine's load_weights
        engine.load_weights([(name, tensor)])

Writing the merged model to a directory (``spra merge``) is ``spra_dist.adapters.export``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from spra_dist.core.kernels import merged_entries, put
from spra_dist.core.layer import SpraLinear
from spra_dist.core.model import replace_module, spra_layers, spra_modules
from spra_dist.core.quantized import compute_dtype, merged_dense, quantization_of
from spra_dist.core.registry import detach_registry
from spra_dist.distributed.tensors import full_tensor, is_sharded, unwrap


def merge_adapter(model: nn.Module) -> nn.Module:
    """Fold every delta into its weight and put plain ``nn.Linear`` / ``Conv1D`` modules back (in place).

    On a model FSDP2 or ZeRO-3 shards (call it on every rank), each module is merged on its own — ZeRO-3
    gathers one weight at a time, FSDP2 merges each rank's own rows — and the modules stay in place, running
    as plain linears, because the engine's hooks are bound to them.
    """
    model = unwrap(model)
    for name, m in spra_layers(model):
        if is_sharded(m.weight):
            if m.active:
                _merge_sharded(m)
        else:
            replace_module(model, name, m.to_plain())
    if not any(isinstance(m, SpraLinear) for m in model.modules()):
        detach_registry(model)  # the other adapters' values go with the modules
    return model


@torch.no_grad()
def _merge_sharded(m: SpraLinear) -> None:
    """Fold a SpraLinear's delta into its weight where FSDP2 or ZeRO-3 holds the weight in shards.

    ZeRO-3 gathers this one module's weight, merges, and re-partitions it. FSDP2 needs no weight gather at
    all: each rank merges the sampled entries that fall in its own rows (FSDP2 shards dim 0 in
    ``torch.chunk`` pieces), from the k values gathered once. The module stays (the engine's hooks are bound
    to it) and runs as a plain linear from now on.
    """
    if hasattr(m.weight, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([m.weight, m.spra_values], modifier_rank=0):
            m.merge()
        return
    local = m.weight.to_local().view(-1)
    n_rows, n_cols = m.weight_shape
    chunk = -(-n_rows // m.weight.device_mesh.size())
    lo = m.weight.device_mesh.get_local_rank() * chunk * n_cols
    values = full_tensor(m.spra_values)
    idx = m.spra_indices.to(local.device)
    mine = (idx >= lo) & (idx < lo + local.numel())
    pos = idx[mine] - lo
    put(local, pos, merged_entries(local[pos], values[mine].to(local.device)))
    m.merged = True


@torch.no_grad()
def merged_named_parameters(model: nn.Module, *, dtype: torch.dtype | None = None
                            ) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` for every parameter of the base model as an inference engine knows it: the names of the
    plain model (``model.layers.0.self_attn.q_proj.weight``), ``W + Δ`` for each adapted weight, every other
    parameter unchanged, the ``spra_values`` left out. The model is not changed.

    Each merged weight is a new dense tensor, built when it is reached (one matrix at a time): the ``k`` entries
    ``W[idx] + v`` added in fp32 and rounded once, bit for bit what ``merge_adapter`` writes; over a 4-bit weight,
    dequant(W) + Δ in the compute dtype. Other tensors are the parameters themselves: a consumer must copy what it
    keeps. ``dtype``: cast every tensor first (the base weight is cast before the k values are added, as the
    merge of a model loaded in ``dtype`` would be).

    Under FSDP2 or ZeRO-3 each tensor is gathered whole when it is reached: iterate on every rank.
    """
    model = unwrap(model)
    adapted = {f"{name}.weight": m for name, m in spra_modules(model)}
    for name, p in model.named_parameters():
        if name.endswith("spra_values"):
            continue
        m = adapted.get(name)
        if m is None:
            tensor = full_tensor(p)
            yield name, tensor if dtype is None else tensor.to(dtype)
        else:
            yield name, _merged_weight(m, dtype)


def _merged_weight(m: SpraLinear, dtype: torch.dtype | None) -> torch.Tensor:
    """A new dense tensor holding the module's ``W + Δ`` (see ``merged_named_parameters``)."""
    weight = full_tensor(m.weight) if is_sharded(m.weight) else m.weight  # a 4-bit weight keeps its quant state
    if m.merged:  # the weight holds W + Δ already
        return weight.to(dtype or weight.dtype, copy=True)
    values = full_tensor(m.spra_values)
    indices = m.spra_indices.to(weight.device)
    if quantization_of(weight) is not None:
        return merged_dense(weight, indices, values, torch.float32).to(dtype or compute_dtype(weight))
    merged = weight.detach().to(dtype or weight.dtype, copy=True)
    flat = merged.view(-1)
    put(flat, indices, merged_entries(flat.index_select(0, indices), values.to(weight.device)))
    return merged
