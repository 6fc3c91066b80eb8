"""The ``spra`` command line end to end on tiny models: train, inspect, merge, and errors."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tiny_run import EVAL_EVERY, LOG_EVERY, STEPS

from spra_dist import load_adapter
from spra_dist.cli import main

ROOT = Path(__file__).resolve().parents[1]
DEBUG = ROOT / "configs" / "train" / "debug_tiny_llama.yaml"


@pytest.fixture(scope="module")
def bert_run(tmp_path_factory) -> Path:
    """A classifier with a densely trained head, so merge must carry num_labels and the head's weights."""
    out = tmp_path_factory.mktemp("bert") / "run"
    code = main(["train", "--config", str(DEBUG), f"output_dir={out}", "max_steps=4", "model.source=tiny_bert",
                 "task=classification", "trainable_modules=[classifier]", "num_labels=3", "max_length=32",
                 "train_size=64", "eval_size=32", "lr=1e-2"])
    assert code == 0
    return out


def test_train_writes_every_output(tiny_run):
    for name in ("adapter/adapter.safetensors", "adapter/adapter_config.json", "metrics.jsonl", "loss.png",
                 "summary.json", "config.yaml", "base_model/config.json"):
        assert (tiny_run / name).is_file(), name
    assert (tiny_run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_metrics_and_summary_are_sane(tiny_run):
    records = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert (STEPS, LOG_EVERY, EVAL_EVERY) == (6, 2, 3)  # the steps below: logs at 2, 4, 6, evals at 0, 3, 6
    assert [r["step"] for r in records] == [0, 2, 3, 4, 6]
    assert {"perplexity", "eval_loss"} <= records[0].keys() and "loss" not in records[0]
    trained = [r for r in records if "loss" in r]
    assert all(math.isfinite(r["loss"]) and r["tokens_per_s"] > 0 and r["lr"] > 0 for r in trained)
    assert "perplexity" in records[2] and "perplexity" in records[-1]  # eval_every=3 and the last step

    summary = json.loads((tiny_run / "summary.json").read_text())
    # A random model over a 259-id vocabulary starts near perplexity 259; training must lower it.
    assert 150 < summary["perplexity_before"] < 500
    assert summary["perplexity_after"] < summary["perplexity_before"]
    assert summary["perplexity_after"] == pytest.approx(records[-1]["perplexity"])
    assert summary["steps"] == STEPS and summary["wall_time_s"] > 0
    config = json.loads((tiny_run / "adapter" / "adapter_config.json").read_text())
    k_total = sum(layer["k"] for layer in config["layers"].values())
    assert summary["k_total"] == k_total == summary["trainable_parameters"]  # no dense modules here
    assert config["seed"] == 1234 == summary["mask_seed"]


def test_inspect_prints_layers_and_totals(tiny_run, capsys):
    adapter = tiny_run / "adapter"
    assert main(["inspect", str(adapter)]) == 0
    out = capsys.readouterr().out
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert "seed:         1234" in out
    assert f"mask_version: {config['mask_version']}" in out
    for name, layer in config["layers"].items():
        line = next(row for row in out.splitlines() if row.strip().startswith(name + " "))
        assert f"{layer['shape'][0]} x {layer['shape'][1]}" in line and f"k={layer['k']}" in line
    k_total = sum(layer["k"] for layer in config["layers"].values())
    assert f"total k:      {k_total:,}" in out
    assert f"{(adapter / 'adapter.safetensors').stat().st_size:,} bytes" in out


def test_inspect_accepts_a_run_directory(tiny_run, capsys):
    """``spra inspect runs/x`` describes runs/x/adapter, the same as naming the adapter itself."""
    assert main(["inspect", str(tiny_run / "adapter")]) == 0
    direct = capsys.readouterr().out
    assert main(["inspect", str(tiny_run)]) == 0
    assert capsys.readouterr().out == direct
    assert direct.startswith(f"adapter:      {tiny_run / 'adapter'}\n")


def test_version_prints_the_package_version(capsys):
    from importlib.metadata import version

    import spra_dist

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"spra {spra_dist.__version__}\n"
    assert spra_dist.__version__ == version("spra_dist")  # the one pyproject.toml gives


def _merge_and_compare(run: Path, merged: Path, model_class, input_ids: torch.Tensor, extra: list[str]) -> None:
    """Merge ``run``'s adapter into ``merged`` (outside the run: merge refuses to write into it), compare logits."""
    assert main(["merge", "--adapter", str(run / "adapter"), "--out", str(merged), *extra]) == 0
    with safe_open(str(merged / "model.safetensors"), "pt") as f:
        assert not any("spra" in key for key in f.keys())  # a plain HF checkpoint
    plain = model_class.from_pretrained(merged).eval()
    base = model_class.from_pretrained(run / "base_model", config=plain.config).eval()
    with torch.no_grad():
        base_logits = base(input_ids).logits
        spra = load_adapter(base, run / "adapter").eval()
        want = spra(input_ids).logits
        got = plain(input_ids).logits
    assert not torch.allclose(want, base_logits, atol=1e-4)  # the adapter changed something
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_merge_gives_plain_model_with_same_logits(tiny_run, tmp_path):
    from transformers import LlamaForCausalLM

    ids = torch.tensor([list(b"To be, or not to be")])
    _merge_and_compare(tiny_run, tmp_path / "merged", LlamaForCausalLM, ids, [])  # base: the adapter's record


@pytest.mark.slow
def test_merge_classifier_with_dense_head(bert_run, tmp_path):
    from transformers import BertForSequenceClassification

    ids = torch.tensor([[257, *b"abcmmmzz"]])
    _merge_and_compare(bert_run, tmp_path / "merged", BertForSequenceClassification, ids,
                       ["--base", str(bert_run / "base_model")])
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"] and len(config["id2label"]) == 3


@pytest.mark.parametrize(("argv", "message"), [
    (["train", "--config", str(DEBUG), "lora_rnak=4"], "did you mean 'lora_rank'"),
    (["train", "--config", "missing.yaml"], "does not exist"),
    (["train", "--config", str(DEBUG), "max_steps=many"], "max_steps='many' has the wrong type"),
    (["inspect", "no/such/adapter"], "adapter_config.json not found"),
    (["merge", "--adapter", "no/such/adapter", "--out", "x"], "not found"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.slow
def test_python_dash_m_is_the_same_cli(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "spra_dist", "train", "--config", str(DEBUG), "spra.lora_rnk=2"],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: unknown config key 'spra.lora_rnk'; did you mean "
                                                "'spra.lora_rank'?"]


@pytest.mark.slow
def test_single_process_run_never_imports_deepspeed(tmp_path):
    """A run that does not use DeepSpeed neither imports it (seconds) nor prints its "Setting accelerator to CPU"
    warning: transformers' save_pretrained (the random base) would have accelerate import it for an isinstance."""
    script = ("import sys; from spra_dist.cli import main; code = main(sys.argv[1:]); "
              "print('deepspeed imported:', 'deepspeed' in sys.modules); sys.exit(code)")
    argv = ["train", "--config", str(DEBUG), f"output_dir={tmp_path / 'run'}", "max_steps=1", "train_size=16",
            "eval_size=8", "eval_every=0"]
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}  # set, it would only hide the warning
    proc = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, cwd=tmp_path,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "run" / "base_model" / "config.json").is_file()  # the save that used to import it ran
    assert "deepspeed imported: False" in proc.stdout, proc.stdout[-2000:]
    assert "Setting accelerator" not in proc.stdout + proc.stderr


def test_a_reader_that_leaves_early_is_not_an_error(tiny_run):
    """``spra inspect runs/x | head -1``: the pipe closes before spra writes; that is no failure to report."""
    proc = subprocess.Popen([sys.executable, "-m", "spra_dist", "inspect", str(tiny_run)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # the reader is gone before the interpreter has even started
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 0 and err == "", err
