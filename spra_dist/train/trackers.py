"""Experiment trackers: the scalars of ``metrics.jsonl`` and the run's config, in TensorBoard or W&B.

    report_to: tensorboard     # event files in <output_dir>/tensorboard (tensorboard --logdir runs/)
    report_to: wandb           # an offline W&B run in <output_dir>/wandb (wandb sync uploads it later)

Only rank 0 reports, the same records it writes to ``metrics.jsonl``. W&B runs offline: training machines
often have no network, and a run must never wait on one. W&B's service process writes the run file and closes it
after the run finishes, on its own time: it is complete once the training process exits (``spra train``), or, when
training ran inside your own Python process, after ``wandb.teardown()``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Literal, Protocol, get_args

TrackerName = Literal["none", "tensorboard", "wandb"]
TRACKERS: tuple[str, ...] = get_args(TrackerName)


class Tracker(Protocol):
    def log(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a metrics record, without its step."""
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class TensorBoardTracker:
    def __init__(self, out: Path, config: dict[str, Any]) -> None:
        import yaml
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(out / "tensorboard"))
        self.writer.add_text("config", "```\n" + yaml.safe_dump(config, sort_keys=False) + "```")

    def log(self, record: dict[str, Any]) -> None:
        for key, value in scalars(record).items():
            self.writer.add_scalar(key, value, global_step=int(record["step"]))
        self.writer.flush()  # at log intervals only: a preempted run keeps its curve

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    def __init__(self, out: Path, config: dict[str, Any]) -> None:
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "spra_dist"), name=out.name, dir=str(out),
                              config=config, mode="offline", reinit="finish_previous")

    def log(self, record: dict[str, Any]) -> None:
        self.run.log(scalars(record), step=int(record["step"]))

    def close(self) -> None:
        self.run.finish()


def check_tracker(name: TrackerName) -> None:
    """``ValueError`` for an unknown tracker or one whose library is missing (before the run writes anything)."""
    if name not in TRACKERS:
        raise ValueError(f"report_to={name!r} is not one of {', '.join(TRACKERS)}")
    if name != "none":  # each tracker is the package of its name
        import importlib.util

        if importlib.util.find_spec(name) is None:
            raise ValueError(f"report_to={name} needs the {name} package: pip install {name}")


def open_tracker(name: TrackerName, out: Path, config: dict[str, Any]) -> Tracker | None:
    match name:
        case "tensorboard":
            return TensorBoardTracker(out, config)
        case "wandb":
            return WandbTracker(out, config)
    return None
