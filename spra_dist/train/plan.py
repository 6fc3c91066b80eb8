"""What a training config would do, without doing it: ``spra train --dry-run``.

    spra train --config configs/train/llama3_8b_sft_fsdp2.yaml --dry-run --world-size 8

The model is built on the meta device from its config alone (a saved model's ``config.json``; no weights are read
and no memory is taken), SpaRA's targets and budgets are chosen as ``apply_spra`` chooses them, and the plan is
printed: ``k`` per kind of matrix and in total, the trainable fraction, the engine and world size, the steps and
the batch. Nothing is written: no output_dir, no data cache, no checkpoint.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from spra_dist.core.masks import budget
from spra_dist.core.model import _dense_module_names, check_targets, select_targets
from spra_dist.core.quantized import check_quantize_engine, logical_shape
from spra_dist.demos.packaged import minilm_dir, smollm2_dir
from spra_dist.distributed.deepspeed import load_deepspeed_config
from spra_dist.distributed.engines import resolve_engine
from spra_dist.distributed.parallelize import shards_base
from spra_dist.train.schema import ModelConfig, TrainConfig

__all__ = ["MatrixGroup", "Plan", "format_plan", "meta_model", "plan_run"]


@dataclass
class MatrixGroup:
    pattern: str
    """The matrices' names with the layer numbers as ``*``: ``model.layers.*.self_attn.q_proj``."""

    shape: tuple[int, int]
    k: int
    """Trained entries of each matrix."""

    count: int = 0


@dataclass
class Plan:
    model_class: str
    parameters: int
    groups: list[MatrixGroup]
    dense: int
    """Parameters of spra.trainable_modules, trained densely."""

    engine: str
    world_size: int
    shards_base: bool
    base_bytes: int
    """The frozen base's bytes in model.dtype, all ranks together."""

    notes: list[str] = field(default_factory=list)

    @property
    def k_total(self) -> int:
        return sum(g.k * g.count for g in self.groups)

    @property
    def trainable(self) -> int:
        return self.k_total + self.dense


def meta_model(cfg: ModelConfig, *, seed: int = 0) -> nn.Module:
    """The base model of ``cfg`` on the meta device, built from its config alone. A saved model (source hf, minilm,
    smollm2) needs only its ``config.json``: a local directory holding it, or a hub id that transformers can
    resolve (the local cache under ``HF_HUB_OFFLINE=1``). Tiny models are built on the meta device from the config's
    sizes."""
    import transformers as tf

    if cfg.source.startswith("tiny_"):
        from spra_dist.train.models import build_model

        with torch.device("meta"):
            return build_model(cfg, seed=seed).model
    name = {"minilm": minilm_dir, "smollm2": smollm2_dir}[cfg.source]() if cfg.source != "hf" else cfg.name_or_path
    labels = {"num_labels": cfg.num_labels} if cfg.task == "classification" else {}
    try:
        config = tf.AutoConfig.from_pretrained(str(name), **labels)
    except (OSError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"the dry run reads model.name_or_path's config.json, and {str(name)!r} gives none here "
                         f"({reason}); point model.name_or_path at a directory that holds the model's config.json "
                         f"(that file alone is enough for a dry run)") from None
    auto = tf.AutoModelForSequenceClassification if cfg.task == "classification" else tf.AutoModelForCausalLM
    with torch.device("meta"):
        return auto.from_config(config, dtype=getattr(torch, cfg.dtype))


def plan_run(cfg: TrainConfig, *, world_size: int) -> Plan:
    """The plan of ``cfg`` for a launch of ``world_size`` processes; ValueError for what the run would refuse
    before its first step (the engine, the batch split, the targets)."""
    cfg.validate()
    engine = resolve_engine(cfg.engine, deepspeed_config=cfg.deepspeed_config, world_size=world_size)
    preset = load_deepspeed_config(cfg.deepspeed_config) if engine == "deepspeed" else None
    check_quantize_engine(cfg.model.quantize_base, engine=engine)
    if cfg.batch_size % (world_size * cfg.grad_accum):
        raise ValueError(f"batch_size={cfg.batch_size} is the global batch and must divide by world size "
                         f"{world_size} × grad_accum {cfg.grad_accum}; use a multiple of {world_size * cfg.grad_accum}")
    model = meta_model(cfg.model, seed=cfg.seed)
    check_targets(model, cfg.spra, quantize_base=cfg.model.quantize_base)
    groups: dict[tuple[str, tuple[int, int], int], MatrixGroup] = {}
    for name in select_targets(model, cfg.spra):
        shape = logical_shape(model.get_submodule(name).weight)
        k = budget(shape, lora_rank=cfg.spra.lora_rank, density=cfg.spra.density)
        pattern = re.sub(r"\.\d+(?=\.|$)", ".*", name)
        groups.setdefault((pattern, shape, k), MatrixGroup(pattern, shape, k)).count += 1
    dense = sum(p.numel() for n in _dense_module_names(model, cfg.spra.trainable_modules)
                for p in model.get_submodule(n).parameters())
    params = sum(p.numel() for p in model.parameters())
    plan = Plan(type(model).__name__, params, list(groups.values()), dense, engine, world_size,
                shards_base(engine, preset), sum(p.numel() * p.element_size() for p in model.parameters()))
    if engine == "deepspeed":
        plan.notes.append(f"DeepSpeed ZeRO-{(preset or {}).get('zero_optimization', {}).get('stage', 0)} "
                          f"({cfg.deepspeed_config})")
    return plan


def format_plan(plan: Plan, cfg: TrainConfig) -> str:
    """The plan as ``spra train --dry-run`` prints it."""
    width = max(len(g.pattern) for g in plan.groups)
    name = cfg.model.name_or_path if cfg.model.source == "hf" else cfg.model.source
    budget_text = (f"lora_rank={cfg.spra.lora_rank}: k = r·(n_in + n_out)" if cfg.spra.lora_rank is not None
                   else f"density={cfg.spra.density}: k = density·numel")
    lines = [f"model:        {name} ({plan.model_class}, {cfg.model.dtype}), {plan.parameters:,} parameters",
             f"adapted:      {sum(g.count for g in plan.groups)} matrices ({budget_text})"]
    for g in plan.groups:
        share = 100 * g.k / (g.shape[0] * g.shape[1])
        lines.append(f"  {g.pattern:<{width}}  x{g.count:<4} {g.shape[0]:>6} x {g.shape[1]:<6} "
                     f"k={g.k:,} each ({share:.2f}%)")
    dense = f" + {plan.dense:,} dense ({', '.join(cfg.spra.trainable_modules)})" if plan.dense else ""
    lines.append(f"total k:      {plan.k_total:,}{dense}")
    lines.append(f"trainable:    {plan.trainable:,} of {plan.parameters:,} parameters "
                 f"({100 * plan.trainable / plan.parameters:.3f}%)")
    engine = plan.engine + (f", {plan.notes[0]}" if plan.notes else "")
    per_rank = plan.base_bytes / (plan.world_size if plan.shards_base else 1)
    lines.append(f"engine:       {engine}, world size {plan.world_size}; frozen base {_gib(per_rank)} per rank "
                 f"({'sharded' if plan.shards_base else 'whole on each rank'})")
    micro = cfg.batch_size // (plan.world_size * cfg.grad_accum)
    lines.append(f"batch:        {cfg.batch_size} examples per step = {plan.world_size} rank(s) x {cfg.grad_accum} "
                 f"micro batch(es) x {micro}; up to {cfg.data.max_length} tokens each")
    lines.append(f"steps:        {cfg.max_steps} ({cfg.warmup_steps} warmup, {cfg.schedule}), peak lr {cfg.lr:g}")
    lines.append("checkpoints:  " + (f"every {cfg.checkpoint_every} steps, the newest {cfg.checkpoint_keep} kept"
                                     if cfg.checkpoint_every else
                                     "off (checkpoint_every=0): a stopped run starts again from step 0"))
    lines.append(f"output_dir:   {cfg.output_dir} (dry run: nothing written)")
    return "\n".join(lines)


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"
