"""What users saved with an earlier spra_dist keeps working: adapters (one adapter, and a combination of two) and
a resume checkpoint written before the package was laid out by concern (tests/data/legacy/, from
tests/data/legacy/config.yaml: 3 steps of the tiny random Llama, a checkpoint at step 2, the adapter at step 3).

The base is the recipe's tiny Llama rebuilt from its config and seed, as the run that wrote the files built it;
``expected_logits.safetensors`` holds what that release computed for the base, the adapter and the combination.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from spra_dist import load_adapter
from spra_dist.adapters.files import read_adapter
from spra_dist.cli import main
from spra_dist.train.config import load_config
from spra_dist.train.models import build_model

LEGACY = Path(__file__).resolve().parent / "data" / "legacy"
IDS = torch.tensor([[257, *b"to be or"]])


def base():
    cfg = load_config(LEGACY / "config.yaml")
    return build_model(cfg.model, seed=cfg.seed).model.eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


@pytest.fixture(scope="module")
def expected() -> dict[str, torch.Tensor]:
    expected = load_file(LEGACY / "expected_logits.safetensors")
    # Not a compatibility failure but a changed library: the fixture's base must be rebuilt exactly first.
    assert torch.equal(logits(base()), expected["base"]), "the tiny Llama's random init changed (transformers?)"
    return expected


def test_a_saved_adapter_loads_unchanged(expected):
    assert torch.allclose(logits(load_adapter(base(), LEGACY / "adapter")), expected["adapter"], atol=1e-6)


def test_a_saved_combination_loads_unchanged(expected):
    model = load_adapter(base(), LEGACY / "combination")
    assert torch.allclose(logits(model), expected["combination"], atol=1e-6)


@pytest.mark.slow
def test_a_saved_checkpoint_resumes_to_the_same_adapter(expected, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(LEGACY / "checkpoints", run / "checkpoints")
    assert main(["train", "--config", str(LEGACY / "config.yaml"), f"output_dir={run}", "resume=auto"]) == 0
    assert json.loads((run / "summary.json").read_text())["resumed_from_step"] == 2
    _, resumed = read_adapter(run / "adapter")
    _, stored = read_adapter(LEGACY / "adapter")
    assert resumed.keys() == stored.keys()
    for name, values in stored.items():
        assert torch.allclose(resumed[name], values, rtol=1e-5, atol=1e-7), name
