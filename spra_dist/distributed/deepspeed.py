"""DeepSpeed ZeRO-1/2/3 as an Engine, and the JSON presets that ship inside the package.

    config = fill_deepspeed_config(load_deepspeed_config("zero2"), batch_size=32, grad_accum=1, world_size=8,
                                   max_grad_norm=1.0, mixed_precision="bf16")
    engine = build_deepspeed_engine(model, make_optimizer, make_scheduler, config=config)

The presets (``presets/zero1.json`` ... ``zero3_offload.json``) are package data, read with ``importlib.resources``,
so a wheel install finds them from any directory. They hold no optimizer or scheduler block: spra_dist passes torch
AdamW over the sparse values and its own schedule, and fills the presets' ``"auto"`` values from the run.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from spra_dist.distributed.devices import to_device

ADAM_KEYS = ("exp_avg", "exp_avg_sq")
PRESETS = files("spra_dist.distributed") / "presets"
# DeepSpeed's CPU allreduce buffer of one rank: deepspeed/ops/csrc/cpu/comm/shm.cpp, shm_initialize.
SHM_BUFFER = "/dev/shm/deepspeed_allreduce_buffer_{uid}_{addr}_{port}_{rank}"


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


def preset_names() -> list[str]:
    """The DeepSpeed presets that ship with spra_dist: ``zero1``, ``zero2``, ``zero3``, ``zero3_offload``."""
    return sorted(f.name.removesuffix(".json") for f in PRESETS.iterdir() if f.name.endswith(".json"))


def load_deepspeed_config(path: str | None) -> dict:
    """A DeepSpeed JSON config: a file path, or the name of a preset (``zero2``), read from the installed package.

    ``None``: what accelerate's launcher says (its config file, else its ZeRO stage's preset)."""
    path = path or os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if not path:
        path = f"zero{os.environ.get('ACCELERATE_DEEPSPEED_ZERO_STAGE', '2')}"
    if Path(path).is_file():
        where, text = path, Path(path).read_text()
    elif path in preset_names():
        where, text = f"preset {path}", (PRESETS / f"{path}.json").read_text()
    else:
        raise ValueError(f"deepspeed_config={path!r} not found; use a file path or one of {preset_names()}")
    config = json.loads(text)
    if "optimizer" in config or "scheduler" in config:
        raise ValueError(f"{where}: remove the optimizer / scheduler blocks; spra_dist passes AdamW over the "
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

    start_deepspeed_comm()
    optimizer = make_optimizer(model)
    scheduler = make_scheduler(optimizer)
    ds, ds_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                  config=config)
    return DeepSpeedEngine(ds, model, ds_optimizer, scheduler, config=config)


def start_deepspeed_comm() -> None:
    """Start DeepSpeed's comm layer on the torch group already joined (a collective: every rank calls it), then
    remove this rank's shared-memory buffer name (:func:`release_shared_memory`). Calling it again is harmless."""
    import deepspeed

    # On the group already joined (gloo on CPU); without one, DeepSpeed starts its own with its default backend.
    deepspeed.init_distributed(dist_backend=dist.get_backend() if dist.is_initialized() else None)
    release_shared_memory()


def shm_buffer_path(rank: int | None = None) -> Path:
    """The file of rank ``rank``'s (default: this rank's) DeepSpeed CPU allreduce buffer in this job."""
    rank = dist.get_rank() if rank is None else rank
    return Path(SHM_BUFFER.format(uid=os.getuid(), addr=os.environ.get("MASTER_ADDR", ""),
                                  port=os.environ.get("MASTER_PORT", ""), rank=rank))


def release_shared_memory() -> None:
    """Unlink this rank's DeepSpeed CPU allreduce buffer once every rank has mapped it (a collective).

    When every rank of a job runs on one host and the launcher sets ``LOCAL_SIZE`` (DeepSpeed's own does), each
    rank creates ``/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>`` (66 MiB) and maps every
    peer's while DeepSpeed's comm starts. DeepSpeed 0.19 never unlinks them (its ``shared_close`` is never
    called), so each job left them in RAM, finished or killed. No rank opens one again after the start, so once
    every rank is past it (the barrier) the names can go: the mappings stay valid, and the kernel frees the memory
    when the last rank exits, however the job ends. launch/deepspeed.sh removes what a rank killed before this
    point left."""
    if dist.get_world_size() > 1:
        dist.barrier()
    shm_buffer_path().unlink(missing_ok=True)
