"""The training recipe, one readable path: config -> model -> SpaRA -> (engine) -> train -> adapter.

    HF_HUB_OFFLINE=1 spra train --config configs/train/debug_tiny_llama.yaml max_steps=5

Outputs in ``output_dir``: ``adapter/`` (adapter.safetensors + adapter_config.json), ``metrics.jsonl``,
``loss.png``, ``summary.json``, ``config.yaml``, and ``base_model/`` when the base is a random init.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from torch import nn

from spra_dist.adapters.base import rebuild_quantized_base
from spra_dist.adapters.files import load_adapter, read_adapter_config, save_adapter
from spra_dist.core.model import apply_spra, check_targets, quantize_targets, spra_modules, trainable_parameters
from spra_dist.core.quantized import check_quantize_engine
from spra_dist.core.registry import spra_config
from spra_dist.data.build import DataSplits, build_data
from spra_dist.data.packing import check_packing
from spra_dist.data.tokens import collate, global_batch, rank_slice, split_micro
from spra_dist.distributed.comm import CommCounter, count_ddp
from spra_dist.distributed.deepspeed import fill_deepspeed_config, load_deepspeed_config
from spra_dist.distributed.devices import backend_for, collective_device, train_device
from spra_dist.distributed.engines import Engine, check_batch_split, resolve_engine, resolve_mixed_precision
from spra_dist.distributed.faults import explain, forget_monitor_group, is_collective_failure, make_monitor_group
from spra_dist.distributed.group import init_distributed, launched_world_size, on_rank0, shutdown, world
from spra_dist.distributed.loading import LoadPlan, plan_load
from spra_dist.distributed.parallelize import parallelize, shards_base
from spra_dist.train.checkpoint import Checkpoint, load_optimizer, load_values, resolve_resume, save_checkpoint
from spra_dist.train.config import TrainConfig, to_dict
from spra_dist.train.eval import evaluate, generate_eval
from spra_dist.train.guard import NonFiniteError, Preempted, StepGuard
from spra_dist.train.loop import build_optimizer, build_schedule, set_schedule_step, train_step
from spra_dist.train.models import BuiltModel, build_model
from spra_dist.train.progress import progress
from spra_dist.train.report import MetricsLog, plot_loss, write_summary
from spra_dist.train.resume import check_resume, finished_summary, has_adapter, resume_advice
from spra_dist.train.trackers import open_tracker
from spra_dist.utils.atomic import atomic_files, write_text_atomic
from spra_dist.utils.pretrained import save_pretrained

SAMPLES_KEPT = 20  # generated answers written to samples.jsonl at each evaluation


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run the whole recipe on this rank; returns the summary (rank 0 writes ``output_dir/summary.json``).

    Raises :class:`Preempted` after a preemption signal (a checkpoint was written), :class:`NonFiniteError`
    when non-finite values end the run, and :class:`RankLost` naming the rank when another rank died or hung.
    """
    cfg.validate()
    engine_name = resolve_engine(cfg.engine, deepspeed_config=cfg.deepspeed_config, world_size=launched_world_size())
    device = train_device(cfg.device)
    if engine_name == "deepspeed":
        load_deepspeed_config(cfg.deepspeed_config)  # a bad preset fails here, before a group or a write
    check_quantize_engine(cfg.model.quantize_base, engine=engine_name)
    # ddp / fsdp2 / deepspeed need a process group, also for one process (a single GPU, a config tried out).
    rank, world_size = init_distributed(backend=backend_for(device), timeout_s=cfg.dist_timeout_s,
                                        group=engine_name != "none")
    make_monitor_group(cfg.dist_timeout_s)
    try:
        with StepGuard(on_nonfinite=cfg.on_nonfinite, max_skips=cfg.max_nonfinite_skips) as guard:
            summary = _train(cfg, engine_name, device, rank, world_size, guard)
    except (Preempted, NonFiniteError, ValueError, OSError):
        shutdown()  # every rank raised at the same point: leave together
        raise
    except RuntimeError as err:
        # A peer died or hung: no collective can complete, so skip the goodbye barrier and say who is lost.
        if world_size > 1 and is_collective_failure(err):
            advice = resume_advice(cfg.output_dir, checkpoint_every=cfg.checkpoint_every, max_steps=cfg.max_steps)
            raise explain(err, probe_timeout_s=min(30, cfg.dist_timeout_s), advice=advice) from err
        raise
    finally:
        forget_monitor_group()
    shutdown()
    return summary


def _train(cfg: TrainConfig, engine_name: str, device: torch.device, rank: int, world_size: int,
           guard: StepGuard) -> dict[str, Any]:
    mixed_precision = resolve_mixed_precision(cfg.mixed_precision)
    check_batch_split(cfg.batch_size, cfg.grad_accum)
    counter = CommCounter.install() if cfg.comm_stats else None  # before DeepSpeed caches the collectives
    out = Path(cfg.output_dir)
    started = time.perf_counter()
    ckpt = resolve_resume(cfg.resume, out)
    on_rank0(lambda: check_output_dir(out, overwrite=cfg.overwrite, resume=cfg.resume, checkpoint=ckpt))
    if ckpt is not None:
        resume = check_resume(cfg, ckpt, out)  # every rank reads the same files and decides the same
        if resume.finished:
            return finished_summary(out, ckpt.step)
        if resume.note:
            on_rank0(lambda: print(resume.note, flush=True))

    # fsdp2 and ZeRO-3 shard the base: build it on the meta device, and let each rank load only what it keeps.
    preset = load_deepspeed_config(cfg.deepspeed_config) if engine_name == "deepspeed" else None
    built = build_model(cfg.model, seed=cfg.seed, meta=shards_base(engine_name, preset))
    check_targets(built.model, cfg.spra, quantize_base=cfg.model.quantize_base)
    splits = build_data(cfg.data, task=cfg.model.task, codec=built.codec, num_labels=cfg.model.num_labels,
                        timeout_s=cfg.dist_timeout_s)
    if cfg.data.sample_packing and built.base is None:
        check_packing(built.model)
    # Nothing is written before this point, so a mistake in the config or the data leaves no partial run.
    if built.from_config:
        on_rank0(lambda: save_base_model(built, out / "base_model"))
        built.model.config._name_or_path = str((out / "base_model").resolve())  # adapters name a base that exists
    spra_cfg = cfg.spra if ckpt is None else dataclasses.replace(cfg.spra, seed=ckpt.meta["mask_seed"])
    model = apply_spra(built.model, spra_cfg)
    quantize_targets(model, cfg.model.quantize_base)  # on meta too: the packed shapes, filled as each rank loads
    # Built on meta: every tensor is matched to the base's now (a missing one fails before the run writes anything);
    # the engine loads each rank's part after sharding.
    plan = plan_load(model, built.base, initial=built.initial, device=device) if built.base is not None else None
    if ckpt is not None:
        load_values(model, ckpt, plan=plan)
    if plan is None:
        model.to(device)  # masks and values with it; batches follow the model's device in the engine
    engine = wrap_model(model, cfg, engine_name=engine_name, mixed_precision=mixed_precision, counter=counter,
                        plan=plan)
    if cfg.data.sample_packing and plan is not None:
        check_packing(engine.model)  # it runs the model, so on a sharded base only now (a forward on every rank)
    # After the load and the packing check: a base that fails either leaves no config behind.
    on_rank0(lambda: save_run_config(cfg, model, out / "config.yaml"))
    start = 0 if ckpt is None else ckpt.step
    if ckpt is not None:
        engine.prime(micro_batches(splits, cfg, step=start, pad_id=built.codec.pad_id))
        load_optimizer(engine, ckpt)
        set_schedule_step(engine.scheduler, start)

    tracker = open_tracker(cfg.report_to, out, to_dict(cfg)) if rank == 0 else None
    log = MetricsLog(out / "metrics.jsonl", resume_step=start if ckpt is not None else None, enabled=rank == 0,
                     tracker=tracker)
    evaluate_now = _evaluator(engine.model, splits, cfg, built.codec, out)
    before = evaluate_now()
    log.write({"step": start, **before})
    after, stats = run_steps(engine, splits, cfg, log=log, evaluate_now=evaluate_now, pad_id=built.codec.pad_id,
                             start=start, counter=counter, guard=guard)

    state = {name: engine.full_value(p) for name, p in trainable_parameters(engine.model)}
    save_adapter(engine.model, out / "adapter", state=state, label_names=splits.label_names)
    metric = "accuracy" if cfg.model.task == "classification" else "perplexity"
    summary = {
        f"{metric}_before": before[metric], f"{metric}_after": after[metric],
        "eval_loss_before": before["eval_loss"], "eval_loss_after": after["eval_loss"],
        "trainable_parameters": sum(v.numel() for v in state.values()),
        "k_total": sum(m.k for _, m in spra_modules(engine.model)),
        "adapted_matrices": len(spra_modules(engine.model)),
        "steps": stats["last_step"], "max_steps": cfg.max_steps, "resumed_from_step": ckpt.step if ckpt else None,
        "train_examples": splits.stats["train_examples"], "eval_examples": splits.stats["eval_examples"],
        "train_packs": splits.stats.get("packs"),
        "data": {k: v for k, v in splits.stats.items() if k in ("train", "eval")},
        "label_names": splits.label_names,
        "engine": engine.name, "world_size": world_size, "device": device.type, "mixed_precision": mixed_precision,
        "optimizer_state_numel_per_rank": _gather_ints(engine.local_optimizer_numel()),
        "grad_bytes_per_step": stats.get("grad_bytes"), "comm_bytes_per_step": stats.get("comm_bytes"),
        "wall_time_s": round(time.perf_counter() - started, 2),
        "mask_seed": spra_config(engine.model).seed,
        "nonfinite_skipped_steps": guard.skipped,
    }
    for key in ("macro_f1", "exact_match", "contains"):
        if key in after:
            summary[f"{key}_before"], summary[f"{key}_after"] = before[key], after[key]
    if rank == 0:
        plot_loss(log.records, out / "loss.png", metric=metric)
        write_summary(out / "summary.json", summary)
    log.close()
    return summary


def wrap_model(model: nn.Module, cfg: TrainConfig, *, engine_name: str, mixed_precision: str,
               counter: CommCounter | None = None, plan: LoadPlan | None = None) -> Engine:
    """The adapted, unwrapped model handed to its engine (``parallelize``), with this config's optimizer,
    schedule and, for DeepSpeed, the preset filled from this config. ``plan``: the model was built on the meta
    device, and the engine loads this base after sharding it."""
    ds_config = None
    if engine_name == "deepspeed":
        ds_config = fill_deepspeed_config(load_deepspeed_config(cfg.deepspeed_config), batch_size=cfg.batch_size,
                                          grad_accum=cfg.grad_accum, world_size=world()[1],
                                          max_grad_norm=cfg.max_grad_norm, mixed_precision=mixed_precision)
    engine = parallelize(model, engine=engine_name, mixed_precision=mixed_precision, deepspeed_config=ds_config,
                         make_optimizer=lambda m: build_optimizer(m, cfg),
                         make_scheduler=lambda o: build_schedule(o, cfg), plan=plan)
    if counter is not None and engine_name == "ddp":
        count_ddp(engine.runner)
    return engine


def micro_batches(splits: DataSplits, cfg: TrainConfig, *, step: int, pad_id: int) -> list[dict]:
    """This rank's micro batches of optimizer step ``step``: the global batch is a function of (seed, step).

    Causal LM: the loss is the sum over supervised tokens divided by the supervised tokens of the whole global
    batch (every rank counts them from the same indices, no collective). Each micro batch's loss is its sum
    over ``num_items_in_batch`` = total / (ranks x micro batches), because the engines then average over
    micro batches and ranks: 1 rank x 4 micro batches, 2 x 2 and 4 x 1 give the same gradient."""
    rank, world_size = world()
    indices = global_batch(len(splits.train), batch_size=cfg.batch_size, step=step, seed=cfg.seed)
    mine = rank_slice(indices, rank=rank, world_size=world_size)
    parts = split_micro(mine, cfg.grad_accum, lengths=splits.train.lengths())
    batches = [collate(splits.train, part, pad_id=pad_id) for part in parts]
    if not splits.train.classification:
        per = max(1, splits.train.n_trained(indices)) / (world_size * len(parts))
        for batch in batches:
            batch["num_items_in_batch"] = per  # a float: engines cast tensor inputs (DeepSpeed bf16), not floats
    return batches


def run_steps(engine, splits: DataSplits, cfg: TrainConfig, *, log: MetricsLog, evaluate_now, pad_id: int,
              start: int = 0, counter: CommCounter | None = None,
              guard: StepGuard | None = None) -> tuple[dict[str, float], dict[str, Any]]:
    """Optimizer steps ``start .. max_steps`` (or ``stop_after``), with logging, evaluation and checkpoints.

    Returns the evaluation after the last step, and step statistics (bytes on the wire per step). With a
    ``guard``, a preemption signal ends the run after the step in flight and one checkpoint, and non-finite
    steps are dropped or stop the run (spra_dist.train.guard)."""
    guard = guard or StepGuard(on_nonfinite=cfg.on_nonfinite, max_skips=cfg.max_nonfinite_skips)
    engine.model.train()
    end = cfg.stop_after or cfg.max_steps
    stats: dict[str, Any] = {"last_step": start}
    bar = progress(range(start, end), desc="train", enabled=world()[0] == 0)  # plain lines when not a terminal
    metrics: dict[str, float] = {}
    window: list[float] = []  # losses since the last log line: the logged loss is their mean
    for step in bar:
        started = time.perf_counter()
        micro = micro_batches(splits, cfg, step=step, pad_id=pad_id)
        lr = engine.scheduler.optimizer.param_groups[0]["lr"]
        if counter is not None:
            counter.reset()
        result = train_step(engine, micro, max_grad_norm=cfg.max_grad_norm, guard=guard)
        if counter is not None:
            stats.update(grad_bytes=counter.gradient_bytes(), comm_bytes=counter.bytes_by_op())
        tokens_per_s = result.tokens * world()[1] / max(time.perf_counter() - started, 1e-9)
        bar.set_postfix(loss=f"{result.loss:.4f}", tok_s=f"{tokens_per_s:.0f}")
        done = stats["last_step"] = step + 1
        if not result.applied:
            log.write({"step": done, "nonfinite_skipped": True, "nonfinite_skipped_total": guard.skipped,
                       "loss": result.loss if math.isfinite(result.loss) else None})
            _stop_if_nonfinite(guard, engine, cfg, step)
        else:
            window.append(result.loss)
        record: dict[str, Any] = {}
        if window and (done % cfg.log_every == 0 or done == end):  # a dropped step logs its own line
            record = {"step": done, "loss": sum(window) / len(window), "lr": lr,
                      "tokens_per_s": round(tokens_per_s, 1), "grad_norm": result.grad_norm}
            window.clear()
            if counter is not None:
                record["grad_bytes"] = stats["grad_bytes"]
        if (cfg.eval_every and done % cfg.eval_every == 0) or done == end:
            metrics = evaluate_now()
            record = {"step": done, **record, **metrics}
        if record:
            log.write(record)
        saved = cfg.checkpoint_every and (done % cfg.checkpoint_every == 0 or done == end)
        if saved or (guard.preempt and done < end):
            path = save_checkpoint(engine, cfg.output_dir, step=done, mask_seed=spra_config(engine.model).seed,
                                   keep=max(cfg.checkpoint_keep, 1), config=to_dict(cfg))
        if guard.preempt and done < end:  # every rank agreed on the signal in this step's decision
            bar.close()
            raise Preempted(guard.preempted_message(done, path), step=done)
    bar.close()
    return metrics or evaluate_now(), stats


def _stop_if_nonfinite(guard: StepGuard, engine, cfg: TrainConfig, step: int) -> None:
    """After a dropped step: when the policy ends the run, save the last good state (``step`` updates)."""
    try:
        guard.check_nonfinite(step + 1)
    except NonFiniteError:
        save_checkpoint(engine, cfg.output_dir, step=step, mask_seed=spra_config(engine.model).seed,
                        keep=max(cfg.checkpoint_keep, 1), config=to_dict(cfg))
        raise


def _gather_ints(value: int) -> list[int]:
    """``value`` from every rank, in rank order."""
    if world()[1] == 1:
        return [value]
    device = collective_device()
    out = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world()[1])]
    dist.all_gather(out, torch.tensor([value], dtype=torch.int64, device=device))
    return [int(t.item()) for t in out]


def _evaluator(model: nn.Module, splits: DataSplits, cfg: TrainConfig, codec, out: Path):
    def evaluate_now() -> dict[str, float]:
        metrics = evaluate(model, splits.eval, task=cfg.model.task, pad_id=codec.pad_id,
                           batch_size=cfg.eval_batch_size)
        if cfg.eval_generate:
            scores, samples = generate_eval(model, splits.eval, codec=codec, n=cfg.eval_generate,
                                            max_new_tokens=cfg.eval_generate_max_tokens,
                                            end_of_turn=splits.end_of_turn)
            metrics.update(scores)
            text = "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples[:SAMPLES_KEPT])
            on_rank0(lambda: write_text_atomic(out / "samples.jsonl", text))
        return metrics

    return evaluate_now


def check_output_dir(out: Path, *, overwrite: bool, resume: str | None, checkpoint: Checkpoint | None = None) -> None:
    """Refuse to train over an earlier run's adapter unless asked to: overwrite=true, or a resume that found the
    run's ``checkpoint`` (resume=auto without one would start over)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"output_dir {out} is a file; give a directory (it is created if missing)")
    if overwrite or not has_adapter(out):
        return
    adapter = out / "adapter"
    if not resume:
        raise ValueError(f"output_dir {out} already holds the adapter of an earlier run ({adapter}); pass "
                         f"overwrite=true to replace it, resume=auto to continue that run, or another output_dir")
    if checkpoint is None:
        raise ValueError(f"resume={resume}: output_dir {out} holds a finished run ({adapter}) and no checkpoint to "
                         f"continue it from, so this run would start over and replace it; pass overwrite=true to "
                         f"replace it, or give another output_dir")


def save_base_model(built: BuiltModel, path: Path) -> None:
    """Save a randomly initialised base, so adapters name a base that exists."""
    with atomic_files(path) as tmp:
        save_pretrained(built.model, tmp)


def evaluate_adapter(cfg: TrainConfig, base_dir: str | Path, adapter_dir: str | Path) -> dict[str, float]:
    """Evaluate ``base_dir`` + ``adapter_dir`` in this one process on the config's eval split."""
    built = build_model(cfg.model, seed=cfg.seed)
    model = type(built.model).from_pretrained(base_dir)
    load_adapter(model, adapter_dir)
    rebuild_quantized_base(model, read_adapter_config(adapter_dir)[0].get("base_quantization"))
    splits = build_data(cfg.data, task=cfg.model.task, codec=built.codec, num_labels=cfg.model.num_labels)
    return evaluate(model, splits.eval, task=cfg.model.task, pad_id=built.codec.pad_id,
                    batch_size=cfg.eval_batch_size)


def save_run_config(cfg: TrainConfig, model: nn.Module, path: Path) -> None:
    """The config as run, with the mask seed that apply_spra drew when spra.seed was null."""
    resolved = dataclasses.replace(cfg, spra=dataclasses.replace(cfg.spra, seed=spra_config(model).seed))
    write_text_atomic(path, yaml.safe_dump(to_dict(resolved), sort_keys=False))

