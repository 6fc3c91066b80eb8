"""The scripts in examples/ run as their docstrings say (on a tiny model here, to keep the suite fast)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import WORDS, tiny_llama, tiny_tokenizer

from spra_dist import load_adapter

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_sft_trl_example_trains_and_writes_an_adapter(tmp_path):
    base = tmp_path / "base"
    tokenizer = tiny_tokenizer()
    tiny_llama(vocab=len(WORDS) + 4).save_pretrained(base)
    tokenizer.save_pretrained(base)
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "sft_trl.py"), "--model", str(base), "--out",
                           str(out), "--steps", "4", "--batch", "4", "--eval", "8", "--no-bf16"],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "result.json").read_text())
    assert result["steps"] == 4 and result["loss_last"] < result["loss_first"]
    from transformers import AutoModelForCausalLM

    model = load_adapter(AutoModelForCausalLM.from_pretrained(base), out / "adapter")
    assert any(torch.count_nonzero(p) for n, p in model.named_parameters() if n.endswith("spra_values"))


def chat_base(folder: Path) -> Path:
    """A tiny Llama with the word-level tokenizer and a plain chat template (the RL examples prompt in chat form)."""
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    tiny_llama(vocab=len(WORDS) + 4).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def run_example(name: str, base: Path, out: Path, *args: str) -> dict:
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / name), "--model", str(base), "--out", str(out),
                           *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "adapter" / "adapter.safetensors").is_file()  # SpraAdapterCallback's, at the end of training
    return json.loads((out / "result.json").read_text())


@pytest.mark.slow
def test_grpo_and_dpo_trl_examples_train_and_report_before_and_after(tmp_path):
    base = chat_base(tmp_path / "base")
    grpo = run_example("grpo_trl.py", base, tmp_path / "grpo", "--steps", "2", "--prompts", "2", "--generations",
                       "2", "--eval", "4", "--max-new-tokens", "4")
    assert grpo["steps"] == 2 and grpo["completions_per_step"] == 4
    for key in ("held_out_before", "held_out_after"):
        assert 0 <= grpo[key]["format"] <= 1 and 0 <= grpo[key]["reward"] <= 2
    dpo = run_example("dpo_trl.py", base, tmp_path / "dpo", "--steps", "10", "--batch", "4", "--eval", "6",
                      "--lr", "1e-2")
    assert dpo["steps"] == 10 and dpo["train_loss_last"] < dpo["train_loss_first"]
    assert 0 <= dpo["held_out_preference_accuracy_before"] <= 1


def test_grpo_example_rewards_check_the_answer():
    import importlib.util

    spec = importlib.util.spec_from_file_location("grpo_trl", ROOT / "examples" / "grpo_trl.py")
    grpo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(grpo)
    said = ["2015-03-12", " 2015-12-03\nmore", "March 12, 2015", [{"role": "assistant", "content": "2014-03-12"}]]
    assert grpo.iso_format(said) == [1.0, 1.0, 0.0, 1.0]
    assert grpo.iso_correct(said, answer=["2015-03-12"] * 4) == [1.0, 1 / 3, 0.0, 2 / 3]
