"""``parallelize``: hand the adapted model to its engine, one checklist for none, DDP, FSDP2 and DeepSpeed.

    model = apply_spra(model, cfg)                        # first, on the plain model
    engine = parallelize(model, engine="fsdp2", mixed_precision="bf16", make_optimizer=..., make_scheduler=...)
    engine = parallelize(meta_model, engine="fsdp2", ..., plan=plan_load(meta_model, base, ...))   # load after sharding

Launchers name engines their own way (``launch/*.sh zero2``); ``python -m spra_dist.distributed.parallelize MODE``
turns such a name into the ``spra train`` overrides that select it, or says which names exist.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from spra_dist.core.quantized import check_engine
from spra_dist.core.registry import find_registry
from spra_dist.distributed.deepspeed import build_deepspeed_engine, preset_names
from spra_dist.distributed.engines import ENGINES, Engine, TorchEngine
from spra_dist.distributed.fsdp import DEFAULT_MP, apply_fsdp2
from spra_dist.distributed.loading import LoadPlan, load_fsdp2, load_zero3

OptimizerFactory = Callable[[nn.Module], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]


def parallelize(model: nn.Module, *, engine: str, mixed_precision: str, make_optimizer: OptimizerFactory,
                make_scheduler: SchedulerFactory, deepspeed_config: dict | None = None,
                plan: LoadPlan | None = None) -> Engine:
    """Wrap the adapted, unwrapped ``model`` for ``engine`` (none | ddp | fsdp2 | deepspeed, already resolved) and
    build its optimizer and schedule. The checklist, in order:

    1. SpaRA was applied to the unwrapped model, so mask keys are its own module names.
    2. Mixed precision (``bf16``): none and DDP keep an fp32 model and run the forward under ``torch.autocast``;
       FSDP2 computes in bf16 through its ``MixedPrecisionPolicy`` with fp32 master values and reduction;
       DeepSpeed through its config's ``bf16`` section (``fill_deepspeed_config``).
    3. Replicate or shard: none keeps the model as it is; DDP wraps it (frozen weights need no gradient, so its
       buckets hold only the trainable values); FSDP2 shards each transformer block, then the root; DeepSpeed
       partitions what its ZeRO stage says.
    4. A model built on the meta device (``plan``, fsdp2 and ZeRO-3 only) gets its weights, each rank only what it
       keeps: FSDP2 after sharding, ZeRO-3 module by module as it partitions them (spra_dist.distributed.loading).
    5. Optimizer and schedule, built after wrapping: FSDP2 replaces the parameters with DTensors.
    """
    if find_registry(model) is None:
        raise ValueError("parallelize needs a model with SpaRA applied: call apply_spra on the plain model first")
    if plan is not None and not shards_base(engine, deepspeed_config):
        raise ValueError(f"engine={engine!r} keeps the whole base on every rank: build the model with its weights "
                         f"(build_model(meta=False)); loading after sharding is for fsdp2 and ZeRO-3")
    if engine == "deepspeed":
        if deepspeed_config is None:
            raise ValueError("engine=deepspeed needs its filled config (fill_deepspeed_config)")
        # a quantized base ZeRO cannot hold (apply_fsdp2 checks its own; none and DDP take any)
        check_engine(model, engine=engine, zero_stage=deepspeed_config.get("zero_optimization", {}).get("stage", 0))
        if plan is not None:
            load_zero3(model, plan, config=deepspeed_config)
        return build_deepspeed_engine(model, make_optimizer, make_scheduler, config=deepspeed_config)
    match engine:
        case "none":
            runner = model
        case "ddp":
            runner = DistributedDataParallel(model, device_ids=_device_ids())
        case "fsdp2":
            runner = apply_fsdp2(model, mp_policy=DEFAULT_MP if mixed_precision == "bf16" else None)
            if plan is not None:
                load_fsdp2(model, plan)
        case _:
            raise ValueError(f"engine={engine!r}: parallelize takes {', '.join(e for e in ENGINES if e != 'auto')}")
    autocast = torch.bfloat16 if mixed_precision == "bf16" and engine in ("none", "ddp") else None
    optimizer = make_optimizer(model)
    return TorchEngine(engine, model, runner, optimizer, make_scheduler(optimizer), autocast_dtype=autocast)


def shards_base(engine: str, deepspeed_config: dict | None = None) -> bool:
    """Does ``engine`` partition the frozen base (fsdp2, DeepSpeed ZeRO-3), so that no rank should load all of it?"""
    stage = (deepspeed_config or {}).get("zero_optimization", {}).get("stage", 0)
    return engine == "fsdp2" or (engine == "deepspeed" and stage == 3)


def _device_ids() -> list[int] | None:
    return [torch.cuda.current_device()] if torch.cuda.is_available() else None


def launch_modes() -> list[str]:
    """The engine names launchers take: the torch engines, and each DeepSpeed preset by its own name."""
    return [e for e in ENGINES if e not in ("auto", "deepspeed")] + preset_names()


def launch_overrides(mode: str) -> list[str]:
    """The ``spra train`` overrides that select launcher mode ``mode`` (a DeepSpeed JSON path selects DeepSpeed)."""
    if mode.endswith(".json") or mode in preset_names():
        return ["engine=deepspeed", f"deepspeed_config={mode}"]
    if mode in launch_modes():
        return [f"engine={mode}"]
    raise ValueError(f"ENGINE={mode} is not one of: {' '.join(launch_modes())} (or a DeepSpeed JSON file)")


if __name__ == "__main__":  # launch/_common.sh: one override per line, or one error line and status 2
    try:
        print("\n".join(launch_overrides(sys.argv[1])))
    except (IndexError, ValueError) as err:
        print(f"error: {err if isinstance(err, ValueError) else 'give a mode'}", file=sys.stderr)
        raise SystemExit(2) from None
