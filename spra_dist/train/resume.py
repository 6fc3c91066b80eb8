"""What a resume may do: continue the run its checkpoint belongs to, or be refused before anything is written.

    ckpt = resolve_resume(cfg.resume, out)            # spra_dist.train.checkpoint
    check_output_dir(out, overwrite=cfg.overwrite, resume=cfg.resume, checkpoint=ckpt)
    plan = check_resume(cfg, ckpt, out)               # ValueError naming each changed setting

- A checkpoint records the settings its run was trained with (``trainer_state.json``'s ``config``). A resume
  whose training settings differ (lr, schedule, batch, seeds, ``model.*``, ``data.*``, ``spra.*``) is refused,
  naming each key with both values. The settings of one job rather than of the run (engine, devices, logging,
  checkpoints, ``stop_after``; the ``JOB_KEYS``) may change between the jobs of a run.
- A larger ``max_steps`` extends the run (one line says so); a smaller one is refused.
- A checkpoint at the run's last step beside the adapter of that step is a finished run: nothing is left to do.
- ``resume=auto`` with no checkpoint starts fresh, unless a finished adapter is there: that is refused, since
  starting over would replace it (``overwrite=true`` says to).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spra_dist.train.checkpoint import META_NAME, Checkpoint
from spra_dist.train.schema import TrainConfig, to_dict
from spra_dist.utils.atomic import committed_file

JOB_KEYS = frozenset({
    "output_dir", "resume", "overwrite", "max_steps", "stop_after", "grad_accum", "engine", "deepspeed_config",
    "device", "mixed_precision", "checkpoint_every", "checkpoint_keep", "log_every", "eval_every",
    "eval_batch_size", "eval_generate", "eval_generate_max_tokens", "report_to", "comm_stats", "dist_timeout_s",
    "on_nonfinite", "max_nonfinite_skips", "model.gradient_checkpointing", "data.dataset_processes",
    "data.dataset_prepared_path",
})
"""Keys that may differ between the jobs of one run: where and how a job runs, logs and checkpoints, not what it
trains (``grad_accum`` splits the same global batch; ``max_steps`` is checked on its own)."""


@dataclass
class ResumePlan:
    checkpoint: Checkpoint
    finished: bool
    """The checkpoint is the run's last step and the adapter of that step is written: nothing to do."""
    note: str | None = None
    """One line for the user (the run is extended), or None."""


def has_adapter(out: Path) -> bool:
    """Whether ``out`` holds a run's adapter (also one whose last write is still being committed)."""
    adapter = out / "adapter"
    return (adapter / "adapter_config.json").exists() or committed_file(adapter, "adapter_config.json").exists()


def check_resume(cfg: TrainConfig, ckpt: Checkpoint, out: Path) -> ResumePlan:
    """Refuse (``ValueError``) a resume that would change the run ``ckpt`` belongs to; say what it does instead."""
    saved = ckpt.meta.get("config")
    changed = changed_settings(saved, cfg, mask_seed=ckpt.meta.get("mask_seed")) if saved else []
    saved_max = saved.get("max_steps") if saved else None
    if cfg.max_steps < ckpt.step or (saved_max is not None and cfg.max_steps < saved_max):
        was = f"{saved_max}, " if saved_max is not None else ""
        changed.insert(0, f"max_steps={cfg.max_steps} (the checkpoint's run: {was}checkpoint at step {ckpt.step}; "
                          f"only a larger max_steps extends a run, stop_after=N ends a job early)")
    if changed:
        raise ValueError(f"resume={cfg.resume}: checkpoint {ckpt.path} was trained with other settings: "
                         f"{'; '.join(changed)}. Resume with the checkpoint's values, or start a new run with "
                         f"overwrite=true or another output_dir")
    end = cfg.stop_after or cfg.max_steps
    if ckpt.step >= end and has_adapter(out) and _summary(out).get("steps") == ckpt.step:
        return ResumePlan(ckpt, finished=True)  # the adapter is of this step (summary.json is written after it)
    note = None
    if saved_max is not None and cfg.max_steps > saved_max:
        note = (f"extending the run in {out} from max_steps={saved_max} to {cfg.max_steps} "
                f"(resuming at step {ckpt.step}; the schedule now ends at step {cfg.max_steps})")
    return ResumePlan(ckpt, finished=False, note=note)


def changed_settings(saved: dict[str, Any], cfg: TrainConfig, *, mask_seed: int | None) -> list[str]:
    """``key=now (checkpoint: then)`` for each training setting of ``cfg`` that differs from ``saved``."""
    before, now = _flatten(saved), _flatten(json.loads(json.dumps(to_dict(cfg))))  # tuples as lists, as saved
    changed = []
    for key in sorted(set(before) | set(now)):
        if key in JOB_KEYS or key == "spra.seed":
            continue
        if key in before and key in now and before[key] != now[key]:
            changed.append(f"{key}={_show(now[key])} (checkpoint: {_show(before[key])})")
    # A null spra.seed takes the checkpoint's mask seed; a given one must be it.
    if cfg.spra.seed is not None and mask_seed is not None and cfg.spra.seed != mask_seed:
        changed.append(f"spra.seed={cfg.spra.seed} (checkpoint: {mask_seed})")
    return changed


def finished_summary(out: Path, step: int) -> dict[str, Any]:
    """The finished run's ``summary.json`` (``{}`` if it has none), marked as found finished at ``step``."""
    return {**_summary(out), "already_finished": True, "steps": step}


def _summary(out: Path) -> dict[str, Any]:
    path = out / "summary.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


def resume_advice(output_dir: str | Path, *, checkpoint_every: int, max_steps: int) -> str:
    """What a restart of this run would do, from what is on disk now: continue a checkpoint, or start over."""
    steps = sorted(p for p in (Path(output_dir) / "checkpoints").glob("step-*") if (p / META_NAME).is_file())
    if steps:
        step = int(steps[-1].name.split("-")[1])
        return f"restart it with resume=auto to continue from the checkpoint at step {step} ({steps[-1]})"
    suggest = checkpoint_every or max(1, max_steps // 10)
    why = "checkpoint_every=0" if not checkpoint_every else f"the first comes at step {checkpoint_every}"
    return (f"there is no checkpoint in {output_dir} ({why}), so a restart starts over; set "
            f"checkpoint_every={suggest} to make the run resumable")


def _flatten(raw: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, dict) and key in ("model", "data", "spra") and not prefix:
            flat.update(_flatten(value, f"{key}."))
        else:
            flat[prefix + key] = value
    return flat


def _show(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)
