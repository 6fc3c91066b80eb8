"""FSDP2 for a SpaRA model: shard each transformer block, then the root.

    from spra_dist.distributed.fsdp import apply_fsdp2
    model = apply_spra(model, cfg)      # inject first, on the plain model
    apply_fsdp2(model)                  # bf16 compute, fp32 master values and fp32 gradient reduction

The trainable ``spra_values`` are ordinary 1-D parameters of their module, so FSDP2 shards them on dim 0 with
the frozen weights of the same block and reduce-scatters only their gradients: frozen weights get no
gradient buffer and no optimizer state.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from spra_dist.core.quantized import check_engine
from spra_dist.distributed.devices import collective_device

DEFAULT_MP = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks: classes named in transformers' ``_no_split_modules``, else ModuleList items."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if blocks:
        return blocks
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 1]
    return list(lists[0]) if lists else []


def default_mesh() -> DeviceMesh:
    """Every rank on one dimension, on the device the group's backend moves (cuda for nccl, cpu for gloo): a
    CPU run on a GPU machine (device=cpu, gloo) shards on the CPU."""
    return init_device_mesh(collective_device().type, (torch.distributed.get_world_size(),))


def apply_fsdp2(model: nn.Module, *, mesh: DeviceMesh | None = None,
                mp_policy: MixedPrecisionPolicy | None = DEFAULT_MP,
                reshard_after_forward: bool = True) -> nn.Module:
    """Shard ``model`` in place with ``fully_shard`` (each block, then the root) and return it.

    ``mp_policy=None`` keeps everything in the parameters' dtype (fp32 on CPU tests). The sharded
    parameters stay in their original dtype (fp32 master values); the policy only sets compute and
    gradient-reduction dtypes.
    """
    mesh = mesh or default_mesh()
    check_engine(model, engine="fsdp2", world_size=mesh.size())  # a bitsandbytes base, NF4 rows that won't split
    kwargs = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    for block in transformer_blocks(model):
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model
