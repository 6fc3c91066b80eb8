"""Tensors under any engine: the user's model inside a wrapper, and a parameter's whole value, whether FSDP2
(a DTensor), ZeRO-3 (a partition) or nobody shards it. Reading or writing a sharded value is a collective: call these
on every rank.
"""

from __future__ import annotations

import torch
from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside DDP / a DeepSpeed engine / accelerate's wrappers."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def full_tensor(p: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank, whatever engine holds it: FSDP2 DTensor, ZeRO-3 partition or plain; for a
    DeepSpeed bf16/fp16 parameter, the fp32 master copy its optimizer keeps.

    A collective under FSDP2 and ZeRO-3: call it on every rank.
    """
    if hasattr(p, "full_tensor"):
        return p.full_tensor()
    if p.dtype in (torch.float16, torch.bfloat16) and (hasattr(p, "_hp_mapping") or hasattr(p, "ds_id")):
        # DeepSpeed in bf16/fp16 computes with a low-precision copy; its optimizer holds the fp32 master values.
        from deepspeed.utils import safe_get_full_fp32_param

        master = safe_get_full_fp32_param(p)
        if master is not None:
            return master.detach().clone()
    if hasattr(p, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
            return p.data.detach().clone()
    return p.detach()


def is_sharded(p: torch.Tensor) -> bool:
    """Held in shards by FSDP2 (a DTensor) or ZeRO-3 (a partitioned parameter)."""
    return hasattr(p, "device_mesh") or hasattr(p, "ds_id")


def global_shape(p: torch.Tensor) -> tuple[int, ...]:
    """The parameter's full shape (a ZeRO-3 partition's own shape is empty between uses; a bitsandbytes 4-bit
    weight is stored as a packed column)."""
    state = getattr(p, "quant_state", None)
    if state is not None and type(p).__name__ == "Params4bit":
        return tuple(state.shape)
    return tuple(getattr(p, "ds_shape", None) or p.shape)


def shard_like(p: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """``full`` laid out like ``p``: a DTensor with p's mesh and placements under FSDP2, else as is."""
    if hasattr(p, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full.to(p.device_mesh.device_type), p.device_mesh, p.placements)
    return full.to(p.device)


@torch.no_grad()
def set_full(p: torch.Tensor, value: torch.Tensor) -> None:
    """Write the whole ``value`` into ``p``, whatever engine holds it (a collective under FSDP2 / ZeRO-3)."""
    value = value.to(p.dtype)
    if hasattr(p, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p], modifier_rank=0):  # rank 0's copy is re-partitioned
            p.data.copy_(value.to(p.data.device).view_as(p.data))
    else:
        p.copy_(shard_like(p, value))
