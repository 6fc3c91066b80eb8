"""Where a run computes, and where the tensors of its collectives live.

``spra train`` trains on the GPU when there is one (``device=auto``): each rank on ``cuda:LOCAL_RANK``, over
nccl, as torchrun, accelerate and deepspeed lay ranks out. nccl moves only CUDA tensors, so every tensor a
collective sends is made on ``collective_device``; object collectives (``all_gather_object``) place theirs
themselves.
"""

from __future__ import annotations

import os
from typing import Literal, get_args

import torch
import torch.distributed as dist
from torch import nn

Device = Literal["auto", "cpu", "cuda"]
"""``auto``: each rank on its GPU when torch sees CUDA, else the CPU."""
DEVICES: tuple[str, ...] = get_args(Device)


def train_device(requested: Device) -> torch.device:
    """``cuda:LOCAL_RANK`` for ``cuda`` (and for ``auto`` on a machine with CUDA), else the CPU."""
    if requested not in DEVICES:
        raise ValueError(f"device={requested!r} is not one of {', '.join(DEVICES)}; auto is the GPU when there "
                         "is one")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda, but torch sees no CUDA GPU (a CPU build of torch, or no driver); "
                         "use device=cpu, or install a CUDA build of torch")
    if requested == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def backend_for(device: torch.device) -> str:
    """The process-group backend for ranks computing on ``device``: nccl for CUDA, gloo for the CPU."""
    return "nccl" if device.type == "cuda" else "gloo"


def collective_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """Where a tensor sent through ``group`` must live: the current GPU under nccl, else the CPU."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (the CPU for a model without any)."""
    p = next(model.parameters(), None)
    return torch.device("cpu") if p is None else p.device


def to_device(batch: dict, device: torch.device) -> dict:
    """``batch`` with its tensors on ``device`` (other entries, such as ``num_items_in_batch``, as they are)."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
