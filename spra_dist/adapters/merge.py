"""``merge_adapter``: fold the active adapter's deltas into the weights, in memory, under any engine.

    plain = merge_adapter(model)     # nn.Linear / Conv1D modules again, W + Δ in their weights

Writing the merged model to a directory (``spra merge``) is ``spra_dist.adapters.export``.
"""

from __future__ import annotations

import torch
from torch import nn

from spra_dist.core.kernels import merged_entries, put
from spra_dist.core.layer import SpraLinear
from spra_dist.core.model import replace_module, spra_layers
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
