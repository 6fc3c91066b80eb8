"""Bad input gets a ValueError that names the value and the fix."""

import json

import pytest
import torch
from tiny_models import tiny_bert, tiny_gpt2, tiny_llama
from transformers import LlamaConfig, LlamaForCausalLM

from spra_dist import SpraConfig, apply_spra, load_adapter, save_adapter


@pytest.mark.parametrize("kw,match", [
    (dict(lora_rank=None, density=0.0), "density must be in"),
    (dict(lora_rank=None, density=-0.1), "density must be in"),
    (dict(lora_rank=None, density=1.5), "density must be in"),
    (dict(lora_rank=8, density=0.1), "exactly one of lora_rank and density"),
    (dict(lora_rank=None, density=None), "exactly one of lora_rank and density"),
    (dict(lora_rank=0), "lora_rank must be a positive integer"),
    (dict(lora_rank=-2), "lora_rank must be a positive integer"),
    (dict(target_modules="linear"), "give 'all-linear'"),
    (dict(trainable_modules="classifier"), r"write \['classifier'\]"),
])
def test_bad_config(kw, match):
    with pytest.raises(ValueError, match=match):
        apply_spra(tiny_llama(), SpraConfig(**kw))


def test_targets_matching_nothing():
    with pytest.raises(ValueError, match=r"matched no linear layer.*q_proj"):
        apply_spra(tiny_llama(), SpraConfig(target_modules=["query_proj"]))


def test_unsupported_module_matched():
    with pytest.raises(ValueError, match=r"'model.embed_tokens', a Embedding"):
        apply_spra(tiny_llama(), SpraConfig(target_modules=["embed_tokens"]))


def test_trainable_module_missing():
    with pytest.raises(ValueError, match=r"trainable_modules \['score'\] matched no module"):
        apply_spra(tiny_bert(), SpraConfig(trainable_modules=["score"]))


def test_applied_twice():
    model = apply_spra(tiny_llama(), SpraConfig(seed=1))
    with pytest.raises(ValueError, match="already has SpaRA"):
        apply_spra(model, SpraConfig(seed=1))


@pytest.fixture
def saved(tmp_path):
    save_adapter(apply_spra(tiny_llama(), SpraConfig(seed=3)), tmp_path / "a")
    return tmp_path / "a"


def test_adapter_for_another_shape(saved):
    wider = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=48, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(ValueError, match=r"trained on a base of class LlamaForCausalLM.*hidden_size: 32 -> 48"):
        load_adapter(wider, saved)
    with pytest.raises(ValueError, match="model of another shape"):
        load_adapter(wider, saved, check_base=False)


def test_adapter_for_another_architecture(saved):
    with pytest.raises(ValueError, match="model_type is 'gpt2', not 'llama'"):
        load_adapter(tiny_gpt2(), saved)
    with pytest.raises(ValueError, match="another architecture"):
        load_adapter(tiny_gpt2(), saved, check_base=False)


def test_adapter_for_a_changed_layer(saved):
    """Same config, but one adapted weight has another shape: the error names the layer."""
    model = tiny_llama()
    model.model.layers[1].mlp.up_proj = torch.nn.Linear(32, 80, bias=False)
    with pytest.raises(ValueError, match=r"layer model.layers.1.mlp.up_proj has shape \[64, 32\].*\[80, 32\]"):
        load_adapter(model, saved)


def test_missing_file(saved):
    (saved / "adapter.safetensors").unlink()
    with pytest.raises(ValueError, match="adapter.safetensors not found"):
        load_adapter(tiny_llama(), saved)


def test_truncated_file(saved):
    data = (saved / "adapter.safetensors").read_bytes()
    (saved / "adapter.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        load_adapter(tiny_llama(), saved)


def test_not_safetensors(saved):
    torch.save({"x": torch.zeros(3)}, saved / "adapter.safetensors")  # a pickle where safetensors belongs
    cfg = json.loads((saved / "adapter_config.json").read_text())
    del cfg["adapter_sha256"]
    (saved / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_adapter(tiny_llama(), saved)


def test_unknown_mask_version(saved):
    cfg = json.loads((saved / "adapter_config.json").read_text())
    cfg["mask_version"] = 99
    (saved / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unknown mask_version 99"):
        load_adapter(tiny_llama(), saved)


def test_save_failure_keeps_previous_adapter(saved, monkeypatch):
    before = (saved / "adapter.safetensors").read_bytes()
    import spra_dist.adapters.files as adapter_mod

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(adapter_mod, "write_safetensors", boom)
    with pytest.raises(OSError):
        save_adapter(apply_spra(tiny_llama(), SpraConfig(seed=4)), saved)
    assert (saved / "adapter.safetensors").read_bytes() == before
    assert sorted(p.name for p in saved.parent.iterdir()) == ["a"]
    assert sorted(p.name for p in saved.iterdir()) == ["adapter.safetensors", "adapter_config.json"]  # no temp left
