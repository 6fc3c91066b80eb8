"""Run outputs: ``metrics.jsonl`` (one JSON object per logged step, also sent to ``report_to``), ``loss.png``,
``summary.json``; after a resume, ``metrics.superseded.jsonl`` holds the lines the resumed steps replaced."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from spra_dist.train.trackers import Tracker
from spra_dist.utils.atomic import atomic_files, write_text_atomic


class MetricsLog:
    """Appends one JSON line per record, keeps the records for the plot and hands each to the tracker, if any
    (only rank 0 writes).

    ``resume_step``: a run resumed from the checkpoint of that step continues the log it left. Lines past that step
    (written after the checkpoint, by the job that stopped) are moved to ``metrics.superseded.jsonl`` beside it,
    so the log, and the plot drawn from it, never step back."""

    def __init__(self, path: Path, *, resume_step: int | None = None, enabled: bool = True,
                 tracker: Tracker | None = None):
        self.path, self.enabled, self.tracker = path, enabled, tracker
        self.records: list[dict[str, Any]] = []
        if enabled and resume_step is not None and path.is_file():
            self.records = _keep_until(path, resume_step)
        elif enabled:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("")  # a rerun into the same output_dir starts a fresh log

    def write(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        if self.tracker is not None:
            self.tracker.log(record)

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.close()
            self.tracker = None


def superseded_path(path: Path) -> Path:
    """Where the lines a resume replaced are kept: ``metrics.jsonl`` -> ``metrics.superseded.jsonl``."""
    return path.with_suffix(".superseded" + path.suffix)


def _keep_until(path: Path, step: int) -> list[dict[str, Any]]:
    """The records of ``path`` up to ``step``; later ones are appended to the superseded file first, then
    ``path`` is rewritten atomically, so a crash in between leaves a line in both files, never in neither."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]
    keep = [r.get("step", 0) <= step for r in records]
    if all(keep):
        return records
    with open(superseded_path(path), "a") as f:
        f.write("".join(line + "\n" for line, k in zip(lines, keep, strict=True) if not k))
        f.flush()
        os.fsync(f.fileno())
    write_text_atomic(path, "".join(line + "\n" for line, k in zip(lines, keep, strict=True) if k))
    return [r for r, k in zip(records, keep, strict=True) if k]


def plot_loss(records: list[dict[str, Any]], path: Path, *, metric: str) -> None:
    """Training loss per step; ``metric`` (accuracy / perplexity) at the evaluated steps on a second axis."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on training machines
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    train = [r for r in records if "loss" in r]
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], color="tab:blue", label="train loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("train loss (mean over each log interval)", color="tab:blue")
    evals = [r for r in records if metric in r and math.isfinite(r[metric])]
    if evals:
        ax2 = ax.twinx()
        ax2.plot([r["step"] for r in evals], [r[metric] for r in evals], "o-", color="tab:orange")
        ax2.set_ylabel(f"eval {metric}", color="tab:orange")
    ax.set_title("SpaRA fine-tuning")
    fig.tight_layout()
    with atomic_files(path.parent) as tmp:
        fig.savefig(tmp / path.name, dpi=100)
    plt.close(fig)


def write_summary(path: Path, summary: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(summary, indent=2, sort_keys=True) + "\n")
