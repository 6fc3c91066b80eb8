"""A hub id as the base (``model.name_or_path=org/model``, ``spra merge --base``, ``spra generate --base``),
resolved offline from a Hugging Face cache laid out as ``hf download`` leaves it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_models import batch, tiny_llama, tiny_tokenizer

from spra_dist.cli import main

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "train" / "debug_tiny_llama.yaml"
HUB_ID = "tiny-org/tiny-llama"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """A fresh ``HF_HOME`` whose cache holds ``HUB_ID`` (a tiny Llama and a tokenizer) and nothing else, offline."""
    from huggingface_hub import constants

    home = tmp_path / "hf_home"
    repo = home / "hub" / f"models--{HUB_ID.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    tiny_llama().save_pretrained(snapshot)
    tiny_tokenizer().save_pretrained(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads HF_HOME once, when it is imported: point this process's copy at the new cache too.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return snapshot


def _train(out: Path, name: str, *extra: str) -> int:
    return main(["train", "--config", str(CONFIG), f"output_dir={out}", "model.source=hf",
                 f"model.name_or_path={name}", "max_steps=2", "eval_every=0", "eval_size=8", "train_size=64",
                 "log_every=1", *extra])


def test_train_merge_and_generate_on_a_hub_id(hub_cache, tmp_path, capsys):
    """spra train on a hub id in the cache: the adapter records the id (not the cache path); spra merge, with
    the recorded base or ``--base`` the id, gives the base's weights plus the adapter's deltas; spra generate
    loads the base from the id."""
    from transformers import LlamaForCausalLM

    out = tmp_path / "run"
    assert _train(out, HUB_ID) == 0
    recorded = json.loads((out / "adapter" / "adapter_config.json").read_text())["base_model"]
    assert recorded["name_or_path"] == HUB_ID
    assert recorded["config"]["_name_or_path"] == HUB_ID
    assert str(hub_cache.parents[2]) not in json.dumps(recorded)  # no cache path anywhere in the record
    assert not (out / "base_model").exists()  # a saved base, not a random init: nothing to copy

    for name, extra in (("recorded", []), ("given", ["--base", HUB_ID])):
        merged = tmp_path / f"merged_{name}"
        assert main(["merge", "--adapter", str(out / "adapter"), "--out", str(merged), *extra]) == 0
        plain = LlamaForCausalLM.from_pretrained(merged).eval()
        base = LlamaForCausalLM.from_pretrained(hub_cache).eval()
        changed = [n for n, p in plain.named_parameters()
                   if not torch.equal(p, dict(base.named_parameters())[n])]
        assert changed and all(n.endswith("proj.weight") for n in changed)
        assert (merged / "tokenizer.json").is_file()  # the hub base's tokenizer, copied beside the weights
        with torch.no_grad():
            assert torch.isfinite(plain(batch()).logits).all()

    capsys.readouterr()
    assert main(["generate", "--adapter", str(out / "adapter"), "--base", HUB_ID, "the sky is", "--max-new-tokens",
                 "3", "--compare"]) == 0
    assert capsys.readouterr().out.startswith("--- base\n")


@pytest.mark.parametrize("name, message", [
    ("tiny-org/not-cached", ["'tiny-org/not-cached' is not a local directory", "not complete in the Hugging Face "
                             "cache", "hf download tiny-org/not-cached", "HF_HUB_OFFLINE=0"]),
    ("/no/such/model", ["model.name_or_path='/no/such/model' does not exist", "or a hub id (org/model)"]),
    ("./no/such/model", ["does not exist"]),
])
def test_unresolvable_base_is_one_line(hub_cache, tmp_path, capsys, name, message):
    """A hub id that is not in the cache (offline) or a path that does not exist: one error line with the fix."""
    assert _train(tmp_path / "run", name) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for part in message:
        assert part in err, err
    assert not (tmp_path / "run").exists()


def test_a_hub_id_built_on_meta_reads_the_cached_snapshot(hub_cache):
    """Under FSDP2 / ZeRO-3 the base is built on meta and each rank reads the safetensors itself: from the hub id's
    snapshot in the cache, while the model still names the id."""
    from spra_dist.train.models import build_model
    from spra_dist.train.schema import ModelConfig

    built = build_model(ModelConfig(source="hf", name_or_path=HUB_ID), seed=0, meta=True)
    assert built.model.config._name_or_path == HUB_ID
    assert {path.parent for path in built.base.files.values()} == {hub_cache}
    assert next(built.model.parameters()).is_meta


def test_a_hub_id_without_source_hf_is_refused(tmp_path, capsys):
    """model.name_or_path alone would train the default tiny model and ignore the id: refused, naming the fix."""
    argv = ["train", "--config", str(CONFIG), f"output_dir={tmp_path / 'run'}", f"model.name_or_path={HUB_ID}"]
    assert main(argv) == 2
    assert "add model.source=hf" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
