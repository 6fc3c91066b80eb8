"""Loading a base for a classifier: the new head is one line of ours, anything unexpected transformers' report."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from spra_dist.train.models import build_model
from spra_dist.train.schema import ModelConfig

HEAD_LINE = "score head newly initialised (the base has none): score.weight"  # and the base's lm_head dropped


@pytest.fixture
def reports():
    """The messages transformers logs while a test runs (its loggers do not reach pytest's caplog)."""
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    log = logging.getLogger("transformers")
    log.addHandler(handler)
    yield records
    log.removeHandler(handler)


@pytest.mark.parametrize("meta", [False, True])
def test_a_new_classifier_head_is_one_line_not_a_report(tiny_base, reports, capsys, meta):
    built = build_model(ModelConfig(source="hf", name_or_path=str(tiny_base), task="classification", num_labels=2),
                        seed=0, meta=meta)
    assert type(built.model).__name__ == "LlamaForSequenceClassification"
    out = capsys.readouterr()
    assert [line for line in out.out.splitlines() if "newly initialised" in line] == [HEAD_LINE]
    assert not [r for r in reports if "LOAD REPORT" in r or "MISSING" in r]
    assert "MISSING" not in out.err and "LOAD REPORT" not in out.err


def test_a_base_that_lacks_its_own_weight_still_gets_the_report(tiny_base, tmp_path, reports, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    broken = Path(shutil.copytree(tiny_base, tmp_path / "broken"))
    weights = load_file(broken / "model.safetensors")
    dropped = "model.layers.0.mlp.down_proj.weight"
    del weights[dropped]
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    build_model(ModelConfig(source="hf", name_or_path=str(broken), task="classification", num_labels=2), seed=0)
    report = [r for r in reports if "LOAD REPORT" in r]
    assert len(report) == 1 and "MISSING" in report[0] and "down_proj" in report[0] and "score" in report[0]
    assert "newly initialised" not in capsys.readouterr().out
