"""The distributed runtime: one process group, engines that shard, and what keeps a multi-rank job honest.

    group.py      init_distributed / shutdown: join the launcher's group (or one of one), prove it is one job
    devices.py    where a run computes and where collectives' tensors live (cuda + nccl, or cpu + gloo)
    agreement.py  seed-only mask sharing: one broadcast seed, an all-gathered fingerprint
    tensors.py    a parameter's whole value under DDP, FSDP2 or ZeRO; the user's model inside a wrapper
    engines.py    the Engine protocol and parallelize(): none, DDP, FSDP2 behind one interface
    deepspeed.py  DeepSpeed ZeRO-1/2/3 as an Engine, and its presets (package data, presets/*.json)
    fsdp.py       apply_fsdp2 for your own loop
    faults.py     a failed collective becomes an error that names the lost rank
    comm.py       bytes handed to collectives, per operation
    sync.py       weight sync to rollout processes: the k values per step, rebuilt into W + delta there
"""

# Only the light modules: importing spra_dist imports this package, and FSDP2's (DTensor's) import takes half a
# second that commands loading no model (spra inspect, the launchers' name check) need not pay.
from spra_dist.distributed.group import init_distributed, shutdown, world
from spra_dist.distributed.tensors import unwrap

__all__ = ["init_distributed", "shutdown", "unwrap", "world"]
