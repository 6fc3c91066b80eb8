"""Crash-safe writes into a user's directory, and the checked read of what was written with a checksum.

Every writer of spra_dist (adapters, merged models, checkpoints, run outputs) puts a *set* of files into a
target directory that may hold other things: a user's notes, a run's ``checkpoints/``, another tool's files.
``atomic_files`` writes the set so that

- only the set's own file names are replaced: nothing else in the target is removed or touched;
- a crash at any point leaves the previous complete set or the new complete set, never a mix.

How: the files are written into ``target/.spra-pending-<id>/``. Renaming that folder to
``target/.spra-commit-<time>-<id>/`` is the commit point (one atomic rename). The files are then moved into
place one by one, JSON files last (a JSON file here describes the data files beside it), and the folder is
removed. A crash before the commit leaves a pending folder that readers ignore and the next writer removes; a
crash after it leaves a commit folder that readers read through (``committed_file``) and the next writer
finishes moving.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

PENDING = ".spra-pending-"
COMMITTED = ".spra-commit-"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _commit_folders(target: Path) -> list[Path]:
    """Committed sets not yet moved into place, oldest first (their names start with a time stamp)."""
    return sorted(p for p in target.glob(f"{COMMITTED}*") if p.is_dir())


def _move_order(folder: Path) -> list[Path]:
    return sorted(folder.iterdir(), key=lambda p: (p.suffix == ".json", p.name))


def _roll_forward(target: Path, folder: Path) -> None:
    """Move a committed set into place (idempotent: a crash half-way is finished by the next call)."""
    for f in _move_order(folder):
        os.replace(f, target / f.name)
    _fsync_dir(target)
    folder.rmdir()


def finish_pending(target: str | os.PathLike) -> None:
    """Complete what an interrupted writer committed, and drop what it had not committed."""
    target = Path(target)
    if not target.is_dir():
        return
    for folder in _commit_folders(target):
        _roll_forward(target, folder)
    for folder in target.glob(f"{PENDING}*"):
        shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def atomic_files(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty folder; the files written into it replace the same names in ``target``, as one set.

    ``target`` is created when missing (and removed again if the block fails and leaves it empty). Other
    files and folders in ``target`` are never touched. Write plain files only, no subfolders.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise ValueError(f"{target} exists and is not a directory; choose another output path")
    created = not target.exists()
    target.mkdir(parents=True, exist_ok=True)
    finish_pending(target)
    pending = target / f"{PENDING}{uuid.uuid4().hex[:12]}"
    pending.mkdir()
    try:
        yield pending
        for f in pending.iterdir():
            if not f.is_file():
                raise ValueError(f"{f} is not a plain file; atomic_files writes plain files only")
            _fsync_file(f)
        _fsync_dir(pending)
    except BaseException as err:
        shutil.rmtree(pending, ignore_errors=True)
        if created and not any(target.iterdir()):
            target.rmdir()
        if isinstance(err, OSError) and err.filename and Path(err.filename).parent == pending:
            # name the file the user asked for, not our temporary copy of it
            raise OSError(err.errno, err.strerror, str(target / Path(err.filename).name)) from None
        raise
    commit = target / f"{COMMITTED}{time.time_ns():020d}-{pending.name.removeprefix(PENDING)}"
    os.replace(pending, commit)  # the commit point
    _fsync_dir(target)
    _roll_forward(target, commit)


def committed_file(folder: str | os.PathLike, name: str) -> Path:
    """Where the current copy of ``folder/name`` is: in a committed set still being moved, else in place.

    Readers use this, so they see a complete set even right after a writer was killed; they never write.
    """
    folder = Path(folder)
    for commit in reversed(_commit_folders(folder)) if folder.is_dir() else []:
        if (commit / name).is_file():
            return commit / name
    return folder / name


def remove_files(target: str | os.PathLike, names: Iterable[str]) -> None:
    """Delete our own files ``names`` from ``target`` (and its unfinished sets); remove ``target`` only when
    nothing else is left in it."""
    target = Path(target)
    finish_pending(target)
    for name in names:
        (target / name).unlink(missing_ok=True)
    if target.is_dir() and not any(target.iterdir()):
        target.rmdir()


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write one text file through a temporary name and a rename, leaving everything beside it alone."""
    path = Path(path)
    with atomic_files(path.parent) as tmp:
        (tmp / path.name).write_text(text)


def write_safetensors(tensors: dict, path: Path, *, metadata: dict[str, str]) -> None:
    """``safetensors.torch.save_file``, written from Python, so a full disk raises a plain ``OSError`` naming
    the file (safetensors' own writer raises its own error type). The files written this way are O(k)."""
    from safetensors.torch import save

    data = save(tensors, metadata=metadata)
    try:
        with open(path, "wb") as f:
            f.write(data)
    except OSError as err:
        raise OSError(err.errno, err.strerror, str(path)) from None  # write() alone doesn't name the file


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_verified_json(folder: Path, meta_name: str, data_name: str, *, fmt: str, checksum_key: str,
                       what: str) -> tuple[dict, Path]:
    """The JSON written beside a checksummed data file, and the data file's path, once both exist, the format
    tag matches and the data file has the sha256 the JSON records; ``ValueError`` naming the file otherwise."""
    folder = Path(folder)
    meta_file, data_file = committed_file(folder, meta_name), committed_file(folder, data_name)
    for f in (meta_file, data_file):
        if not f.is_file():
            raise ValueError(f"{folder / f.name} not found: {folder} is not a complete {what} "
                             f"(it holds {meta_name} and {data_name})")
    try:
        meta = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{meta_file} is not valid JSON ({e}): the {what} is damaged, write it again") from e
    found = meta.get("format") if isinstance(meta, dict) else None
    if found != fmt:
        raise ValueError(f"{meta_file} is not a {what} (format={found!r})")
    expected = meta.get(checksum_key)
    if expected is not None and sha256_file(data_file) != expected:
        raise ValueError(
            f"{folder / data_name} does not match the sha256 that {meta_name} records for it: the file was "
            f"truncated or modified, or the two files come from different saves; save the {what} again"
        )
    return meta, data_file


_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_DENIED = {errno.EACCES, errno.EPERM, errno.EROFS}


def describe_os_error(err: OSError) -> str:
    """``cannot write <file>: No space left on device; free space ...`` instead of ``[Errno 28] ...``."""
    if not err.strerror:
        return str(err)
    where = f" {err.filename}" if err.filename else ""
    if err.errno in _FULL:
        fix = ("; free space (or raise the file-size limit) and run again: the last complete checkpoint and "
               "adapter are intact, and resume=auto continues from the checkpoint")
    elif err.errno in _DENIED:
        fix = "; choose a directory you can write to"
    else:
        fix = ""
    return f"cannot write{where}: {err.strerror}{fix}"
