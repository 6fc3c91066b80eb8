"""Random sparse masks as a pure function of ``(seed, key, numel, k)``.

Every rank, device and library version must rebuild exactly the same indices from the seed, because
adapter files store only values, never indices. So this module uses no torch RNG: it draws from a
counter-based hash (splitmix64's finaliser) in unsigned 64-bit numpy arithmetic, which wraps modulo
2**64 by definition and is computed on the CPU, whatever device the model lives on.

The algorithm (``MASK_VERSION`` 1) reads a stream ``u_0, u_1, ...`` of uniform integers in ``[0, numel)``
and keeps the first ``k`` distinct values in stream order. Sequential sampling without replacement is
uniform over ordered k-tuples of distinct values, so the set is uniform over k-subsets. Draws are
vectorised in batches of about ``k``, so time is O(k log k) and memory O(k): no tensor of ``numel``
entries is ever made. When ``k > numel / 2`` the complement (``numel - k`` entries) is drawn instead, so
rejection never degenerates; then ``numel < 2k`` and an O(numel) step is still O(k).

Saved adapters depend on this forever: any change to the output is a new ``MASK_VERSION``, and the golden
vectors in ``tests/test_masks.py`` pin version 1.

Run ``python -m spra_dist.masks`` to print a few indices for a quick look.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np
import torch

MASK_VERSION = 1
SUPPORTED_MASK_VERSIONS = (1,)

_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_TWO64 = 1 << 64


def stream_key(seed: int, key: str, numel: int) -> int:
    """The 64-bit key of the random stream for one matrix (independent of ``k``, so masks nest)."""
    text = f"spra-mask-v{MASK_VERSION}|{int(seed)}|{key}|{int(numel)}"
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def _hash(counters: np.ndarray, skey: int) -> np.ndarray:
    """splitmix64 of ``skey + (counter + 1) * gamma``; uint64 arithmetic wraps modulo 2**64."""
    z = np.uint64(skey) + (counters + np.uint64(1)) * _GAMMA
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


def _draw(skey: int, start: int, count: int, numel: int) -> np.ndarray:
    """Uniform integers in ``[0, numel)`` for stream counters ``start .. start+count``, in stream order.

    Hash outputs at or above the largest multiple of ``numel`` are dropped, so ``% numel`` is unbiased.
    """
    z = _hash(np.arange(start, start + count, dtype=np.uint64), skey)
    limit = (_TWO64 // numel) * numel
    if limit < _TWO64:
        z = z[z < np.uint64(limit)]
    return z % np.uint64(numel)


def _isin_sorted(values: np.ndarray, sorted_pool: np.ndarray) -> np.ndarray:
    if sorted_pool.size == 0:
        return np.zeros(values.shape, dtype=bool)
    pos = np.minimum(np.searchsorted(sorted_pool, values), sorted_pool.size - 1)
    return sorted_pool[pos] == values


def _first_distinct(skey: int, numel: int, k: int) -> np.ndarray:
    """The first ``k`` distinct values of the stream, returned sorted."""
    taken = np.empty(0, dtype=np.uint64)
    start = 0
    while taken.size < k:
        need = k - taken.size
        count = need + need // 16 + 16  # slack for duplicates and rejected draws
        cand = _draw(skey, start, count, numel)
        start += count
        cand = cand[~_isin_sorted(cand, taken)]
        _, first = np.unique(cand, return_index=True)
        first.sort()  # first occurrences, back in stream order
        # Taking fewer than all candidates only happens on the last round, so nothing is skipped.
        taken = np.union1d(taken, cand[first[:need]])
    return taken


def sample_indices(seed: int, key: str, numel: int, k: int) -> torch.Tensor:
    """Sorted, unique int64 flat indices: a uniformly random ``k``-subset of ``range(numel)``.

    A pure function of its arguments: the same on every device, rank, thread count and run.
    ``key`` is the parameter's name in the unwrapped model, e.g. ``model.layers.3.self_attn.v_proj.weight``.
    """
    numel, k = int(numel), int(k)
    if numel < 1:
        raise ValueError(f"numel must be >= 1, got {numel}")
    if not 1 <= k <= numel:
        raise ValueError(f"k must be in [1, numel={numel}], got {k}")
    skey = stream_key(seed, key, numel)
    if k == numel:
        out = np.arange(numel, dtype=np.int64)
    elif 2 * k > numel:
        complement = _first_distinct(skey, numel, numel - k).astype(np.int64)
        out = np.setdiff1d(np.arange(numel, dtype=np.int64), complement, assume_unique=True)
    else:
        out = _first_distinct(skey, numel, k).astype(np.int64)
    return torch.from_numpy(out)


def budget(shape: tuple[int, ...], *, lora_rank: int | None, density: float | None) -> int:
    """Trainable entries for a 2-D weight: ``r * (n_in + n_out)`` capped at numel, or ``density * numel``."""
    numel = int(np.prod(shape))
    if lora_rank is not None:
        k = lora_rank * sum(shape)
    else:
        assert density is not None
        k = round(density * numel)
    return max(1, min(int(k), numel))


def fingerprint(entries: Iterable[tuple[str, tuple[int, ...], torch.Tensor]], *, config: str) -> int:
    """64-bit fingerprint over mask_version, a config string and every (key, shape, k, indices).

    Ranks compare this number to prove they built the same masks without sending any index.
    """
    h = hashlib.blake2b(digest_size=8)
    h.update(f"v{MASK_VERSION}|{config}".encode())
    for key, shape, indices in entries:
        h.update(f"|{key}|{tuple(shape)}|{indices.numel()}|".encode())
        h.update(indices.detach().cpu().to(torch.int64).numpy().tobytes())
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)


if __name__ == "__main__":
    print(sample_indices(1234, "model.layers.0.self_attn.q_proj.weight", 576 * 576, 8).tolist())
