"""spra generate: the greedy completion of base + adapter (and of the base alone with --compare)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from spra_dist import load_adapter
from spra_dist.cli import main

PROMPT = "To be, or not"


@pytest.fixture
def run(tiny_run) -> Path:
    """The debug tiny Llama trained for a few steps at the config's lr (3e-2), enough to change its completion."""
    return tiny_run


def greedy(model, n: int) -> str:
    ids = torch.tensor([[257, *PROMPT.encode()]])
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1:].argmax(-1)], dim=1)
    return bytes(i for i in ids[0, 1 + len(PROMPT):].tolist() if i < 256).decode("utf-8", errors="replace")


def test_generate_matches_greedy_decoding_and_compare_shows_the_base(run, capsys):
    assert main(["generate", "--adapter", str(run / "adapter"), PROMPT, "--max-new-tokens", "12", "--compare"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "--- base" and lines[2] == "--- adapter"
    base = LlamaForCausalLM.from_pretrained(run / "base_model").eval()
    assert lines[1] == greedy(base, 12)
    assert lines[3] == greedy(load_adapter(base, run / "adapter").eval(), 12)
    assert lines[1] != lines[3]  # the adapter changed the completion


def test_generate_errors_are_one_line(run, capsys):
    assert main(["generate", "--adapter", str(run / "adapter"), PROMPT, "--chat"]) == 2
    assert "--chat needs a tokenizer with a chat template" in capsys.readouterr().err
    assert main(["generate", "--adapter", str(run / "adapter"), PROMPT, "--max-new-tokens", "0"]) == 2
    assert "--max-new-tokens 0" in capsys.readouterr().err
