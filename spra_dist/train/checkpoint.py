"""Portable resume checkpoints: O(k) state that resumes under any engine and world size.

A checkpoint is ``output_dir/checkpoints/step-NNNNNNNN/`` holding ``state.safetensors`` (per trainable
parameter, by its unwrapped name: the full value and the full AdamW moments; the CPU RNG state) and
``trainer_state.json`` (step, engine, world size, mask seed, the run's config, a sha256 of the tensors). Values
and moments are gathered from whatever engine holds them and laid out again by the engine that resumes, so a run
saved under ZeRO-3 at 4 ranks resumes under FSDP2 at 2 ranks or in one process. Writes are atomic; a truncated
or foreign checkpoint is refused with an error naming the file. What a resume may change: spra_dist.train.resume.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from spra_dist.core.model import trainable_parameters
from spra_dist.distributed.engines import ADAM_KEYS
from spra_dist.distributed.group import on_rank0, world
from spra_dist.distributed.loading import LoadPlan
from spra_dist.utils.atomic import atomic_files, read_verified_json, remove_files, sha256_file, write_safetensors

FORMAT = "spra_dist.checkpoint"
STATE_NAME = "state.safetensors"
META_NAME = "trainer_state.json"
RNG_KEY = "rng::torch_cpu"


@dataclass
class Checkpoint:
    path: Path
    step: int
    meta: dict
    tensors: dict[str, torch.Tensor]


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"step-{step:08d}"


def gather_state(engine) -> dict[str, torch.Tensor]:
    """Full values and AdamW moments of every trainable parameter (a collective on sharded engines)."""
    tensors: dict[str, torch.Tensor] = {}
    for name, p in trainable_parameters(engine.model):
        tensors[name] = engine.full_value(p).detach().cpu().contiguous()
        for key, value in engine.full_optimizer_state(p).items():
            tensors[f"{name}::{key}"] = value.detach().cpu().float().contiguous()
    tensors[RNG_KEY] = torch.get_rng_state()
    return tensors


def save_checkpoint(engine, output_dir: str | Path, *, step: int, mask_seed: int, keep: int = 2,
                    config: dict | None = None) -> Path:
    """Gather on every rank, write on rank 0 (atomically), keep the newest ``keep`` checkpoints. ``config``: the
    run's settings (``to_dict(cfg)``), which a resume is checked against (spra_dist.train.resume)."""
    tensors = gather_state(engine)
    path = checkpoint_dir(output_dir, step)

    def write() -> None:
        with atomic_files(path) as tmp:
            write_safetensors(tensors, tmp / STATE_NAME, metadata={"format": "pt", "spra_format": FORMAT})
            meta = {"format": FORMAT, "step": step, "engine": engine.name, "world_size": world()[1],
                    "mask_seed": mask_seed, "sha256": sha256_file(tmp / STATE_NAME)}
            if config is not None:
                meta["config"] = config
            (tmp / META_NAME).write_text(json.dumps(meta, indent=2) + "\n")
        for old in sorted(path.parent.glob("step-*"))[:-keep] if keep > 0 else []:  # only after a good write
            remove_files(old, (STATE_NAME, META_NAME))

    on_rank0(write)  # on a full disk every rank stops with the same error; the last good checkpoint stays
    return path


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read and verify one checkpoint directory; ``ValueError`` naming the file and the problem."""
    path = Path(path)
    meta, state_file = read_verified_json(path, META_NAME, STATE_NAME, fmt=FORMAT, checksum_key="sha256",
                                          what="spra_dist checkpoint")
    return Checkpoint(path, int(meta["step"]), meta, load_file(str(state_file)))


def find_latest(output_dir: str | Path) -> Checkpoint | None:
    """The newest checkpoint that verifies; damaged newer ones are skipped with a warning."""
    for path in sorted((Path(output_dir) / "checkpoints").glob("step-*"), reverse=True):
        try:
            return read_checkpoint(path)
        except ValueError as e:
            warnings.warn(f"skipping checkpoint {path}: {e}", stacklevel=2)
    return None


def resolve_resume(resume: str | None, output_dir: str | Path) -> Checkpoint | None:
    """``resume``: None/"" (start fresh), ``auto`` (newest complete one, if any) or a checkpoint path."""
    if not resume:
        return None
    if resume == "auto":
        return find_latest(output_dir)
    return read_checkpoint(resume)


def load_values(model: nn.Module, ckpt: Checkpoint, *, plan: LoadPlan | None = None) -> None:
    """Copy the checkpoint's values into the plain (not yet wrapped) model's trainable parameters, or, for a model
    built on the meta device, into ``plan``, which writes them when the engine loads the base."""
    params = dict(trainable_parameters(model))
    missing = sorted(set(params) - set(ckpt.tensors))
    if missing:
        raise ValueError(f"checkpoint {ckpt.path} lacks {missing[:3]}: it belongs to another model or spra config")
    with torch.no_grad():
        for name, p in params.items():
            value = ckpt.tensors[name]
            if value.shape != p.shape:
                raise ValueError(f"checkpoint {ckpt.path}: {name} has shape {list(value.shape)}, the model "
                                 f"{list(p.shape)}: it belongs to another model or spra config")
            if plan is not None:
                plan.initial[name] = value.to(p.dtype)
            else:
                p.copy_(value.to(p.dtype))
    torch.set_rng_state(ckpt.tensors[RNG_KEY])


def load_optimizer(engine, ckpt: Checkpoint) -> None:
    """Lay the checkpoint's AdamW moments out in the resuming engine's own sharding."""
    for name, p in trainable_parameters(engine.model):
        states = {k: ckpt.tensors[f"{name}::{k}"] for k in ADAM_KEYS}
        engine.load_optimizer_state(p, states, ckpt.step)
