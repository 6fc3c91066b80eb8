"""The pieces of the training loop: optimizer, schedule, one optimizer step.

``train_step`` is the seam for engines: it holds the only forward / backward / optimizer-step calls, so a
distributed engine (DDP, FSDP2, DeepSpeed) replaces this one small function and nothing else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from spra_dist.core.model import spra_modules, trainable_parameters
from spra_dist.train.schema import SCHEDULES, TrainConfig


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters: the sparse values at ``lr`` (no weight decay unless
    ``decay_spra_values``), the densely trained modules at ``head_lr`` (or ``lr``)."""
    spra_ids = {id(p) for _, m in spra_modules(model) for p in m.parameters(recurse=False) if p.requires_grad}
    trainable = [p for _, p in trainable_parameters(model)]
    values = [p for p in trainable if id(p) in spra_ids]
    dense = [p for p in trainable if id(p) not in spra_ids]
    if not trainable:
        raise ValueError("the model has no trainable parameters; check spra.target_modules")
    groups = [{"params": values, "lr": cfg.lr, "name": "spra_values",
               "weight_decay": cfg.weight_decay if cfg.decay_spra_values else 0.0}]
    if dense:
        groups.append({"params": dense, "lr": cfg.head_lr or cfg.lr, "name": "dense",
                       "weight_decay": cfg.weight_decay})
    return torch.optim.AdamW([g for g in groups if g["params"]])


def lr_factor(step: int, *, warmup_steps: int, max_steps: int, schedule: str) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based): linear warmup, then the decay."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    match schedule:
        case "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        case "linear":
            return 1.0 - progress
        case "constant":
            return 1.0
        case _:
            raise ValueError(f"schedule={schedule!r} is not one of {', '.join(SCHEDULES)}")


def build_schedule(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_factor(step, warmup_steps=cfg.warmup_steps, max_steps=cfg.max_steps,
                               schedule=cfg.schedule),
    )


def set_schedule_step(scheduler: torch.optim.lr_scheduler.LambdaLR, step: int) -> None:
    """Put the schedule where it stands after ``step`` optimizer steps (a resumed run)."""
    scheduler.last_epoch = step
    lrs = [base * fn(step) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr


@dataclass
class StepResult:
    loss: float
    """Mean loss over the micro batches."""

    tokens: int
    """Non-padding tokens processed by this rank."""

    grad_norm: float | None
    """Global gradient norm before clipping (None when it was not measured)."""

    applied: bool = True
    """False when the update was dropped on every rank (non-finite loss or gradients)."""


def train_step(engine, micro_batches: list[dict], *, max_grad_norm: float | None, guard=None) -> StepResult:
    """One optimizer step through the engine: forward + backward per micro batch, then clip and step.

    The engine (spra_dist.distributed.engines) hides what DDP / FSDP2 / DeepSpeed do around these three calls. With a
    ``guard`` (spra_dist.train.guard.StepGuard) every rank agrees, before the update, whether to apply it.
    """
    losses, tokens = [], 0
    for i, batch in enumerate(micro_batches):
        loss = engine.forward_backward(batch, n_micro=len(micro_batches), last=i == len(micro_batches) - 1)
        losses.append(loss.item())
        tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
    applied = [True]

    def allow(norm: float | None) -> bool:
        applied[0] = guard.decide(losses=losses, grad_norm=norm)
        return applied[0]

    norm = engine.step(max_grad_norm, allow=allow if guard is not None else None)
    return StepResult(sum(losses) / len(losses), tokens, norm, applied[0])
