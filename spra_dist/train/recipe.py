"""The training recipe, one readable path: config -> model -> SpaRA -> (engine) -> train -> adapter.

    HF_HUB_OFFLINE=1 spra train --config configs/train/debug_tiny_llama.yaml max_steps=5

Outputs in ``output_dir``: ``adapter/`` (adapter.safetensors + adapter_config.json), ``metrics.jsonl``,
``loss.png``, ``summary.json``, ``config.yaml``, and ``base_model/`` when the base is a random init.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import yaml
from torch import nn
from tqdm import tqdm

from spra_dist import apply_spra, save_adapter
from spra_dist.model import spra_modules, trainable_parameters
from spra_dist.train.config import TrainConfig, to_dict
from spra_dist.train.data import DataSplits, build_data, collate, global_batch, rank_slice, split_micro
from spra_dist.train.loop import build_optimizer, build_schedule, evaluate, train_step
from spra_dist.train.models import BuiltModel, build_model
from spra_dist.train.report import MetricsLog, plot_loss, write_summary


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run the whole recipe; returns the summary (also written to ``output_dir/summary.json``)."""
    cfg.validate()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    built = build_model(cfg.model, seed=cfg.seed)
    splits = build_data(cfg.data, task=cfg.model.task, codec=built.codec)
    if built.from_config:
        save_base_model(built, out / "base_model")
    model = apply_spra(built.model, cfg.spra)
    save_run_config(cfg, model, out / "config.yaml")
    model = wrap_model(model, cfg)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_schedule(optimizer, cfg)

    log = MetricsLog(out / "metrics.jsonl")
    evaluate_now = _evaluator(model, splits, cfg, built.codec.pad_id)
    before = evaluate_now()
    log.write({"step": 0, **before})
    after = run_steps(model, optimizer, scheduler, splits, cfg, log=log, evaluate_now=evaluate_now,
                      pad_id=built.codec.pad_id)

    save_adapter(model, out / "adapter")
    metric = "accuracy" if cfg.model.task == "classification" else "perplexity"
    plot_loss(log.records, out / "loss.png", metric=metric)
    summary = {
        f"{metric}_before": before[metric], f"{metric}_after": after[metric],
        "eval_loss_before": before["eval_loss"], "eval_loss_after": after["eval_loss"],
        "trainable_parameters": sum(p.numel() for _, p in trainable_parameters(model)),
        "k_total": sum(m.k for _, m in spra_modules(model)),
        "adapted_matrices": len(spra_modules(model)),
        "steps": cfg.max_steps, "train_examples": len(splits.train), "eval_examples": len(splits.eval),
        "wall_time_s": round(time.perf_counter() - started, 2),
        "mask_seed": model.spra_config.seed,
    }
    write_summary(out / "summary.json", summary)
    return summary


def wrap_model(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    """ENGINE WRAP POINT: the adapted, unwrapped model goes in; DDP / FSDP2 / DeepSpeed will wrap it here.

    Single process for now, so the model comes back unchanged. Mask keys were fixed by apply_spra on the
    unwrapped names before this call, as every engine needs.
    """
    return model


def run_steps(model: nn.Module, optimizer, scheduler, splits: DataSplits, cfg: TrainConfig, *,
              log: MetricsLog, evaluate_now, pad_id: int, rank: int = 0, world_size: int = 1) -> dict[str, float]:
    """The optimizer steps: each draws its global batch from (seed, step), this rank takes its slice.

    Returns the evaluation after the last step."""
    model.train()
    lengths = splits.train.lengths()
    bar = tqdm(range(cfg.max_steps), desc="train", dynamic_ncols=True)
    for step in bar:
        started = time.perf_counter()
        indices = global_batch(len(splits.train), batch_size=cfg.batch_size, step=step, seed=cfg.seed)
        mine = rank_slice(indices, rank=rank, world_size=world_size)
        parts = split_micro(mine, cfg.grad_accum, lengths=lengths)
        micro = [collate(splits.train, part, pad_id=pad_id) for part in parts]
        lr = optimizer.param_groups[0]["lr"]
        result = train_step(model, optimizer, scheduler, micro, max_grad_norm=cfg.max_grad_norm)
        tokens_per_s = result.tokens / max(time.perf_counter() - started, 1e-9)
        bar.set_postfix(loss=f"{result.loss:.4f}", tok_s=f"{tokens_per_s:.0f}")
        done = step + 1
        record: dict[str, Any] = {}
        if done % cfg.log_every == 0 or done == cfg.max_steps:
            record = {"step": done, "loss": result.loss, "lr": lr, "tokens_per_s": round(tokens_per_s, 1),
                      "grad_norm": result.grad_norm}
        if (cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.max_steps:
            metrics = evaluate_now()
            record = {"step": done, **record, **metrics}
        if record:
            log.write(record)
    bar.close()
    return metrics


def _evaluator(model: nn.Module, splits: DataSplits, cfg: TrainConfig, pad_id: int):
    def evaluate_now() -> dict[str, float]:
        return evaluate(model, splits.eval, task=cfg.model.task, pad_id=pad_id, batch_size=cfg.eval_batch_size)

    return evaluate_now


def save_base_model(built: BuiltModel, path: Path) -> None:
    """Save a randomly initialised base, and record its path so adapters name a base that exists."""
    built.model.save_pretrained(path)
    built.model.config._name_or_path = str(path.resolve())


def save_run_config(cfg: TrainConfig, model: nn.Module, path: Path) -> None:
    """The config as run, with the mask seed that apply_spra drew when spra.seed was null."""
    resolved = dataclasses.replace(cfg, spra=dataclasses.replace(cfg.spra, seed=model.spra_config.seed))
    path.write_text(yaml.safe_dump(to_dict(resolved), sort_keys=False))

