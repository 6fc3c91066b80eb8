"""The process group: join the launcher's (or start one of one), prove it is one job, leave it cleanly.

    rank, world_size = init_distributed()      # torchrun / accelerate / deepspeed set the environment
    ...
    shutdown()

A launcher misconfigured into unsynchronised processes (each believing it is alone) would train the same model N
times without exchanging a gradient; ``init_distributed`` fails loudly instead.
"""

from __future__ import annotations

import datetime
import os
import socket
from collections.abc import Callable

import torch
import torch.distributed as dist

from spra_dist.distributed.devices import backend_for, collective_device, train_device
from spra_dist.utils.atomic import describe_os_error

_ENV_SET: list[str] = []  # variables init_distributed set for a group of one


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default group, or ``(0, 1)`` when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def launched_world_size() -> int:
    """The world size the launcher announced (torchrun, accelerate, deepspeed all set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_rank() -> int:
    """This process's rank as the launcher announced it (``RANK``; 0 alone). Still right after :func:`shutdown`,
    when :func:`world` says ``(0, 1)``."""
    return int(os.environ.get("RANK", "0"))


def init_distributed(*, backend: str | None = None, timeout_s: int = 600, group: bool = False) -> tuple[int, int]:
    """Join the group the launcher set up (no-op for a single process) and prove it is one group.

    A launcher misconfigured into unsynchronised processes (each believing it is alone) would otherwise
    train the same model N times without exchanging a gradient; here it fails loudly instead.

    ``group``: have a process group even for one process, as the ddp / fsdp2 / deepspeed engines need: a
    1-process torchrun joins its launcher's, a plain ``python`` or ``spra train`` starts one of its own on a free
    local port.
    """
    expected = launched_world_size()
    if (expected > 1 or group) and not dist.is_initialized():
        backend = backend or backend_for(train_device("auto"))
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        launcher = expected > 1 or all(k in os.environ for k in ("MASTER_ADDR", "MASTER_PORT", "RANK"))
        alone = {} if launcher else {"init_method": f"tcp://127.0.0.1:{free_port()}", "rank": 0, "world_size": 1}
        if not launcher and "LOCAL_RANK" not in os.environ:  # what a launcher would set; DeepSpeed insists on it
            os.environ["LOCAL_RANK"] = "0"
            _ENV_SET.append("LOCAL_RANK")  # taken back by shutdown: later code must not think it was launched
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s), **alone)
    rank, size = world()
    if size != expected:
        raise RuntimeError(
            f"the launcher announced WORLD_SIZE={expected} but this process is in a group of {size}: the "
            f"processes are not one job. On CPU use launch/*.sh, which sets up gloo for every launcher"
        )
    if size > 1:
        probe = torch.ones(1, device=collective_device())
        dist.all_reduce(probe)
        if int(probe.item()) != size:
            raise RuntimeError(f"all_reduce over {size} ranks gave {probe.item()}: the group does not synchronise")
    return rank, size


def free_port() -> int:
    """A TCP port on the loopback that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shutdown() -> None:
    """Leave the group cleanly (the barrier avoids an abort in destroy_process_group when ranks straggle), and
    take back the environment a group of one set up."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    while _ENV_SET:
        os.environ.pop(_ENV_SET.pop(), None)


def on_rank0(write: Callable[[], object]) -> None:
    """Run ``write`` (a write, or a check of what is on disk) on rank 0 only, and end on every rank the same
    way: return when it succeeded, raise its ``OSError`` / ``ValueError`` when it failed. A bare barrier would
    leave the other ranks waiting for a writer that died on a full disk; here they learn of it and stop with
    the same one-line error."""
    rank, size = world()
    failure: tuple[str, str] | None = None
    if rank == 0:
        try:
            write()
        except (OSError, ValueError) as err:
            failure = (type(err).__name__, describe_os_error(err) if isinstance(err, OSError) else str(err))
    if size > 1:
        box = [failure]
        dist.broadcast_object_list(box, src=0)
        failure = box[0]
    if failure is not None:
        kind, message = failure
        raise ValueError(message) if kind == "ValueError" else OSError(message)


def exit_rank(code: int) -> None:
    """End a rank of a multi-process job now, with ``code``, without interpreter finalization.

    Why: ``destroy_process_group`` drops torch's registry entries, but a gloo backend that anything else
    still references (DeepSpeed keeps its data-parallel groups, FSDP2 its device mesh) stays alive, with its
    ``pt_gloo_runloop`` worker threads and ``gloo_tcp_loop`` thread still running (measured: 2 backends, 6
    native threads left in each ZeRO-1 rank after shutdown). Python then finalizes while those threads run;
    a gloo worker that releases a tensor owned by a Python object during finalization takes the GIL, which
    a finalizing interpreter answers with ``pthread_exit``; unwinding that through a ``noexcept`` C++ frame
    is ``std::terminate`` -- "terminate called without an active exception" (SIGABRT) after a finished run
    (the failure pytorch/pytorch#179291 describes). Every output is written and closed before this call,
    and the group was left with a barrier, so nothing is lost by skipping finalization; a single process
    (no gloo threads) returns and exits normally.
    """
    if launched_world_size() <= 1:
        return
    import sys

    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)
