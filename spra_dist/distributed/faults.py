"""Dead and hung ranks: turn a failed or timed-out collective into an error that names the lost rank.

A killed rank closes its sockets, so its peers' next collective fails at once; a stopped (SIGSTOP) or hung
rank keeps them open, so its peers wait until ``dist_timeout_s`` runs out. Either way gloo's own error only
says "connection reset" or "timed out" without a rank. :func:`explain` then runs
``dist.monitored_barrier(wait_all_ranks=True)`` on a side group made at start-up (its connections are
untouched by the failed collective): rank 0 learns which ranks did not answer, every other rank whether
rank 0 answered, and the error names them.
"""

from __future__ import annotations

import datetime
import os
import re
import socket
import time
from pathlib import Path

import torch.distributed as dist

_MONITOR: dict[str, object] = {}


class RankLost(RuntimeError):
    """A collective failed because another rank died, hung or stopped."""

    exit_code = 1


def make_monitor_group(timeout_s: int) -> None:
    """Create the side group for :func:`explain` and learn every rank's host and pid (a collective: call it
    on every rank, right after init)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        _MONITOR["group"] = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
        where: list = [None] * dist.get_world_size()
        dist.all_gather_object(where, (socket.gethostname(), os.getpid()))
        _MONITOR["where"] = where


def _local_lost(wait_s: float = 3.0) -> list[str]:
    """Ranks on this host whose process is gone or stopped (no network needed: read /proc). A rank killed a moment
    ago may still be tearing down its memory, its sockets already closed, so look again for up to ``wait_s``."""
    deadline = time.monotonic() + wait_s
    while not (lost := _scan_local()) and time.monotonic() < deadline:
        time.sleep(0.1)
    return lost


def _scan_local() -> list[str]:
    host, lost = socket.gethostname(), []
    for rank, (rank_host, pid) in enumerate(_MONITOR.get("where") or []):
        if rank_host != host or pid == os.getpid():
            continue
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            state = "gone"
        if state in ("gone", "Z", "X"):
            lost.append(f"rank {rank} (pid {pid}) is dead")
        elif state in ("T", "t"):
            lost.append(f"rank {rank} (pid {pid}) is stopped")
    return lost


def forget_monitor_group() -> None:
    _MONITOR.clear()


def is_collective_failure(err: BaseException) -> bool:
    """gloo's errors for a lost peer: a closed connection, a reset, or a timeout (DistBackendError or the
    RuntimeError of older releases)."""
    if not isinstance(err, RuntimeError):
        return False
    text = str(err).lower()
    return any(word in text for word in ("timed out", "timeout", "connection", "broken pipe", "peer", "gloo"))


def explain(err: BaseException, *, probe_timeout_s: float = 10.0, advice: str = "restart it") -> RankLost:
    """A :class:`RankLost` naming the rank(s) that did not answer a monitored barrier, with gloo's error.
    ``advice``: what to do next, from what is on disk (the recipe says whether a checkpoint exists)."""
    rank, size = dist.get_rank(), dist.get_world_size()
    first = " ".join(str(err).split())[:300]
    group = _MONITOR.get("group")
    lost = "the lost rank could not be determined"
    local = _local_lost()
    if local:
        lost = f"lost: {', '.join(local)}"
    elif group is not None:
        try:
            dist.monitored_barrier(group=group, timeout=datetime.timedelta(seconds=probe_timeout_s),
                                   wait_all_ranks=True)
            lost = "every rank answered a monitored barrier afterwards"
        except RuntimeError as probe:
            lost = _lost_ranks(str(probe), rank=rank)
    return RankLost(f"rank {rank} of {size}: a collective failed because another rank died, hung or stopped; "
                    f"{lost}. gloo said: {first}. The job ends here: {advice}; raise "
                    f"dist_timeout_s only if a step legitimately takes that long")


def _lost_ranks(message: str, *, rank: int) -> str:
    """Turn monitored_barrier's error into "lost: rank N"."""
    text = " ".join(message.split())
    # rank 0: "Ranks 1, 3 failed to pass monitoredBarrier in ..." / "Rank 1 timed out in monitoredBarrier ..."
    found = re.search(r"Ranks? ([\d, ]+?) (?:failed to pass|timed out in) monitoredBarrier", text)
    if found:
        names = found.group(1).strip().rstrip(",")
        return f"lost: rank {names} (did not answer a monitored barrier)"
    if "waiting for send/recv from rank 0" in text:
        return "lost: rank 0 (did not answer a monitored barrier; if rank 0 is alive, its log names the rank)"
    return f"monitored barrier on rank {rank}: {text[:200]}"
