"""The two shipped data configs: smollm2_sft.yaml trains end to end at a reduced size, and minilm_csv.yaml
reads the same examples as the bundled demo (minilm_rotten_tomatoes.yaml) through the generic CSV path."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from spra_dist.data.build import build_data
from spra_dist.demos.dates import write as write_dates
from spra_dist.demos.reviews import write as write_reviews
from spra_dist.train.config import load_config
from spra_dist.train.models import build_codec

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs" / "train"


@pytest.mark.slow
def test_smollm2_sft_trains_end_to_end(tmp_path):
    data = write_dates(tmp_path / "dates", train=16, evals=4)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "spra_dist", "train", "--config", str(CONFIGS / "smollm2_sft.yaml"),
           f"data.datasets=[{{path: {data / 'train.jsonl'}, type: chat}}]",
           f"data.eval_datasets=[{{path: {data / 'eval.jsonl'}, type: chat}}]",
           f"data.dataset_prepared_path={tmp_path / 'cache'}", f"output_dir={out}",
           "max_steps=2", "batch_size=2", "warmup_steps=0", "eval_size=2", "eval_generate=2",
           "eval_generate_max_tokens=12", "log_every=1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["train_examples"] == 16 and summary["eval_examples"] == 2
    assert 0.0 <= summary["exact_match_before"] <= 1.0 and 0.0 <= summary["exact_match_after"] <= 1.0
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 and all(len(s["reference"]) == 10 for s in samples)  # YYYY-MM-DD
    assert (out / "adapter" / "adapter_config.json").is_file()


def test_minilm_csv_reads_the_demos_examples(tmp_path):
    write_reviews(tmp_path / "reviews")
    demo = load_config(CONFIGS / "minilm_rotten_tomatoes.yaml")
    csv = load_config(CONFIGS / "minilm_csv.yaml", [
        f"data.datasets=[{{path: {tmp_path}/reviews/train.csv, type: classification, "
        "column_map: {text: review, label: sentiment}, max_samples: 3200}]",
        f"data.eval_datasets=[{{path: {tmp_path}/reviews/eval.csv, type: classification, "
        "column_map: {text: review, label: sentiment}}]", f"data.dataset_prepared_path={tmp_path / 'cache'}"])
    codec = build_codec(demo.model)
    a = build_data(demo.data, task="classification", codec=codec)
    b = build_data(csv.data, task="classification", codec=codec)
    assert b.label_names == ["rotten", "fresh"]
    for x, y in ((a.train, b.train), (a.eval, b.eval)):
        assert len(x) == len(y)
        assert x.ds["input_ids"] == y.ds["input_ids"]
        assert np.array_equal(np.array(x.ds["label"]), np.array(y.ds["label"]))
