"""Process groups, seed-only mask sharing, and gathering the O(k) trainable state.

Masks never cross the wire: rank 0's seed is broadcast (8 bytes), every rank builds its masks, and a 64-bit
fingerprint per rank is all-gathered and compared. On a mismatch every rank raises the same error naming
the first differing key, so no rank is left waiting in a collective.
"""

from __future__ import annotations

import datetime
import os
import secrets

import torch
import torch.distributed as dist
from torch import nn

from spra_dist.masks import fingerprint as _fingerprint


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default group, or ``(0, 1)`` when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def launched_world_size() -> int:
    """The world size the launcher announced (torchrun, accelerate, deepspeed all set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(*, backend: str | None = None, timeout_s: int = 600) -> tuple[int, int]:
    """Join the group the launcher set up (no-op for a single process) and prove it is one group.

    A launcher misconfigured into unsynchronised processes (each believing it is alone) would otherwise
    train the same model N times without exchanging a gradient; here it fails loudly instead.
    """
    expected = launched_world_size()
    if expected > 1 and not dist.is_initialized():
        backend = backend or default_backend()
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    rank, size = world()
    if size != expected:
        raise RuntimeError(
            f"the launcher announced WORLD_SIZE={expected} but this process is in a group of {size}: the "
            f"processes are not one job. On CPU use launch/*.sh, which sets up gloo for every launcher"
        )
    if size > 1:
        probe = torch.ones(1)
        dist.all_reduce(probe)
        if int(probe.item()) != size:
            raise RuntimeError(f"all_reduce over {size} ranks gave {probe.item()}: the group does not synchronise")
    return rank, size


def shutdown() -> None:
    """Leave the group cleanly (the barrier avoids an abort in destroy_process_group when ranks straggle)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def agree_seed(seed: int | None, *, group: dist.ProcessGroup | None = None) -> int:
    """Rank 0's seed (drawn there if ``None``) on every rank: 8 bytes on the wire."""
    if not (dist.is_available() and dist.is_initialized()):
        return seed if seed is not None else secrets.randbits(62)
    rank = dist.get_rank(group)
    value = seed if seed is not None else (secrets.randbits(62) if rank == 0 else 0)
    t = torch.tensor([value], dtype=torch.int64)
    dist.broadcast(t, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    return int(t.item())


def _entries(model: nn.Module) -> list[tuple[str, tuple[int, ...], torch.Tensor]]:
    from spra_dist.model import spra_modules

    return [(m.spra_key, m.weight_shape, m.spra_indices) for _, m in spra_modules(model)]


def check_masks(model: nn.Module, *, group: dist.ProcessGroup | None = None) -> int:
    """All-gather each rank's mask fingerprint; on a mismatch raise on every rank, naming the first key."""
    cfg = model.spra_config
    config = repr(sorted(cfg.to_dict().items()))
    entries = _entries(model)
    total = _fingerprint(entries, config=config)
    if not (dist.is_available() and dist.is_initialized()):
        return total
    size = dist.get_world_size(group)
    mine = torch.tensor([total], dtype=torch.int64)
    gathered = [torch.zeros(1, dtype=torch.int64) for _ in range(size)]
    dist.all_gather(gathered, mine, group=group)
    if all(int(g.item()) == total for g in gathered):
        return total
    # Every rank sees the same gathered list, so every rank takes this branch: no one is left waiting.
    summary = {"config": config, "keys": [(e[0], _fingerprint([e], config=config)) for e in entries]}
    all_summaries: list[dict] = [{} for _ in range(size)]
    dist.all_gather_object(all_summaries, summary, group=group)
    raise RuntimeError(_mismatch_message(all_summaries))


def _mismatch_message(summaries: list[dict]) -> str:
    ref = summaries[0]
    for rank, other in enumerate(summaries[1:], start=1):
        if other["config"] != ref["config"]:
            return (f"SpaRA masks differ across ranks: rank {rank} has config {other['config']} but rank 0 has "
                    f"{ref['config']}; every rank must use the same spra settings")
        for (key0, fp0), (key1, fp1) in zip(ref["keys"], other["keys"], strict=False):
            if key0 != key1 or fp0 != fp1:
                return (f"SpaRA masks differ across ranks at {key0!r} (rank 0) vs {key1!r} (rank {rank}): the "
                        f"ranks built different models or masks; use the same model and spra config everywhere")
        if len(other["keys"]) != len(ref["keys"]):
            return f"SpaRA masks differ across ranks: rank {rank} adapts {len(other['keys'])} layers, rank 0 " \
                   f"{len(ref['keys'])}"
    return "SpaRA mask fingerprints differ across ranks"


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside DDP / a DeepSpeed engine / accelerate's wrappers."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def full_tensor(p: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank, whatever engine holds it: FSDP2 DTensor, ZeRO-3 partition or plain.

    A collective under FSDP2 and ZeRO-3: call it on every rank.
    """
    if hasattr(p, "full_tensor"):
        return p.full_tensor()
    if hasattr(p, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
            return p.data.detach().clone()
    return p.detach()
