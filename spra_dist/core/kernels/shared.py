"""Tensors derived from a layer input, made once and shared by the sibling layers that read the same input.

Attention's q/k/v projections (and an MLP's gate/up) all read one tensor, and their backwards run one after
another. Each would otherwise make its own feature-major copy of it for the values' gradient. ``per_input``
keeps the most recent few: an entry is used only while the tensor it was made from is alive (so its memory
cannot have been reused by another tensor) and unmodified (its version counter); it goes when that tensor is
freed or when newer entries push it out, so at most ``KEEP`` copies outlive their use.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable

import torch

KEEP = 2
_ENTRIES: dict[tuple[int, Hashable], tuple[weakref.ref, int, torch.Tensor]] = {}  # oldest first
counts = {"made": 0, "shared": 0}  # for tests and profiles
enabled = True  # False: every call makes its own (for tests and profiles)


def per_input(x: torch.Tensor, tag: Hashable, make: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``make()``, computed once per (``x``, ``tag``) while ``x`` lives unmodified."""
    if not enabled or torch.compiler.is_compiling():  # traced code must not depend on Python-side state
        return make()
    key = (id(x), tag)
    hit = _ENTRIES.get(key)
    if hit is not None and hit[0]() is x and hit[1] == x._version:
        counts["shared"] += 1
        return hit[2]
    counts["made"] += 1
    value = make()
    if value is x:  # caching x under its own key would keep it alive forever
        return value
    try:
        ref = weakref.ref(x, lambda _, key=key: _ENTRIES.pop(key, None))
    except TypeError:  # not weak-referenceable: no sharing
        return value
    _ENTRIES[key] = (ref, x._version, value)
    while len(_ENTRIES) > KEEP:
        _ENTRIES.pop(next(iter(_ENTRIES)))
    return value


def live_entries() -> int:
    """How many derived tensors are held now (0 once the inputs they came from are freed)."""
    return len(_ENTRIES)
