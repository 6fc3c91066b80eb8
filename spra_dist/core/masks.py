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

Run ``python -m spra_dist.core.masks`` to print a few indices for a quick look.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

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
    """splitmix64 of ``skey + (counter + 1) * gamma``; uint64 arithmetic wraps modulo 2**64.

    Written in place on one scratch array: this is a third of the time of rebuilding a large model's masks.
    """
    z = counters + np.uint64(1)
    z *= _GAMMA
    z += np.uint64(skey)
    t = np.empty_like(z)
    for shift, mult in ((30, _MIX1), (27, _MIX2)):
        np.right_shift(z, np.uint64(shift), out=t)
        z ^= t
        z *= mult
    np.right_shift(z, np.uint64(31), out=t)
    z ^= t
    return z


def _draw(skey: int, start: int, count: int, numel: int) -> np.ndarray:
    """Uniform integers in ``[0, numel)`` for stream counters ``start .. start+count``, in stream order.

    Hash outputs at or above the largest multiple of ``numel`` are dropped, so ``% numel`` is unbiased.
    """
    z = _hash(np.arange(start, start + count, dtype=np.uint64), skey)
    limit = (_TWO64 // numel) * numel
    if limit < _TWO64:
        rejected = z >= np.uint64(limit)
        if rejected.any():  # rare unless numel is near 2**64: skip the copy otherwise
            z = z[~rejected]
    z %= np.uint64(numel)
    return z


def _isin_sorted(values: np.ndarray, sorted_pool: np.ndarray) -> np.ndarray:
    if sorted_pool.size == 0:
        return np.zeros(values.shape, dtype=bool)
    pos = np.minimum(np.searchsorted(sorted_pool, values), sorted_pool.size - 1)
    return sorted_pool[pos] == values


def _sorted_unique(values: np.ndarray) -> np.ndarray:
    # np.unique (numpy 2.x) goes through a hash table first: several times slower than sort + compare.
    s = np.sort(values)
    return s[np.concatenate(([True], s[1:] != s[:-1]))] if s.size else s


class _Stream:
    """The stream's accepted draws, read front to back in pieces of any size.

    Rejection depends only on each draw's value, so how the counters are blocked never changes the stream.
    """

    def __init__(self, skey: int, numel: int):
        self.skey, self.numel, self.counter = skey, numel, 0
        self.buf = np.empty(0, dtype=np.uint64)

    def take(self, n: int) -> np.ndarray:
        while self.buf.size < n:
            missing = n - self.buf.size
            count = missing + missing // 1024 + 16  # rejection is rare: a little slack saves a second pass
            drawn = _draw(self.skey, self.counter, count, self.numel)
            self.buf = np.concatenate([self.buf, drawn]) if self.buf.size else drawn
            self.counter += count
        out, self.buf = self.buf[:n], self.buf[n:]
        return out


def _first_distinct(skey: int, numel: int, k: int) -> np.ndarray:
    """The first ``k`` distinct values of the stream, returned sorted.

    The next ``need = k - len(taken)`` draws hold at most ``need`` values not yet taken, and each of them
    first appears before the k-th distinct value does, so all of them belong to the set: no stream-order
    bookkeeping (stable argsort) is needed, only one sort of the draws per round. Round one reads ``k``
    draws; later rounds only make up for the few repeats (about k²/2·numel).
    """
    stream = _Stream(skey, numel)
    taken = _sorted_unique(stream.take(k))
    while taken.size < k:
        new = _sorted_unique(stream.take(k - taken.size))
        new = new[~_isin_sorted(new, taken)]
        taken = np.insert(taken, np.searchsorted(taken, new), new)  # merge two sorted, disjoint arrays
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
        keep = np.ones(numel, dtype=bool)  # numel < 2k here, so this is still O(k)
        keep[_first_distinct(skey, numel, numel - k)] = False
        out = np.flatnonzero(keep).astype(np.int64)
    else:
        out = _first_distinct(skey, numel, k).astype(np.int64)
    return torch.from_numpy(out)


def host_threads() -> int:
    """Threads for building and hashing masks: this process's CPUs, shared with the other ranks on the node
    (``LOCAL_WORLD_SIZE``, which torchrun, deepspeed and accelerate set), at least one."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)))


def budget(shape: tuple[int, ...], *, lora_rank: int | None, density: float | None) -> int:
    """Trainable entries for a 2-D weight: ``r * (n_in + n_out)`` capped at numel, or ``density * numel``."""
    numel = int(np.prod(shape))
    if lora_rank is not None:
        k = lora_rank * sum(shape)
    else:
        assert density is not None
        k = round(density * numel)
    return max(1, min(int(k), numel))


def fingerprint(entries: Iterable[tuple[str, tuple[int, ...], torch.Tensor]], *, config: str,
                threads: int | None = None) -> int:
    """64-bit fingerprint over mask_version, a config string and every (key, shape, k, indices).

    Ranks compare this number to prove they built the same masks without sending any index. Each matrix is
    hashed on its own (in ``threads`` threads: blake2b releases the GIL), straight from the indices' memory in
    the narrowest dtype their matrix allows, and the total hashes those digests in order.
    """
    entries = list(entries)
    h = hashlib.blake2b(digest_size=8)
    h.update(f"v{MASK_VERSION}|{config}|{len(entries)}".encode())
    workers = threads or host_threads()
    if workers > 1 and len(entries) > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            digests = list(pool.map(lambda e: _matrix_digest(*e), entries))
    else:
        digests = [_matrix_digest(*e) for e in entries]
    for d in digests:
        h.update(d)
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)


def _matrix_digest(key: str, shape: tuple[int, ...], indices: torch.Tensor) -> bytes:
    numel = int(np.prod(shape))
    dtype = torch.int32 if numel < 2**31 else torch.int64  # as the layer keeps them, so usually no copy
    flat = indices.detach().to(device="cpu", dtype=dtype).contiguous().numpy()
    h = hashlib.blake2b(f"{key}|{tuple(shape)}|{flat.size}|".encode(), digest_size=16)
    h.update(memoryview(flat).cast("B"))
    return h.digest()


if __name__ == "__main__":
    print(sample_indices(1234, "model.layers.0.self_attn.q_proj.weight", 576 * 576, 8).tolist())
