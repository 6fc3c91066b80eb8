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
