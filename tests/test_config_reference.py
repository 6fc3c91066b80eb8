"""The config reference (``spra config``, ``spra train --help``, docs/config.md) and ``spra train --dry-run``.

    HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q tests/test_config_reference.py
"""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import LlamaConfig

from spra_dist.cli import main
from spra_dist.core.model import apply_spra, spra_modules
from spra_dist.train.config import load_config, valid_keys
from spra_dist.train.models import build_model
from spra_dist.train.reference import config_keys, markdown

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "train"


def test_docs_config_md_is_current():
    page = ROOT / "docs" / "config.md"
    assert page.read_text() == markdown(), "docs/config.md is stale: run spra config --markdown > docs/config.md"


def test_every_key_has_a_default_and_a_description():
    keys = {k.key: k for k in config_keys()}
    assert set(valid_keys()) <= set(keys)  # every settable key, plus the fields of a data.datasets entry
    assert {"data.datasets[].path", "data.datasets[].type", "data.datasets[].roles_to_train"} <= set(keys)
    assert [k for k, v in keys.items() if not v.doc or not v.default or not v.takes] == []
    assert (keys["max_steps"].default, keys["max_steps"].takes) == ("100", "int > 0")
    assert keys["schedule"].takes == "cosine | linear | constant"
    assert keys["data.eval_fraction"].takes == "float in (0, 1)"
    assert (keys["head_lr"].default, keys["head_lr"].takes) == ("null", "float or null")
    assert keys["data.datasets[].roles_to_train"].default == "[assistant]"


def test_train_help_and_spra_config_list_every_key(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--help"])
    assert exit_.value.code == 0
    help_text = capsys.readouterr().out
    assert main(["config"]) == 0
    listing = capsys.readouterr().out
    for text in (help_text, listing):
        lines = text.splitlines()
        for k in config_keys():
            assert any(line.startswith(f"  {k.key}={k.default}") for line in lines), k.key
    assert "--dry-run" in help_text
    # checkpointing is off by default, said where the key is listed
    line = next(i for i, line in enumerate(listing.splitlines()) if line.startswith("  checkpoint_every=0 "))
    assert "the default, writes none" in " ".join(listing.splitlines()[line:line + 3])
    assert main(["config", "--markdown"]) == 0
    assert capsys.readouterr().out == markdown()


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    config = CONFIGS / "debug_tiny_llama.yaml"
    assert main(["train", "--config", str(config), "--dry-run", "--world-size", "2", "spra.lora_rank=4"]) == 0
    out = capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []  # no runs/, no data cache, no base model
    # the k that apply_spra gives the model the run would build
    cfg = load_config(config, ["spra.lora_rank=4"])
    model = apply_spra(build_model(cfg.model, seed=cfg.seed).model, cfg.spra)
    k_total = sum(m.k for _, m in spra_modules(model))
    params = sum(p.numel() for p in model.parameters()) - k_total
    assert f"total k:      {k_total:,}\n" in out
    assert f"of {params:,} parameters ({100 * k_total / params:.3f}%)" in out
    assert "model.layers.*.mlp.down_proj     x2        64 x 128    k=768 each" in out
    assert "engine:       ddp, world size 2" in out
    assert "16 examples per step = 2 rank(s) x 2 micro batch(es) x 4" in out
    assert "checkpoints:  off (checkpoint_every=0)" in out


def test_dry_run_refuses_what_the_run_would(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    config = str(CONFIGS / "debug_tiny_llama.yaml")
    assert main(["train", "--config", config, "--dry-run", "--world-size", "3"]) == 2
    assert "must divide by world size 3" in capsys.readouterr().err
    assert main(["train", "--config", config, "--dry-run", "spra.target_modules=[nope]"]) == 2
    assert "matched no linear layer" in capsys.readouterr().err
    assert main(["train", "--config", config, "--world-size", "2"]) == 2
    assert "--world-size plans a --dry-run" in capsys.readouterr().err
    missing = tmp_path / "no_model"
    assert main(["train", "--config", config, "--dry-run", "model.source=hf", f"model.name_or_path={missing}"]) == 2
    assert "holds the model's config.json" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


# Llama-3-8B and -70B: (hidden, intermediate, layers, attention heads); 8 key/value heads, a 128256-token vocabulary.
LLAMA3 = {"llama3_8b_sft_fsdp2.yaml": ((4096, 14336, 32, 32), "fsdp2", 20_971_520),
          "llama3_70b_sft_zero3.yaml": ((8192, 28672, 80, 64), "deepspeed", 103_546_880)}


@pytest.mark.parametrize("name", sorted(LLAMA3))
def test_real_size_configs_dry_run_from_config_json_alone(name, tmp_path, monkeypatch, capsys):
    """The shipped real-size configs, checked as a user would check them before a download: a directory holding
    the model's config.json alone (no weights, no tokenizer) in place of the hub id."""
    (hidden, inter, layers, heads), engine, k_total = LLAMA3[name]
    LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False).save_pretrained(tmp_path / "m")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    path = CONFIGS / name
    assert path.read_text().splitlines()[0].startswith(f"# launch/torchrun.sh {name.split('_')[-1][:-5]} "
                                                       f"configs/train/{name}")
    assert main(["train", "--config", str(path), "--dry-run", "--world-size", "8",
                 f"model.name_or_path={tmp_path / 'm'}"]) == 0
    out = capsys.readouterr().out
    assert f"total k:      {k_total:,}\n" in out and f"{7 * layers} matrices" in out
    assert f"engine:       {engine}" in out and "world size 8" in out and "(sharded)" in out
    assert f"x{layers} " in out and "bfloat16" in out
    assert list(work.iterdir()) == []
