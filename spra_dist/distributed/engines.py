"""Engines: the one seam between the training loop and none / DDP / FSDP2 / DeepSpeed ZeRO-1/2/3.

An :class:`Engine` owns the wrapped model, the optimizer and the schedule, and gives the loop the same calls
whatever shards the model: ``forward_backward`` per micro batch, ``step`` per optimizer step, and, for portable
checkpoints, ``full_value`` / ``full_optimizer_state`` / ``load_optimizer_state`` per trainable parameter.
Sharding is the engine's business: SpaRA values are ordinary parameters, so every engine shards them, their
gradients and their optimizer state on its own. ``spra_dist.distributed.parallelize`` builds one.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Literal, Protocol, get_args

import torch
from torch import nn

from spra_dist.distributed.devices import model_device, to_device
from spra_dist.distributed.group import world
from spra_dist.distributed.tensors import full_tensor, shard_like

EngineName = Literal["auto", "none", "ddp", "fsdp2", "deepspeed"]
"""``auto``: what the launcher says (accelerate's config, a DeepSpeed config given), else ddp or none."""
ENGINES: tuple[str, ...] = get_args(EngineName)

MixedPrecision = Literal["auto", "no", "bf16"]
"""``auto``: accelerate's setting (``no`` without accelerate)."""

ADAM_KEYS = ("exp_avg", "exp_avg_sq")


class Engine(Protocol):
    """What the training loop and the checkpoints call, under every engine."""

    name: str
    model: nn.Module
    """The user's model, unwrapped (FSDP2 shards it in place; DDP and DeepSpeed wrap it)."""
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler

    def forward_backward(self, batch: dict, *, n_micro: int, last: bool) -> torch.Tensor:
        """Loss of one micro batch, its gradient accumulated; gradients cross the wire on the ``last`` only."""

    def step(self, max_grad_norm: float | None, *, allow=None) -> float | None:
        """Clip and apply the update unless ``allow(grad_norm)`` says no; advance the schedule; return the norm."""

    def prime(self, micro_batches: list[dict]) -> None:
        """Make the optimizer state exist before a checkpoint's moments are written into it."""

    def full_value(self, p: torch.Tensor) -> torch.Tensor:
        """The whole fp32 value of trainable parameter ``p``, on the CPU (a collective when sharded)."""

    def full_optimizer_state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        """The whole AdamW moments of ``p`` (``ADAM_KEYS``), fp32 on the CPU."""

    def load_optimizer_state(self, p: torch.Tensor, states: dict[str, torch.Tensor], step: int) -> None:
        """Lay whole moments out in this engine's sharding."""

    def local_optimizer_numel(self) -> int:
        """Optimizer-state elements this rank holds (what sharding divides)."""


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


def resolve_engine(requested: EngineName, *, deepspeed_config: str | None, world_size: int) -> str:
    """The engine to run: as asked, or for ``auto`` what the launcher says (accelerate's environment, a
    DeepSpeed preset in the config), else DDP for several processes and none for one."""
    if requested not in ENGINES:
        raise ValueError(f"engine={requested!r} is not one of {', '.join(ENGINES)}")
    if requested == "auto":
        if _env_true("ACCELERATE_USE_DEEPSPEED") or deepspeed_config:
            requested = "deepspeed"
        elif _env_true("ACCELERATE_USE_FSDP"):
            if os.environ.get("FSDP_VERSION", "1") != "2":
                raise ValueError("accelerate asks for FSDP1; spra_dist runs FSDP2: set fsdp_version: 2 in the "
                                 "accelerate config (configs/accelerate/fsdp2.yaml)")
            requested = "fsdp2"
        else:
            requested = "ddp" if world_size > 1 else "none"
    if requested == "deepspeed" and not (deepspeed_config or os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
                                         or os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")):
        raise ValueError("engine=deepspeed needs a config: deepspeed_config=zero2 (or zero1, zero3, zero3_offload, "
                         "or the path of a DeepSpeed JSON file)")
    return requested


def resolve_mixed_precision(requested: MixedPrecision) -> str:
    if requested == "auto":
        requested = os.environ.get("ACCELERATE_MIXED_PRECISION", "no") or "no"
    if requested not in ("no", "bf16"):
        raise ValueError(f"mixed_precision={requested!r}: use no or bf16 (fp16 is not supported)")
    return requested


@dataclass
class TorchEngine:
    """none, DDP or FSDP2, with a torch optimizer over the (possibly DTensor) trainable parameters."""

    name: str
    model: nn.Module
    """The user's model (FSDP2 shards it in place; DDP wraps it in ``runner``)."""
    runner: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    autocast_dtype: torch.dtype | None = None
    """none / DDP with mixed_precision=bf16: the forward runs under torch.autocast in this dtype (the model and
    its values stay fp32); None for fp32, and for FSDP2, whose MixedPrecisionPolicy casts instead."""

    def forward_backward(self, batch: dict, *, n_micro: int, last: bool) -> torch.Tensor:
        """Loss of one micro batch, its gradient accumulated; gradients cross the wire only on the last."""
        batch = to_device(batch, model_device(self.model))
        if self.name == "fsdp2":
            self.model.set_requires_gradient_sync(last)
        sync = self.runner.no_sync() if self.name == "ddp" and not last else contextlib.nullcontext()
        with sync:  # DDP decides in forward whether this backward all-reduces
            with self.autocast():
                loss = self.runner(**batch).loss
            (loss / n_micro).backward()
        return loss.detach()

    def autocast(self) -> contextlib.AbstractContextManager:
        """torch.autocast for the forward when this engine trains in mixed precision that way, else a no-op."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(model_device(self.model).type, dtype=self.autocast_dtype)

    def prime(self, micro_batches: list[dict]) -> None:
        """Nothing to do: torch optimizers accept state written before their first step."""

    def step(self, max_grad_norm: float | None, *, allow=None) -> float | None:
        """Clip, then apply the update unless ``allow(grad_norm)`` says no (a step dropped on every rank).

        A dropped step still advances the schedule, so the schedule stays a function of the step index.
        """
        norm = None
        if max_grad_norm is not None or allow is not None:  # an infinite bound only measures the norm
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            bound = max_grad_norm if max_grad_norm is not None else float("inf")
            norm = float(torch.nn.utils.clip_grad_norm_(params, bound))
        if allow is None or allow(norm):
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def full_value(self, p: torch.Tensor) -> torch.Tensor:
        return full_tensor(p).float().cpu()

    def full_optimizer_state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        state = self.optimizer.state.get(p, {})
        return {k: full_tensor(state[k]).float().cpu() if k in state else torch.zeros(p.shape) for k in ADAM_KEYS}

    def load_optimizer_state(self, p: torch.Tensor, states: dict[str, torch.Tensor], step: int) -> None:
        self.optimizer.state[p] = {"step": torch.tensor(float(step)),
                                   **{k: _like(p, states[k]) for k in ADAM_KEYS}}

    def local_optimizer_numel(self) -> int:
        return sum(_local(t).numel() for s in self.optimizer.state.values() for k, t in s.items() if k in ADAM_KEYS)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _like(p: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """An optimizer moment laid out like parameter ``p`` (fp32 for low-precision parameters)."""
    return shard_like(p, full.to(torch.float32 if p.dtype != torch.float64 else p.dtype))


def check_batch_split(batch_size: int, grad_accum: int) -> int:
    """The per-rank micro batch; ``ValueError`` when the global batch doesn't divide."""
    _, size = world()
    if batch_size % (size * grad_accum):
        raise ValueError(f"batch_size={batch_size} is the global batch and must divide by world size {size} × "
                         f"grad_accum {grad_accum}; use a multiple of {size * grad_accum}")
    return batch_size // (size * grad_accum)
