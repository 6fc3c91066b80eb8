"""Engines: the one seam between the training loop and none / DDP / FSDP2 / DeepSpeed ZeRO-1/2/3.

An engine owns the wrapped model, the optimizer and the schedule, and exposes the same calls to the loop:
``forward_backward(batch, n_micro=, last=)`` per micro batch, ``step(max_grad_norm)`` per optimizer step, and,
for portable checkpoints, ``full_value`` / ``full_optimizer_state`` / ``load_optimizer_state`` per trainable
parameter.
Sharding is the engine's business: SpaRA values are ordinary parameters, so every engine shards them, their
gradients and their optimizer state on its own.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from spra_dist.devices import model_device, to_device
from spra_dist.distributed import full_tensor, shard_like, world

ENGINES = ("auto", "none", "ddp", "fsdp2", "deepspeed")
ADAM_KEYS = ("exp_avg", "exp_avg_sq")
PRESET_DIR = Path(__file__).resolve().parent.parent / "configs" / "deepspeed"


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


def resolve_engine(requested: str, *, deepspeed_config: str | None, world_size: int) -> str:
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
        raise ValueError("engine=deepspeed needs a preset: deepspeed_config=configs/deepspeed/zero2.json "
                         "(or zero1 / zero3 / zero3_offload)")
    return requested


def resolve_mixed_precision(requested: str) -> str:
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
        return torch.autocast(_device_type(self.model), dtype=self.autocast_dtype)

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


@dataclass
class DeepSpeedEngine:
    """DeepSpeed ZeRO-1/2/3 around the model, with torch AdamW passed in (no compiled optimizer ops)."""

    ds: object
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    name: str = "deepspeed"
    config: dict = field(default_factory=dict)
    _skipped: int = 0

    def forward_backward(self, batch: dict, *, n_micro: int, last: bool) -> torch.Tensor:
        # DeepSpeed divides by gradient_accumulation_steps itself, reduces at the accumulation boundary and
        # steps the optimizer there, so its step() belongs after every micro batch.
        loss = self.ds(**to_device(batch, self.ds.device)).loss
        self.ds.backward(loss)
        self.ds.step()
        return loss.detach()

    def prime(self, micro_batches: list[dict]) -> None:
        """Make ZeRO build its (lazy) optimizer state with one zero-loss step at learning rate 0, so a
        checkpoint's moments can be written into it. The caller then puts the schedule back."""
        groups = self.scheduler.optimizer.param_groups
        saved = [g["lr"] for g in groups]
        for g in groups:
            g["lr"] = 0.0
        for batch in micro_batches:
            self.ds.backward(self.ds(**to_device(batch, self.ds.device)).loss * 0.0)
            self.ds.step()
        for g, lr in zip(groups, saved, strict=True):
            g["lr"] = lr

    def step(self, max_grad_norm: float | None, *, allow=None) -> float | None:
        # The optimizer stepped in forward_backward at the boundary; clipping is the config's
        # gradient_clipping, which fill_deepspeed_config set from max_grad_norm. ZeRO itself drops a step
        # whose global gradient norm is not finite (the same on every rank, the norm is all-reduced); then
        # the schedule is advanced here, as the torch engines do for a dropped step.
        norm = self.ds.get_global_grad_norm()
        norm = None if norm is None else float(norm)
        dropped = self.ds.skipped_steps > self._skipped
        self._skipped = self.ds.skipped_steps
        if dropped:
            self.scheduler.step()
        if allow is not None:  # the agreement (and the count); ZeRO has already applied or dropped the update
            allow(float("inf") if dropped else norm)
        return norm

    def full_value(self, p: torch.Tensor) -> torch.Tensor:
        from deepspeed.utils import safe_get_full_fp32_param

        return safe_get_full_fp32_param(p).detach().float().cpu()

    def full_optimizer_state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        from deepspeed.utils import safe_get_full_optimizer_state

        return {k: safe_get_full_optimizer_state(p, k).detach().float().cpu() for k in ADAM_KEYS}

    def load_optimizer_state(self, p: torch.Tensor, states: dict[str, torch.Tensor], step: int) -> None:
        from deepspeed.utils import safe_set_full_optimizer_state

        for k in ADAM_KEYS:
            safe_set_full_optimizer_state(p, states[k].to(torch.float32), k)
        for s in self.ds.optimizer.optimizer.state.values():
            s["step"] = torch.tensor(float(step)) if torch.is_tensor(s.get("step")) else step

    def local_optimizer_numel(self) -> int:
        inner = self.ds.optimizer.optimizer
        return sum(t.numel() for s in inner.state.values() for k, t in s.items() if k in ADAM_KEYS)


def build_torch_engine(name: str, model: nn.Module, make_optimizer, make_scheduler, *,
                       mixed_precision: str) -> TorchEngine:
    """Wrap for ``none`` / ``ddp`` / ``fsdp2``; the optimizer is built after wrapping (FSDP2's DTensors).

    ``mixed_precision=bf16``: FSDP2 casts parameters and inputs (``MixedPrecisionPolicy``); none and DDP keep
    an fp32 model and run each forward under ``torch.autocast(dtype=bfloat16)``."""
    runner = model
    if name == "ddp":
        # Frozen weights don't require grad, so DDP's buckets hold only the sparse values (and heads).
        runner = DistributedDataParallel(model, device_ids=_device_ids())
    elif name == "fsdp2":
        from spra_dist.fsdp import DEFAULT_MP, apply_fsdp2

        apply_fsdp2(model, mp_policy=DEFAULT_MP if mixed_precision == "bf16" else None)
    autocast = torch.bfloat16 if mixed_precision == "bf16" and name in ("none", "ddp") else None
    optimizer = make_optimizer(model)
    return TorchEngine(name, model, runner, optimizer, make_scheduler(optimizer), autocast_dtype=autocast)


def _device_type(model: nn.Module) -> str:
    param = next(model.parameters(), None)
    return "cpu" if param is None else param.device.type


def _device_ids() -> list[int] | None:
    return [torch.cuda.current_device()] if torch.cuda.is_available() else None


def load_deepspeed_config(path: str | None) -> dict:
    """A DeepSpeed JSON preset, by path or by name (``zero2`` → configs/deepspeed/zero2.json)."""
    path = path or os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if not path:
        stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
        path = str(PRESET_DIR / f"zero{stage}.json")
    file = Path(path)
    if not file.is_file() and (PRESET_DIR / f"{path}.json").is_file():
        file = PRESET_DIR / f"{path}.json"
    if not file.is_file():
        raise ValueError(f"deepspeed_config={path!r} not found; use a file path or one of "
                         f"{sorted(p.stem for p in PRESET_DIR.glob('*.json'))}")
    config = json.loads(file.read_text())
    if "optimizer" in config or "scheduler" in config:
        raise ValueError(f"{file}: remove the optimizer / scheduler blocks; spra_dist passes AdamW over the "
                         f"sparse values and its own schedule (lr, warmup_steps, schedule keys)")
    return config


def fill_deepspeed_config(config: dict, *, batch_size: int, grad_accum: int, world_size: int,
                          max_grad_norm: float | None, mixed_precision: str) -> dict:
    """Replace ``"auto"`` values with what the run uses; drop ``"auto"`` bucket sizes (DeepSpeed defaults)."""
    micro = batch_size // (world_size * grad_accum)
    filled = json.loads(json.dumps(config))
    auto = {
        "train_batch_size": batch_size, "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": grad_accum, "gradient_clipping": max_grad_norm or 0.0,
    }
    for key, value in auto.items():
        if filled.get(key, "auto") == "auto":
            filled[key] = value
    for key in ("bf16", "fp16"):
        section = filled.setdefault(key, {})
        if section.get("enabled", "auto") == "auto":
            section["enabled"] = key == "bf16" and mixed_precision == "bf16"
    zero = filled.get("zero_optimization", {})
    for key in [k for k, v in zero.items() if v == "auto"]:
        del zero[key]
    if not torch.cuda.is_available() and zero.get("overlap_comm"):
        # Overlap needs device streams; DeepSpeed's CPU accelerator has none, so it gains nothing and runs
        # a reduction path that is rarely exercised on CPU. Off there.
        zero["overlap_comm"] = False
    return filled


def build_deepspeed_engine(model: nn.Module, make_optimizer, make_scheduler, *, config: dict) -> DeepSpeedEngine:
    import deepspeed

    optimizer = make_optimizer(model)
    scheduler = make_scheduler(optimizer)
    ds, ds_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                  config=config)
    return DeepSpeedEngine(ds, model, ds_optimizer, scheduler, config=config)


def check_batch_split(batch_size: int, grad_accum: int) -> int:
    """The per-rank micro batch; ``ValueError`` when the global batch doesn't divide."""
    _, size = world()
    if batch_size % (size * grad_accum):
        raise ValueError(f"batch_size={batch_size} is the global batch and must divide by world size {size} × "
                         f"grad_accum {grad_accum}; use a multiple of {size * grad_accum}")
    return batch_size // (size * grad_accum)

