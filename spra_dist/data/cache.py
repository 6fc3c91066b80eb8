"""The tokenised data set on disk: Arrow files, memory-mapped on load, under a key that covers every input.

    splits = prepared(root, key, build, timeout_s=cfg.dist_timeout_s)   # build(scratch) -> (DatasetDict, meta)

The key (``cache_key``) hashes the data files' content (or size and mtime for large ones), the tokenizer, the
chat template, the data settings and the task, so a changed input never reuses a stale cache. Under several
ranks, rank 0 builds while the others wait on the file system, not in a collective: a long tokenisation
cannot hit the collective timeout. Rank 0 touches a heartbeat file while it works; a waiting rank gives up
only when that heartbeat is older than ``timeout_s`` (rank 0 died), or rank 0 wrote an error. A build leaves
only the finished cache: ``build`` gets a scratch directory (for ``datasets``' own files) that goes with it,
and rank 0 removes its error file once every rank has read it, so a failed build leaves no file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from pathlib import Path

from spra_dist.utils.atomic import write_text_atomic

CACHE_FORMAT = 1  # bump when the layout of a prepared data set changes
HEARTBEAT_S = 2.0


def cache_root(setting: str | None) -> Path:
    if setting:
        return Path(setting).expanduser()
    base = os.environ.get("SPRA_DIST_CACHE") or Path.home() / ".cache" / "spra_dist"
    return Path(base) / "data"


def cache_key(parts: dict) -> str:
    text = json.dumps({"format": CACHE_FORMAT, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def load_prepared(path: Path):
    import datasets

    meta = json.loads((path / "meta.json").read_text())
    return datasets.load_from_disk(str(path / "data")), meta


def prepared(root: Path, key: str, build, *, timeout_s: float):
    """(DatasetDict, meta) from the cache at ``root/key``, built by ``build(scratch)`` if missing (rank 0 builds)."""
    import torch.distributed as dist

    path = root / key
    ranks = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    rank = dist.get_rank() if ranks > 1 else 0
    error, beat = root / f"{key}.error", root / f"{key}.building"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        error.unlink(missing_ok=True)  # from an earlier failed run; removed before any rank looks
    if ranks > 1:
        dist.barrier()
    if (path / "meta.json").is_file():
        return load_prepared(path)
    if rank != 0:
        return _wait(path, error, beat, timeout_s=timeout_s)
    try:
        with _heartbeat(beat):
            _build_into(path, build)
    except Exception as err:
        if ranks > 1:  # the waiting ranks raise the same message; the file goes once they all have read it
            write_text_atomic(error, str(err) if isinstance(err, ValueError) else
                              f"rank 0 failed to prepare the data ({type(err).__name__}: {err})")
            try:
                dist.barrier()
            finally:
                error.unlink(missing_ok=True)
        raise
    except BaseException as err:  # interrupted: the others may be gone, so no barrier; the next run removes it
        if ranks > 1:
            write_text_atomic(error, f"rank 0 stopped preparing the data ({type(err).__name__})")
        raise
    return load_prepared(path)


def _build_into(path: Path, build) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        data, meta = build(tmp / "scratch")
        data.save_to_disk(str(tmp / "data"))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        shutil.rmtree(tmp / "scratch", ignore_errors=True)  # datasets' copies of the rows: the cache has them
        try:
            tmp.rename(path)  # atomic: a reader sees the whole cache or none
        except OSError:
            if not (path / "meta.json").is_file():  # another job finished the same key first: keep its copy
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class _heartbeat:
    def __init__(self, path: Path) -> None:
        self.path, self.stop = path, threading.Event()

    def __enter__(self):
        self.path.touch()
        self.thread = threading.Thread(target=self._beat, daemon=True)
        self.thread.start()
        return self

    def _beat(self) -> None:
        while not self.stop.wait(HEARTBEAT_S):
            self.path.touch()

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self.path.unlink(missing_ok=True)


def _wait(path: Path, error: Path, beat: Path, *, timeout_s: float):
    import torch.distributed as dist

    started = time.monotonic()
    while True:
        if (path / "meta.json").is_file():
            return load_prepared(path)
        if error.is_file():
            message = error.read_text()
            if dist.is_available() and dist.is_initialized():
                dist.barrier()  # rank 0 removes the file once every rank has read it
            raise ValueError(message)
        last = beat.stat().st_mtime if beat.exists() else None
        quiet = time.time() - last if last is not None else time.monotonic() - started
        if quiet > timeout_s:
            raise ValueError(f"rank 0 has not worked on the data cache {path} for {quiet:.0f} s (dist_timeout_s="
                             f"{timeout_s:g}); check rank 0's log, or run `spra preprocess` before training")
        time.sleep(0.2)
