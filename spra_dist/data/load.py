"""Rows from local files through HF ``datasets``, offline: one DatasetEntry -> one ``datasets.Dataset``.

    ds = load_entry(entry, where="data.datasets[0]", cache_dir=scratch)   # datasets' own files go there
    train, evals = hold_out(ds, val_set_size=0.05)

The format comes from the file extension; a ``save_to_disk`` directory is read with ``load_from_disk``.
Every mistake raises ValueError naming the entry, the path and what to change.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from spra_dist.data.config import DatasetEntry

FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet",
           ".txt": "text", ".arrow": "arrow"}


def resolve_files(entry: DatasetEntry, where: str) -> tuple[str, list[Path]]:
    """(format, files) of an entry: ``disk`` with the directory for a save_to_disk folder."""
    path = Path(entry.path).expanduser()
    if any(c in entry.path for c in "*?["):
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not files:
            raise ValueError(f"{where}.path={entry.path!r} matches no file; check the pattern and the directory")
    elif path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            return "disk", [path]
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in FORMATS)
        if not files:
            raise ValueError(f"{where}.path={entry.path!r} is a directory with no data file "
                             f"({', '.join(sorted(FORMATS))}) and no save_to_disk data set")
    elif path.is_file():
        files = [path]
    else:
        raise ValueError(f"{where}.path={entry.path!r} does not exist; give a file, glob or directory "
                         "(relative paths start from the current directory)")
    suffixes = {p.suffix.lower() for p in files}
    unknown = suffixes - set(FORMATS)
    if unknown:
        raise ValueError(f"{where}.path={entry.path!r}: cannot read {', '.join(sorted(unknown))} files; use "
                         f"{', '.join(sorted(FORMATS))} or a save_to_disk directory")
    formats = {FORMATS[s] for s in suffixes} | ({"tsv"} if ".tsv" in suffixes else set())
    if len(formats) > 1:
        raise ValueError(f"{where}.path={entry.path!r} mixes formats ({', '.join(sorted(suffixes))}); give "
                         "one entry per format")
    return ("tsv" if ".tsv" in suffixes else formats.pop()), files


def file_signature(files: list[Path], *, hash_limit: int = 64 << 20) -> list[list]:
    """What a cache key needs to know about the files: size and mtime, and the content hash of small ones
    (a copy with the same content keeps its cache; an edited file never reuses one)."""
    out = []
    for f in files:
        items = sorted(p for p in f.rglob("*") if p.is_file()) if f.is_dir() else [f]
        for p in items:
            st = p.stat()
            digest = _sha256(p) if st.st_size <= hash_limit else None
            out.append([str(p.resolve()), st.st_size, None if digest else st.st_mtime_ns, digest])
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_entry(entry: DatasetEntry, *, where: str, cache_dir: Path):
    """The entry's rows as a ``datasets.Dataset``: split (with slicing), column_map and max_samples applied."""
    import datasets

    fmt, files = resolve_files(entry, where)
    if fmt == "disk":
        ds = _from_disk(files[0], entry, where)
    else:
        empty = [f for f in files if f.stat().st_size == 0]
        if empty:
            raise ValueError(f"{where}: {str(empty[0])!r} is empty; give a file with rows, or drop it from the entry")
        kwargs = {"delimiter": "\t"} if fmt == "tsv" else {}
        try:
            with _quiet("datasets.packaged_modules.json.json"):  # its parse error: we name the file and line
                ds = datasets.load_dataset("csv" if fmt == "tsv" else fmt, split=entry.split,
                                           data_files={"train": [str(f) for f in files]}, cache_dir=str(cache_dir),
                                           **kwargs)
        except (ValueError, KeyError) as err:
            if "corresponds to no data" in str(err):
                raise ValueError(f"{where}: split {entry.split!r} of {entry.path!r} is empty; check the file and the "
                                 "split's slice") from None
            if "instruction" in str(err).lower():
                raise ValueError(f"{where}.split={entry.split!r} is not a valid slice ({err}); write e.g. "
                                 "train[:90%] or train[10:20]") from None
            if "split" in str(err).lower() or isinstance(err, KeyError):
                raise ValueError(f"{where}.split={entry.split!r} is not in {entry.path!r} ({err}); files give one "
                                 "split, train, sliced like train[:90%] or train[100:200]") from None
            raise ValueError(f"{where}.path={entry.path!r} could not be read as {fmt}: {err}") from None
        except Exception as err:  # pyarrow and pandas parse errors have many types; say which file failed
            bad = first_bad_json_line(files) if fmt == "json" else None
            if bad:
                raise ValueError(f"{where}: {bad}; fix or remove that line") from None
            while err.__cause__ is not None:  # datasets wraps the parser's error in DatasetGenerationError
                err = err.__cause__
            first = (str(err).splitlines() or [""])[0][:300]
            raise ValueError(f"{where}.path={entry.path!r} could not be read as {fmt} ({type(err).__name__}"
                             f"{': ' + first if first else ''}); fix the file") from None
    ds = apply_column_map(ds, entry, where)
    if entry.max_samples is not None:
        ds = ds.select(range(min(len(ds), entry.max_samples)))
    if len(ds) == 0:
        raise ValueError(f"{where}: split {entry.split!r} of {entry.path!r} is empty; check the file and the "
                         "split's slice")
    return ds


@contextmanager
def _quiet(logger: str):
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)


def _from_disk(path: Path, entry: DatasetEntry, where: str):
    import datasets

    loaded = datasets.load_from_disk(str(path))
    name, _, _ = entry.split.partition("[")
    if isinstance(loaded, datasets.DatasetDict):
        if name not in loaded:
            raise ValueError(f"{where}.split={entry.split!r}: {entry.path!r} holds splits "
                             f"{', '.join(loaded)}; pick one of them")
        ds = loaded[name]
    else:
        if name != "train":
            raise ValueError(f"{where}.split={entry.split!r}: {entry.path!r} is a single Dataset; use split train "
                             "(with a slice if you like)")
        ds = loaded
    if "[" in entry.split:
        try:
            spec = datasets.ReadInstruction.from_spec(entry.split.replace(name, "train", 1))
            (inst,) = spec.to_absolute({"train": len(ds)})
        except (ValueError, AssertionError) as err:
            raise ValueError(f"{where}.split={entry.split!r} is not a valid slice ({err}); write e.g. "
                             "train[:90%] or train[10:20]") from None
        ds = ds.select(range(inst.from_, inst.to))
    return ds


def first_bad_json_line(files: list[Path]) -> str | None:
    """``'<file>' line N is not valid JSON (<why>)`` for the first bad line of ``files`` (lines count from 1),
    or None when every file parses.

    A file is read as JSON Lines unless it opens with ``[`` or its first line is not a whole JSON value (one
    document spread over lines): those are parsed whole, and the parser's line is reported."""
    for path in files:
        lines = path.read_bytes().splitlines()
        head = next((i for i, line in enumerate(lines) if line.strip()), None)
        if head is None:
            continue
        if not lines[head].lstrip().startswith(b"[") and _json_error(lines[head]) is None:
            for i, line in enumerate(lines[head:], start=head + 1):
                why = _json_error(line) if line.strip() else None
                if why:
                    return f"{str(path)!r} line {i} is not valid JSON ({why})"
            continue
        try:
            json.loads(path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as err:
            line = path.read_bytes()[:err.start].count(b"\n") + 1
            return f"{str(path)!r} line {line} is not UTF-8 text ({err.reason})"
        except json.JSONDecodeError as err:
            return f"{str(path)!r} line {err.lineno} is not valid JSON ({err.msg}, column {err.colno})"
    return None


def _json_error(line: bytes) -> str | None:
    try:
        json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as err:
        return f"not UTF-8 text: {err.reason} at byte {err.start + 1}"
    except json.JSONDecodeError as err:
        return f"{err.msg}, column {err.colno}"
    return None


def user_columns(ds) -> list[str]:
    """The data set's columns less our own bookkeeping ones (``__row__``), for messages."""
    return [c for c in ds.column_names if not (c.startswith("__") and c.endswith("__"))]


def apply_column_map(ds, entry: DatasetEntry, where: str):
    """Rename the data set's columns to ours; role and content name keys inside messages, not columns."""
    renames = {theirs: ours for ours, theirs in entry.column_map.items()
               if ours not in ("role", "content") and theirs != ours}
    missing = [theirs for theirs in renames if theirs not in ds.column_names]
    if missing:
        raise ValueError(f"{where}.column_map names column {missing[0]!r}, which {entry.path!r} does not have; "
                         f"its columns are {', '.join(user_columns(ds))}")
    clash = [ours for ours in renames.values() if ours in ds.column_names and ours not in renames]
    if clash:
        ds = ds.remove_columns(clash)  # the mapped column replaces one that already had our name
    return ds.rename_columns(renames) if renames else ds


def require_columns(ds, columns: list[str], *, where: str, type_: str) -> None:
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise ValueError(f"{where} (type {type_}) has no column {', '.join(map(repr, missing))}; its "
                         f"columns are {', '.join(user_columns(ds))}; rename with column_map, e.g. "
                         f"column_map: {{{missing[0]}: <your column>}}")


def row_ranks(ds) -> np.ndarray:
    """A number in [0, 1) per row fixed by its content alone: the held-out split never depends on a seed,
    and duplicate rows land on the same side."""
    out = np.empty(len(ds), dtype=np.float64)
    pos, names = 0, set(user_columns(ds))
    for batch in ds.iter(batch_size=10_000):
        cols = [c for c in batch if c in names]  # not the row number: it would split duplicates
        for i in range(len(batch[cols[0]])):
            text = json.dumps([batch[c][i] for c in cols], default=str, ensure_ascii=False)
            out[pos] = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") / 2**64
            pos += 1
    return out


def hold_out(ds, *, val_set_size: float, where: str):
    """(train, eval): a fraction in (0, 1) or a row count of rows held out by content hash."""
    ranks = row_ranks(ds)
    if val_set_size < 1:
        is_eval = ranks < val_set_size
    else:
        count = int(val_set_size)
        if count >= len(ds):
            raise ValueError(f"data.val_set_size={count} leaves no training rows out of {len(ds)} in {where}; "
                             "use a smaller count or a fraction")
        is_eval = np.zeros(len(ds), dtype=bool)
        is_eval[np.argsort(ranks, kind="stable")[:count]] = True
    train_idx, eval_idx = np.flatnonzero(~is_eval), np.flatnonzero(is_eval)
    if not len(eval_idx):
        raise ValueError(f"data.val_set_size={val_set_size} holds out no row of the {len(ds)} in {where}; use a "
                         "larger fraction, a row count, or data.eval_datasets")
    return ds.select(train_idx), ds.select(eval_idx)
