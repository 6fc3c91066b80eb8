"""Process groups, seed-only mask sharing, and gathering the O(k) trainable state.

Masks never cross the wire: rank 0's seed is broadcast (8 bytes), every rank builds its masks, and a 64-bit
fingerprint per rank is all-gathered and compared. On a mismatch every rank raises the same error naming
the first differing key, so no rank is left waiting in a collective.
"""

from __future__ import annotations

import datetime
import errno
import os
import secrets
import socket
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from spra_dist.devices import backend_for, collective_device, train_device
from spra_dist.masks import fingerprint as _fingerprint

_ENV_SET: list[str] = []  # variables init_distributed set for a group of one


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default group, or ``(0, 1)`` when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def launched_world_size() -> int:
    """The world size the launcher announced (torchrun, accelerate, deepspeed all set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


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


def agree_seed(seed: int | None, *, group: dist.ProcessGroup | None = None) -> int:
    """Rank 0's seed (drawn there if ``None``) on every rank: 8 bytes on the wire."""
    if not (dist.is_available() and dist.is_initialized()):
        return seed if seed is not None else secrets.randbits(62)
    rank = dist.get_rank(group)
    value = seed if seed is not None else (secrets.randbits(62) if rank == 0 else 0)
    t = torch.tensor([value], dtype=torch.int64, device=collective_device(group))
    dist.broadcast(t, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    return int(t.item())


def _entries(model: nn.Module) -> list[tuple[str, tuple[int, ...], torch.Tensor]]:
    from spra_dist.model import spra_modules

    return [(m.spra_key, m.weight_shape, m.mask() if m.spra_indices.is_meta else m.spra_indices)
            for _, m in spra_modules(model)]


def check_masks(model: nn.Module, *, requested=None, group: dist.ProcessGroup | None = None) -> int:
    """All-gather each rank's mask fingerprint; on a mismatch raise on every rank, naming what differs.

    ``requested`` is the SpraConfig as the user gave it (seed possibly None): a rank asking for another
    explicit seed, density or target list is a mismatch even though the broadcast seed would hide it.
    """
    config = repr(sorted((requested or model.spra_config).to_dict().items()))
    entries = _entries(model)
    total = _fingerprint(entries, config=config)
    if not (dist.is_available() and dist.is_initialized()):
        return total
    size = dist.get_world_size(group)
    device = collective_device(group)
    gathered = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(size)]
    dist.all_gather(gathered, torch.tensor([total], dtype=torch.int64, device=device), group=group)
    if all(int(g.item()) == total for g in gathered):
        return total
    # Every rank sees the same gathered list, so every rank takes this branch: no one is left waiting.
    summary = {"config": config, "keys": [(e[0], _fingerprint([e], config="")) for e in entries]}
    summaries: list[dict] = [{} for _ in range(size)]
    dist.all_gather_object(summaries, summary, group=group)
    raise RuntimeError(_mismatch_message(summaries))


def _mismatch_message(summaries: list[dict]) -> str:
    ref = summaries[0]
    for rank, other in enumerate(summaries[1:], start=1):
        first = next((repr(a[0]) if a[0] == b[0] else f"{a[0]!r} on rank 0, {b[0]!r} on rank {rank}"
                      for a, b in zip(ref["keys"], other["keys"], strict=False) if a != b), None)
        if first is None and len(ref["keys"]) != len(other["keys"]):
            first = f"layer count: rank 0 adapts {len(ref['keys'])}, rank {rank} {len(other['keys'])}"
        if first is None and other["config"] == ref["config"]:
            continue
        where = f"the first differing mask is {first}" if first else "the masks agree but the settings don't"
        return (f"SpaRA masks differ across ranks: {where}; rank 0 has spra config {ref['config']}, rank "
                f"{rank} has {other['config']}. Give every rank the same model and spra settings")
    return "SpaRA mask fingerprints differ across ranks"


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside DDP / a DeepSpeed engine / accelerate's wrappers."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def full_tensor(p: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank, whatever engine holds it: FSDP2 DTensor, ZeRO-3 partition or plain; for a
    DeepSpeed bf16/fp16 parameter, the fp32 master copy its optimizer keeps.

    A collective under FSDP2 and ZeRO-3: call it on every rank.
    """
    if hasattr(p, "full_tensor"):
        return p.full_tensor()
    if p.dtype in (torch.float16, torch.bfloat16) and (hasattr(p, "_hp_mapping") or hasattr(p, "ds_id")):
        # DeepSpeed in bf16/fp16 computes with a low-precision copy; its optimizer holds the fp32 master values.
        from deepspeed.utils import safe_get_full_fp32_param

        master = safe_get_full_fp32_param(p)
        if master is not None:
            return master.detach().clone()
    if hasattr(p, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
            return p.data.detach().clone()
    return p.detach()


def is_sharded(p: torch.Tensor) -> bool:
    """Held in shards by FSDP2 (a DTensor) or ZeRO-3 (a partitioned parameter)."""
    return hasattr(p, "device_mesh") or hasattr(p, "ds_id")


def global_shape(p: torch.Tensor) -> tuple[int, ...]:
    """The parameter's full shape (a ZeRO-3 partition's own shape is empty between uses)."""
    return tuple(getattr(p, "ds_shape", None) or p.shape)


def shard_like(p: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """``full`` laid out like ``p``: a DTensor with p's mesh and placements under FSDP2, else as is."""
    if hasattr(p, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full.to(p.device_mesh.device_type), p.device_mesh, p.placements)
    return full.to(p.device)


@torch.no_grad()
def set_full(p: torch.Tensor, value: torch.Tensor) -> None:
    """Write the whole ``value`` into ``p``, whatever engine holds it (a collective under FSDP2 / ZeRO-3)."""
    value = value.to(p.dtype)
    if hasattr(p, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p], modifier_rank=0):  # rank 0's copy is re-partitioned
            p.data.copy_(value.to(p.data.device).view_as(p.data))
    else:
        p.copy_(shard_like(p, value))


@torch.no_grad()
def merge_sharded(m: nn.Module) -> None:
    """Fold a SpraLinear's delta into its weight where FSDP2 or ZeRO-3 holds the weight in shards.

    ZeRO-3 gathers this one module's weight, merges, and re-partitions it. FSDP2 needs no weight gather at
    all: each rank merges the sampled entries that fall in its own rows (FSDP2 shards dim 0 in
    ``torch.chunk`` pieces), from the k values gathered once. The module stays (the engine's hooks are bound
    to it) and runs as a plain linear from now on.
    """
    if hasattr(m.weight, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([m.weight, m.spra_values], modifier_rank=0):
            m.merge()
        return
    from spra_dist.kernels import merged_entries, put

    local = m.weight.to_local().view(-1)
    n_rows, n_cols = m.weight_shape
    chunk = -(-n_rows // m.weight.device_mesh.size())
    lo = m.weight.device_mesh.get_local_rank() * chunk * n_cols
    values = full_tensor(m.spra_values)
    idx = m.spra_indices
    mine = (idx >= lo) & (idx < lo + local.numel())
    pos = idx[mine] - lo
    put(local, pos, merged_entries(local[pos], values[mine].to(local.device)))
    m.merged = True
