"""Writing the k merged entries into a frozen weight and restoring them bit for bit."""

from __future__ import annotations

import torch


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
        self.saved = self.flat[self.indices]
        self.flat.index_copy_(0, self.indices, merged_entries(self.saved, self.values))

    def __exit__(self, *exc) -> None:
        self.flat.index_copy_(0, self.indices, self.saved)
