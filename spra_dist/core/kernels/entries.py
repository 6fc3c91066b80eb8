"""Writing the k merged entries into a frozen weight and restoring them bit for bit."""

from __future__ import annotations

import torch


def put(flat: torch.Tensor, indices: torch.Tensor, entries: torch.Tensor) -> None:
    """``flat[indices] = entries`` for unique int32 or int64 ``indices`` (``index_copy_`` takes int64 only)."""
    if indices.dtype == torch.int64:
        flat.index_copy_(0, indices, entries)
    else:
        flat.index_put_((indices,), entries)


def merged_entries(originals: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``originals + values`` added in at least fp32, rounded once to the weight's dtype."""
    acc = torch.promote_types(originals.dtype, torch.float32)
    return (originals.to(acc) + values.to(acc)).to(originals.dtype)


class MergedWeight:
    """Context manager: the weight holds ``W + delta`` at the sampled positions inside the block only.

    The k originals are saved (a gather) and written back on exit, so the weight comes out bit-identical,
    also in bf16 (no add-then-subtract drift) and also when the block raises.
    """

    def __init__(self, weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor):
        self.flat, self.indices, self.values = weight.view(-1), indices, values

    def __enter__(self) -> None:
        self.saved = self.flat.index_select(0, self.indices)
        put(self.flat, self.indices, merged_entries(self.saved, self.values))

    def __exit__(self, *exc) -> None:
        put(self.flat, self.indices, self.saved)
