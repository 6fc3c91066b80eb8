"""Seed-only mask sharing: ranks agree on the mask seed and prove they built the same masks.

Masks never cross the wire: rank 0's seed is broadcast (8 bytes), every rank builds its masks, and a 64-bit
fingerprint per rank is all-gathered and compared. On a mismatch every rank raises the same error naming the first
differing key, so no rank is left waiting in a collective.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

import torch
import torch.distributed as dist

from spra_dist.core.masks import fingerprint as _fingerprint
from spra_dist.distributed.devices import collective_device

MaskEntry = tuple[str, tuple[int, ...], torch.Tensor]
"""``(key, weight shape, sorted flat indices)`` of one adapted matrix."""


def agree_seed(seed: int | None, *, group: dist.ProcessGroup | None = None) -> int:
    """Rank 0's seed (drawn there if ``None``) on every rank: 8 bytes on the wire."""
    if not (dist.is_available() and dist.is_initialized()):
        return seed if seed is not None else secrets.randbits(62)
    rank = dist.get_rank(group)
    value = seed if seed is not None else (secrets.randbits(62) if rank == 0 else 0)
    t = torch.tensor([value], dtype=torch.int64, device=collective_device(group))
    dist.broadcast(t, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    return int(t.item())


def check_masks(entries: Sequence[MaskEntry], *, config: dict, group: dist.ProcessGroup | None = None) -> int:
    """All-gather each rank's mask fingerprint; on a mismatch raise on every rank, naming what differs.

    ``config`` is the SpaRA config as the user gave it (seed possibly None): a rank asking for another explicit
    seed, density or target list is a mismatch even though the broadcast seed would hide it.
    """
    total, mismatch = compare_masks(entries, config=config, group=group)
    if mismatch:
        raise RuntimeError(f"{mismatch}. Give every rank the same model and spra settings")
    return total


def compare_masks(entries: Sequence[MaskEntry], *, config: dict, group: dist.ProcessGroup | None = None,
                  labels: Sequence[str] | None = None, reference: int = 0) -> tuple[int, str | None]:
    """This rank's fingerprint, and ``None`` when every rank of ``group`` has the same one, else a message naming
    the first differing key (the same message on every rank, so every rank can raise and none is left waiting).

    ``labels``: what to call each rank of the group in the message (default ``rank i``); ``reference``: the group
    rank the others are compared with. A collective: call it on every rank of ``group``.
    """
    config = repr(sorted(config.items()))
    total = _fingerprint(entries, config=config)
    if not (dist.is_available() and dist.is_initialized()):
        return total, None
    size = dist.get_world_size(group)
    device = collective_device(group)
    gathered = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(size)]
    dist.all_gather(gathered, torch.tensor([total], dtype=torch.int64, device=device), group=group)
    if all(int(g.item()) == total for g in gathered):
        return total, None
    # Every rank sees the same gathered list, so every rank takes this branch: no one is left waiting.
    summary = {"config": config, "keys": [(e[0], _fingerprint([e], config="")) for e in entries]}
    summaries: list[dict] = [{} for _ in range(size)]
    dist.all_gather_object(summaries, summary, group=group)
    return total, _mismatch_message(summaries, list(labels or [f"rank {i}" for i in range(size)]), reference)


def _mismatch_message(summaries: list[dict], labels: list[str], reference: int) -> str:
    ref, ref_label = summaries[reference], labels[reference]
    for rank, other in enumerate(summaries):
        if rank == reference:
            continue
        label = labels[rank]
        first = next((repr(a[0]) if a[0] == b[0] else f"{a[0]!r} on {ref_label}, {b[0]!r} on {label}"
                      for a, b in zip(ref["keys"], other["keys"], strict=False) if a != b), None)
        if first is None and len(ref["keys"]) != len(other["keys"]):
            first = f"layer count: {ref_label} adapts {len(ref['keys'])}, {label} {len(other['keys'])}"
        if first is None and other["config"] == ref["config"]:
            continue
        where = f"the first differing mask is {first}" if first else "the masks agree but the settings don't"
        return (f"SpaRA masks differ across ranks: {where}; {ref_label} has spra config {ref['config']}, "
                f"{label} has {other['config']}")
    return "SpaRA mask fingerprints differ across ranks"
