"""build_data: a DataConfig -> train and eval TokenSets (tokenised once, cached as Arrow, packed if asked).

    splits = build_data(cfg.data, task="causal_lm", codec=built.codec, num_labels=2, timeout_s=300)
    splits.train, splits.eval, splits.label_names, splits.stats

Your files (data.datasets) are tokenised with ``datasets.map`` into the on-disk cache (spra_dist.data.cache);
the bundled sources are small and tokenised in memory by the same builders.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import warnings
from dataclasses import dataclass, field

import numpy as np

from spra_dist.data import chat, formats
from spra_dist.data.cache import cache_key, cache_root, prepared
from spra_dist.data.codec import Codec
from spra_dist.data.config import DATA_SOURCES, DataConfig, DatasetEntry
from spra_dist.data.load import file_signature, hold_out, load_entry, require_columns, resolve_files
from spra_dist.data.tokens import TokenSet, column, pack
from spra_dist.demos import sources

BUILDERS = {"text": formats.build_text, "completion": formats.build_completion, "alpaca": formats.build_alpaca,
            "chat": chat.build_chat, "classification": formats.build_classification,
            "blocks": formats.build_blocks}


@dataclass
class DataSplits:
    train: TokenSet
    eval: TokenSet
    label_names: list[str] | None = None
    """Classification: class names in id order (None when the data gave ids)."""
    stats: dict = field(default_factory=dict)
    """Counts: examples kept and dropped (over max_length, no trained token), per split."""
    end_of_turn: str | None = None
    """Type chat: the template's end-of-turn text (generation stops there)."""


def build_data(cfg: DataConfig, *, task: str, codec: Codec, num_labels: int = 2,
               timeout_s: float = 300) -> DataSplits:
    """Tokenised train and eval sets for ``task`` (classification | causal_lm)."""
    if cfg.source in (None, "datasets") and cfg.datasets:
        data, meta = _from_files(cfg, task=task, codec=codec, num_labels=num_labels, timeout_s=timeout_s)
    else:
        data, meta = _from_bundled(cfg, task=task, codec=codec, num_labels=num_labels)
    train, evals = data["train"], data["eval"]
    if cfg.train_size is not None:
        train = train.select(range(min(cfg.train_size, len(train))))
    if cfg.eval_size is not None:
        evals = evals.select(range(min(cfg.eval_size, len(evals))))
    if not len(train) or not len(evals):
        raise ValueError(f"data.source={cfg.source!r} gave {len(train)} train / {len(evals)} eval examples; "
                         "use more data, a smaller data.max_length or a larger eval share")
    packs = None
    if cfg.sample_packing:
        packs = pack(column(train, "length"), cfg.max_length)
    splits = DataSplits(TokenSet(train, packs=packs), TokenSet(evals), label_names=meta.get("label_names"),
                        stats=meta.get("stats", {}), end_of_turn=meta.get("end_of_turn"))
    splits.stats.update(train_examples=len(train), eval_examples=len(evals),
                        packs=None if packs is None else len(packs))
    return splits


def excess_length(cfg: DataConfig, type_: str) -> str:
    if cfg.excess_length is not None:
        return cfg.excess_length
    return "truncate" if type_ in ("text", "classification", "blocks") else "drop"


# --------------------------------------------------------------------------- your files


def _from_files(cfg: DataConfig, *, task: str, codec: Codec, num_labels: int, timeout_s: float):
    entries = [("datasets", i, e) for i, e in enumerate(cfg.datasets)]
    entries += [("eval_datasets", i, e) for i, e in enumerate(cfg.eval_datasets)]
    files = {f"{s}[{i}]": file_signature(resolve_files(e, f"data.{s}[{i}]")[1]) for s, i, e in entries}
    template = None
    if any(e.type == "chat" for _, _, e in entries):
        template = chat.resolve_template(cfg.chat_template, codec)
        eot = chat.end_of_turn(template, codec)
        if eot and eot != codec.eos_token:
            warnings.warn(f"the chat template ends a turn with {eot!r} but the tokenizer's EOS is "
                          f"{codec.eos_token!r}: the end-of-turn is trained, so generation must stop at {eot!r} "
                          "(eval_generate does)", stacklevel=2)
    settings = {k: v for k, v in dataclasses.asdict(cfg).items()
                if k not in ("train_size", "eval_size", "sample_packing", "dataset_processes",
                             "dataset_prepared_path", "path", "source")}
    key = cache_key({"files": files, "settings": settings, "template": template, "task": task,
                     "num_labels": num_labels, "tokenizer": codec.fingerprint()})
    root = cache_root(cfg.dataset_prepared_path)
    build = functools.partial(_build_files, cfg, task=task, codec=codec, num_labels=num_labels,
                              template=template, key=key)
    data, meta = prepared(root, key, build, timeout_s=timeout_s)
    meta["stats"]["cache"] = str(root / key)
    return data, meta


def _build_files(cfg: DataConfig, hf_cache, *, task: str, codec: Codec, num_labels: int, template: str | None,
                 key: str):
    import datasets

    raw = {"train": [], "eval": []}
    for i, entry in enumerate(cfg.datasets):
        where = f"data.datasets[{i}] ({entry.path!r})"
        ds = _numbered(load_entry(entry, where=f"data.datasets[{i}]", cache_dir=hf_cache))
        if not cfg.eval_datasets:
            train, evals = hold_out(ds, val_set_size=cfg.val_set_size or cfg.eval_fraction, where=where)
            raw["eval"].append((entry, where, evals))
        else:
            train = ds
        raw["train"].append((entry, where, train))
    for i, entry in enumerate(cfg.eval_datasets):
        where = f"data.eval_datasets[{i}] ({entry.path!r})"
        raw["eval"].append((entry, where, _numbered(load_entry(entry, where=f"data.eval_datasets[{i}]",
                                                               cache_dir=hf_cache))))
    label2id, names = (_label_map(cfg, raw["train"], num_labels) if task == "classification" else (None, None))
    out, stats = {}, {}
    for split, parts in raw.items():
        pieces = []
        for entry, where, ds in parts:
            prep = _prep(cfg, entry, where, codec=codec, template=template, label2id=label2id,
                         num_labels=num_labels)
            pieces.append(tokenise(ds, entry.type, prep, processes=cfg.dataset_processes, fingerprint=key))
        out[split], stats[split] = _keep(datasets.concatenate_datasets(pieces), split=split, cfg=cfg)
    meta = {"label_names": names, "stats": stats, "end_of_turn": chat.end_of_turn(template, codec) if template
            else None}
    return datasets.DatasetDict(out), meta


def _numbered(ds):
    return ds.add_column("__row__", np.arange(len(ds), dtype=np.int64))


def _prep(cfg: DataConfig, entry: DatasetEntry, where: str, *, codec: Codec, template: str | None,
          label2id: dict | None, num_labels: int) -> formats.Prep:
    return formats.Prep(codec=codec, max_length=cfg.max_length, excess_length=excess_length(cfg, entry.type),
                        where=where, train_on_inputs=cfg.train_on_inputs, template=template,
                        roles=chat.role_map(entry.roles), roles_to_train=tuple(entry.roles_to_train),
                        role_key=entry.column_map.get("role", "role"),
                        content_key=entry.column_map.get("content", "content"), label2id=label2id,
                        num_labels=num_labels)


def _label_map(cfg: DataConfig, parts: list, num_labels: int) -> tuple[dict | None, list[str] | None]:
    """String labels -> ids (data.labels order, else sorted); int labels stay ids. Names for the adapter."""
    values: set = set()
    for entry, where, ds in parts:
        require_columns(ds, ["label"], where=where, type_=entry.type)
        values |= set(ds.unique("label"))
    strings = {v for v in values if isinstance(v, str)}
    if strings and len(strings) != len(values):
        raise ValueError(f"data.datasets mixes string and numeric labels ({sorted(map(str, values))[:6]}); use "
                         "one kind in every file")
    if not strings:
        names = list(cfg.labels) if cfg.labels else None
        if names is not None and len(names) != num_labels:
            raise ValueError(f"data.labels has {len(names)} names but model.num_labels={num_labels}; give one "
                             "name per class")
        return None, names
    names = list(cfg.labels) if cfg.labels else sorted(strings)
    unknown = sorted(strings - set(names))
    if unknown:
        raise ValueError(f"labels {unknown[:5]} are not in data.labels ({', '.join(names)}); add them or fix the "
                         "rows")
    if len(names) != num_labels:
        raise ValueError(f"the training data has {len(names)} classes ({', '.join(names)}) but model.num_labels="
                         f"{num_labels}; set model.num_labels={len(names)}")
    return {n: i for i, n in enumerate(names)}, names


def tokenise(ds, type_: str, prep: formats.Prep, *, processes: int = 1, fingerprint: str = "mem"):
    """Rows -> token columns with ``datasets.map`` (batched, ``processes`` workers)."""
    import datasets

    needed = [c for c in formats.COLUMNS.get(type_, []) if c != "messages" or type_ == "chat"]
    require_columns(ds, needed, where=prep.where, type_=type_)
    ids = datasets.Sequence(datasets.Value("int32"))
    if type_ == "classification":
        features = datasets.Features({"input_ids": ids, "label": datasets.Value("int32"),
                                      "length": datasets.Value("int32"), "status": datasets.Value("int8")})
    else:
        features = datasets.Features({"input_ids": ids, "labels": ids, "n_trained": datasets.Value("int32"),
                                      "length": datasets.Value("int32"), "status": datasets.Value("int8")})
    return ds.map(functools.partial(_apply, builder=BUILDERS[type_], prep=prep), batched=True, batch_size=500,
                  num_proc=processes if processes > 1 else None, remove_columns=ds.column_names,
                  features=features, load_from_cache_file=False,
                  new_fingerprint=hashlib.sha256(f"{fingerprint}|{prep.where}|{type_}".encode()).hexdigest()[:16],
                  desc="tokenise")


def _apply(batch: dict, *, builder, prep: formats.Prep) -> dict:
    return builder(batch, prep)


def _keep(ds, *, split: str, cfg: DataConfig):
    status = column(ds, "status")
    long, untrained = int((status == formats.LONG).sum()), int((status == formats.UNTRAINED).sum())
    kept = np.flatnonzero(status == formats.KEEP)
    if not len(kept):
        raise ValueError(f"every one of the {len(ds)} {split} examples was dropped ({long} over data.max_length="
                         f"{cfg.max_length}, {untrained} with no trained token); raise data.max_length, set "
                         "data.excess_length=truncate, or check roles_to_train / train_on_inputs")
    return ds.select(kept).remove_columns("status"), {"examples": len(ds), "dropped_over_length": long,
                                                      "dropped_untrained": untrained}


# --------------------------------------------------------------------------- bundled sources


def _from_bundled(cfg: DataConfig, *, task: str, codec: Codec, num_labels: int):
    import datasets

    match cfg.source:
        case "rotten_tomatoes":
            (train, evals), type_ = sources.rotten_tomatoes_rows(cfg), "classification"
        case "text_file":
            (train, evals), type_ = sources.text_file_rows(cfg, codec), "blocks"
        case "synthetic" | None:
            (train, evals) = sources.synthetic_rows(cfg, task)
            type_ = "classification" if task == "classification" else "text"
        case _:
            raise ValueError(f"data.source={cfg.source!r} is not one of {', '.join(DATA_SOURCES)}")
    out, stats = {}, {}
    for split, cols in (("train", train), ("eval", evals)):
        ds = _numbered(datasets.Dataset.from_dict(cols))
        prep = formats.Prep(codec=codec, max_length=cfg.max_length, excess_length=excess_length(cfg, type_),
                            where=f"data.source={cfg.source}", num_labels=num_labels)
        out[split], stats[split] = _keep(tokenise(ds, type_, prep), split=split, cfg=cfg)
    return out, {"stats": stats}
