"""Tokenised examples on Arrow, packing, the batch order, and collate.

    idx = global_batch(len(train), batch_size=32, step=7, seed=0)   # the same on every rank
    mine = rank_slice(idx, rank=0, world_size=1)                    # this rank's share
    for micro in split_micro(mine, grad_accum=2): batch = collate(train, micro, pad_id=...)

Every optimizer step draws its global batch from (seed, step) alone, so any rank, world size or resumed run
reads the same examples in the same order; a rank takes a contiguous slice of it. With packing, an item is a
pack (whole examples in one row of at most max_length tokens), and the order is over packs.
"""

from __future__ import annotations

import bisect
from functools import lru_cache

import numpy as np
import torch

IGNORE = -100


def column(ds, name: str) -> np.ndarray:
    """One int column as an int64 array, read as one Arrow slice (not row by row)."""
    if not len(ds):
        return np.zeros(0, dtype=np.int64)
    return np.asarray(ds.select_columns([name]).with_format("numpy")[:][name], dtype=np.int64)


class TokenSet:
    """Examples in a memory-mapped ``datasets.Dataset`` (input_ids, labels or label, length, n_trained),
    optionally grouped into packs. ``len`` counts items: examples, or packs when packed."""

    def __init__(self, ds, *, packs: list[list[int]] | None = None) -> None:
        self.ds = ds
        self.packs = packs
        self.classification = "label" in ds.column_names
        self._lengths = column(ds, "length")
        self._pack_lengths = None if packs is None else np.array([self._lengths[p].sum() for p in packs],
                                                                 dtype=np.int64)
        self._trained = column(ds, "n_trained") if "n_trained" in ds.column_names else np.zeros(len(ds), np.int64)

    def __len__(self) -> int:
        return len(self.packs) if self.packs is not None else len(self.ds)

    def lengths(self) -> np.ndarray:
        """Tokens per item."""
        return self._lengths if self._pack_lengths is None else self._pack_lengths

    def n_trained(self, items: list[int]) -> int:
        """Supervised (next-token) targets in these items: the loss's denominator."""
        if self.packs is not None:
            items = [i for item in items for i in self.packs[item]]
        return int(self._trained[items].sum())

    def example(self, i: int) -> dict:
        return self.ds[int(i)]

    def rows(self, items: list[int]) -> list[list[dict]]:
        """Per item, its examples (one, or a pack's)."""
        groups = [self.packs[i] for i in items] if self.packs is not None else [[i] for i in items]
        flat = [int(i) for g in groups for i in g]
        cols = self.ds[flat]
        examples = [{k: cols[k][n] for k in cols} for n in range(len(flat))]
        out, pos = [], 0
        for g in groups:
            out.append(examples[pos: pos + len(g)])
            pos += len(g)
        return out


def pack(lengths: np.ndarray, max_length: int) -> list[list[int]]:
    """Best-fit decreasing: whole examples into rows of at most ``max_length`` tokens, never split. A pure
    function of the lengths; each pack lists its examples in their original order."""
    order = np.argsort(-lengths, kind="stable")
    packs: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, pack id), sorted
    for i in order.tolist():
        need = int(lengths[i])
        at = bisect.bisect_left(free, (need, -1))
        if at < len(free):
            room, p = free.pop(at)
        else:
            room, p = max_length, len(packs)
            packs.append([])
        packs[p].append(i)
        if room - need > 0:
            bisect.insort(free, (room - need, p))
    return [sorted(p) for p in packs]


# --------------------------------------------------------------------------- batch order


@lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    # numpy's PCG64 stream is stable across versions and platforms, so the order is a pure function.
    return np.random.default_rng([seed, epoch]).permutation(n)


def global_batch(n: int, *, batch_size: int, step: int, seed: int) -> list[int]:
    """Indices of step ``step``'s global batch: epochs are seeded permutations of range(n), read as one
    stream, so step s covers stream positions [s * batch_size, (s + 1) * batch_size)."""
    out: list[int] = []
    pos = step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(pos, n)
        take = min(batch_size - len(out), n - offset)
        out += _epoch_order(n, seed, epoch)[offset: offset + take].tolist()
        pos += take
    return out


def rank_slice(indices: list[int], *, rank: int, world_size: int) -> list[int]:
    """This rank's contiguous share of a global batch."""
    if len(indices) % world_size:
        raise ValueError(f"batch_size={len(indices)} is not divisible by the world size {world_size}; "
                         "pick a batch_size that is a multiple of the number of ranks")
    per = len(indices) // world_size
    return indices[rank * per: (rank + 1) * per]


def split_micro(indices: list[int], grad_accum: int, *, lengths=None) -> list[list[int]]:
    """Cut a rank's share into grad_accum equal micro batches; with ``lengths``, examples of similar length
    share a micro batch (stable sort), so less compute goes to padding."""
    if len(indices) % grad_accum:
        raise ValueError(f"a rank's batch of {len(indices)} is not divisible by grad_accum={grad_accum}; "
                         "make batch_size a multiple of world size x grad_accum")
    if lengths is not None:
        indices = sorted(indices, key=lambda i: lengths[i])
    per = len(indices) // grad_accum
    return [indices[i: i + per] for i in range(0, len(indices), per)]


# --------------------------------------------------------------------------- collate


def collate(tokens: TokenSet, items: list[int], *, pad_id: int) -> dict:
    """Right-padded tensors: input_ids, attention_mask, labels (class ids, or token labels with -100 where
    nothing is trained). Packed items give position_ids restarting per document and no attention_mask, the
    form in which transformers' attention keeps the documents apart (its packed-sequence path)."""
    groups = tokens.rows(items)
    if tokens.packs is not None:
        return _collate_packed(groups, pad_id=pad_id)
    seqs = [g[0]["input_ids"] for g in groups]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
    for row, g in enumerate(groups):
        n = len(g[0]["input_ids"])
        ids[row, :n] = torch.tensor(g[0]["input_ids"], dtype=torch.long)
        mask[row, :n] = 1
        if not tokens.classification:
            labels[row, :n] = torch.tensor(g[0]["labels"], dtype=torch.long)
    if tokens.classification:
        labels = torch.tensor([g[0]["label"] for g in groups], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _collate_packed(groups: list[list[dict]], *, pad_id: int) -> dict:
    width = max(sum(len(e["input_ids"]) for e in g) for g in groups)
    ids = torch.full((len(groups), width), pad_id, dtype=torch.long)
    labels = torch.full((len(groups), width), IGNORE, dtype=torch.long)
    pos = torch.zeros((len(groups), width), dtype=torch.long)
    for row, g in enumerate(groups):
        at = 0
        for e in g:
            n = len(e["input_ids"])
            ids[row, at: at + n] = torch.tensor(e["input_ids"], dtype=torch.long)
            doc = torch.tensor(e["labels"], dtype=torch.long)
            doc[0] = IGNORE  # the previous document's last token must not learn to predict this one's first
            labels[row, at: at + n] = doc
            pos[row, at: at + n] = torch.arange(n)
            at += n
        pos[row, at:] = torch.arange(width - at)  # padding is one more document, never attended to
    return {"input_ids": ids, "labels": labels, "position_ids": pos, "use_cache": False}
