"""report_to: the loss curve and config of metrics.jsonl reach TensorBoard and an offline W&B run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from spra_dist.cli import main

ROOT = Path(__file__).resolve().parents[1]
DEBUG = str(ROOT / "configs" / "train" / "debug_tiny_llama.yaml")


def train(out: Path, tracker: str) -> list[dict]:
    assert main(["train", "--config", DEBUG, f"output_dir={out}", "max_steps=4", "log_every=2", "eval_size=16",
                 f"report_to={tracker}"]) == 0
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_tensorboard_event_file_holds_the_loss_curve(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    records = train(tmp_path / "run", "tensorboard")
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    curve = [(e.step, e.value) for e in events.Scalars("loss")]
    expected = [(r["step"], r["loss"]) for r in records if "loss" in r]
    assert [s for s, _ in curve] == [s for s, _ in expected] == [2, 4]
    assert [v for _, v in curve] == pytest.approx([v for _, v in expected], rel=1e-6)
    assert [e.step for e in events.Scalars("perplexity")] == [0, 4]
    assert "config" in "".join(events.Tags()["tensors"])  # the run's config as text


@pytest.mark.slow
def test_wandb_offline_run_holds_the_logged_values(tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_SILENT", "true")
    records = train(tmp_path / "run", "wandb")
    # run.finish() hands the run to W&B's service process, which closes the run file on its own time; teardown
    # waits for that process to exit, as it does when a training process ends.
    wandb.teardown()
    (run_file,) = (tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb")
    data = run_file.read_bytes()
    for record in records[1:]:  # history items are stored as JSON text
        assert json.dumps(record["loss"]).encode() in data
    assert b"lora_rank" in data  # the config


def test_unknown_tracker_is_refused(tmp_path, capsys):
    assert main(["train", "--config", DEBUG, f"output_dir={tmp_path / 'run'}", "report_to=mlflow"]) == 2
    assert "report_to='mlflow' is not one of none, tensorboard, wandb" in capsys.readouterr().err
