"""Atomic writes (a reader sees the old directory or file, or the complete new one, never a half-written one),
and the checked read of what was written with a checksum."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


@contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; on success it replaces ``path`` in two renames.

    If the block raises, ``path`` is untouched and the temporary directory is removed. A crash between the
    two renames leaves the old copy as ``.<name>.old-*`` beside it, never a partial directory at ``path``.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} exists and is not a directory; choose another output path")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
    had_old = path.exists()
    if had_old:
        os.replace(path, old)
    os.replace(tmp, path)
    if had_old:
        shutil.rmtree(old, ignore_errors=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a small text file through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_verified_json(meta_file: Path, data_file: Path, *, fmt: str, checksum_key: str, what: str) -> dict:
    """The JSON written beside a checksummed data file, once both exist, the format tag matches and the data
    file has the recorded sha256; ``ValueError`` naming the file and the problem otherwise."""
    for f in (meta_file, data_file):
        if not f.is_file():
            raise ValueError(f"{f} not found: {meta_file.parent} is not a complete {what} "
                             f"(it holds {meta_file.name} and {data_file.name})")
    try:
        meta = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{meta_file} is not valid JSON ({e}): the {what} is damaged, write it again") from e
    found = meta.get("format") if isinstance(meta, dict) else None
    if found != fmt:
        raise ValueError(f"{meta_file} is not a {what} (format={found!r})")
    expected = meta.get(checksum_key)
    if expected is not None and sha256_file(data_file) != expected:
        raise ValueError(f"{data_file} does not match the checksum in {meta_file.name}: truncated or modified")
    return meta
