"""Count the bytes handed to collectives, per operation, to show what a training step puts on the wire.

    counter = CommCounter.install()        # before the engine is built (DeepSpeed caches its functions)
    counter.reset(); <one step>; counter.bytes_by_op()

Python-level collectives (FSDP2, DeepSpeed and our own calls all go through ``torch.distributed.*``) are
counted by wrapping those functions; DDP's C++ reducer is routed through the Python all-reduce by
``count_ddp``. Bytes are those of the tensor each rank hands in (for reduce-scatter, the full
unsharded input; for all-gather, the local shard).
"""

from __future__ import annotations

import functools
from collections import defaultdict

import torch
import torch.distributed as dist

# name -> which positional/keyword argument holds the tensor(s) this rank contributes
_OPS = {
    "all_reduce": "tensor", "all_reduce_coalesced": "tensors", "reduce": "tensor", "broadcast": "tensor",
    "all_gather": "tensor", "all_gather_into_tensor": "input_tensor", "all_gather_single": "input_tensor",
    "_all_gather_base": "input_tensor", "reduce_scatter": "input_list", "reduce_scatter_tensor": "input",
    "reduce_scatter_single": "input", "_reduce_scatter_base": "input",
}
_ARG_POS = {"tensor": 0, "tensors": 0, "input_tensor": 1, "input": 1, "input_list": 1}
GRADIENT_OPS = ("all_reduce", "all_reduce_coalesced", "reduce", "reduce_scatter", "reduce_scatter_tensor",
                "reduce_scatter_single", "_reduce_scatter_base")


def _nbytes(obj) -> int:
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(o) for o in obj)
    return 0


class CommCounter:
    _installed: CommCounter | None = None

    def __init__(self) -> None:
        self.totals: dict[str, int] = defaultdict(int)
        self.calls: dict[str, int] = defaultdict(int)

    @classmethod
    def install(cls) -> CommCounter:
        """Wrap the collectives once per process; later calls return the same counter."""
        if cls._installed is None:
            counter = cls()
            for name, arg in _OPS.items():
                if hasattr(dist, name):
                    setattr(dist, name, counter._wrap(getattr(dist, name), name, arg))
            cls._installed = counter
        return cls._installed

    def _wrap(self, fn, name: str, arg: str):
        @functools.wraps(fn)
        def counted(*args, **kwargs):
            payload = kwargs.get(arg, args[_ARG_POS[arg]] if len(args) > _ARG_POS[arg] else None)
            self.add(name, _nbytes(payload))
            return fn(*args, **kwargs)

        return counted

    def add(self, name: str, nbytes: int) -> None:
        self.totals[name] += nbytes
        self.calls[name] += 1

    def reset(self) -> None:
        self.totals.clear()
        self.calls.clear()

    def bytes_by_op(self) -> dict[str, int]:
        return dict(self.totals)

    def gradient_bytes(self) -> int:
        """Bytes in reducing collectives: gradients, plus a few scalars (loss, norm, overflow checks)."""
        return sum(v for k, v in self.totals.items() if k in GRADIENT_OPS)


def count_ddp(ddp_model) -> None:
    """Route DDP's gradient buckets through ``torch.distributed.all_reduce`` so the counter sees them.

    DDP's reducer all-reduces from C++ by default; its stock Python all-reduce hook does the same
    arithmetic (sum, divide by world size) through the wrapped function.
    """
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    ddp_model.register_comm_hook(None, allreduce_hook)
