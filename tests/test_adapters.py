"""Several named adapters on one base: outputs against a float64 dense reference W + Σ wᵢΔᵢ, bit-exact
switching and disabling, memory of inactive adapters, combinations saved and merged, refusals by name."""

from __future__ import annotations

import gc
import json
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import batch, tiny_bert, tiny_llama
from transformers import LlamaForCausalLM

from spra_dist import (
    SpraConfig,
    active_adapter,
    apply_spra,
    combine_adapters,
    delete_adapter,
    disable_adapter,
    list_adapters,
    load_adapter,
    merge_adapter,
    sample_indices,
    save_adapter,
    set_adapter,
    spra_modules,
    trainable_parameters,
)
from spra_dist.adapters.files import read_adapter
from spra_dist.adapters.named import adapter_layers, registry
from spra_dist.cli import main
from spra_dist.core.layer import SpraLinear


def make_adapter(path: Path, *, mask_seed: int, fill_seed: int, model=None, scale: float = 0.05, **spra) -> Path:
    """An adapter with random values (and random dense parameters), saved to ``path``."""
    model = apply_spra(model if model is not None else tiny_llama(),
                       SpraConfig(target_modules="all-linear", lora_rank=2, seed=mask_seed, **spra))
    g = torch.Generator().manual_seed(fill_seed)
    with torch.no_grad():
        for _, p in trainable_parameters(model):
            p.copy_(scale * torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype))
    save_adapter(model, path)
    return path


def dense_reference(base: torch.nn.Module, mixes: list[tuple[float, Path]]) -> torch.nn.Module:
    """A float64 copy of ``base`` with every adapted weight W + Σ wᵢΔᵢ and dense parameter base + Σ wᵢ(θᵢ − base),
    the masks rebuilt here from each file's seed (independently of the library's switching code)."""
    ref = type(base)(base.config).double().eval()
    ref.load_state_dict({k: v.double() for k, v in base.state_dict().items()})
    weights = dict(ref.named_parameters())
    base_params = {k: v.detach().double() for k, v in base.named_parameters()}
    with torch.no_grad():
        for w, path in mixes:
            config, tensors = read_adapter(path)
            for name, layer in config["layers"].items():
                numel = layer["shape"][0] * layer["shape"][1]
                idx = sample_indices(config["seed"], f"{name}.weight", numel, layer["k"])
                weights[f"{name}.weight"].view(-1)[idx] += w * tensors[f"{name}.spra_values"].double()
            for name in config["dense_parameters"]:
                weights[name] += w * (tensors[name].double() - base_params[name])
    return ref


def logits(model, x, dtype=torch.float64) -> torch.Tensor:
    with torch.no_grad():
        return model(x).logits.to(dtype)


@pytest.fixture
def two(tmp_path):
    return (make_adapter(tmp_path / "a", mask_seed=11, fill_seed=1),
            make_adapter(tmp_path / "b", mask_seed=22, fill_seed=2))


def test_named_adapters_match_the_dense_reference_and_switch_bit_exactly(two):
    a, b = two
    x = batch()
    base = tiny_llama()
    model = load_adapter(tiny_llama(), a, adapter_name="a")
    load_adapter(model, b, adapter_name="b")
    assert list_adapters(model) == ["a", "b"] and active_adapter(model) == "a"  # a new name is not activated
    weights = {n: p for n, p in model.named_parameters() if n.endswith(".weight")}
    first_a = logits(model, x, torch.float32)
    torch.testing.assert_close(first_a.double(), logits(dense_reference(base, [(1.0, a)]), x), rtol=0, atol=2e-5)
    set_adapter(model, "b")
    torch.testing.assert_close(logits(model, x), logits(dense_reference(base, [(1.0, b)]), x), rtol=0, atol=2e-5)
    versions = {n: p._version for n, p in weights.items()}
    for _ in range(3):
        set_adapter(model, "a")
        set_adapter(model, "b")
    set_adapter(model, "a")
    # switching writes no frozen weight in place (the forward's own merge-and-restore does, and restores it)
    assert {n: p._version for n, p in weights.items()} == versions
    assert torch.equal(logits(model, x, torch.float32), first_a)
    with disable_adapter(model):
        assert active_adapter(model) is None
        assert torch.equal(logits(model, x, torch.float32), logits(base, x, torch.float32))
    assert torch.equal(logits(model, x, torch.float32), first_a)
    assert all(torch.equal(p, dict(base.named_parameters())[n]) for n, p in weights.items())


def test_a_plain_model_has_no_adapters_and_queries_leave_it_plain():
    """Before apply_spra and after merge_adapter a model has no adapters; asking, switching to none or disabling
    changes nothing, and a name that isn't there is named in the error."""
    from spra_dist.core.registry import find_registry

    for model in (tiny_llama(), merge_adapter(apply_spra(tiny_llama(), SpraConfig(seed=1)))):
        assert list_adapters(model) == [] and active_adapter(model) is None
        set_adapter(model, None)
        with disable_adapter(model):
            pass
        with pytest.raises(ValueError, match=r"no adapter named 'x'; this model has \[\]"):
            set_adapter(model, "x")
        assert find_registry(model) is None  # nothing attached by a question


def test_inactive_adapters_hold_values_only_and_delete_frees_them(two):
    a, b = two
    model = load_adapter(tiny_llama(), a, adapter_name="a")
    load_adapter(model, b, adapter_name="b")
    reg = registry(model)
    k_a, k_b = (sum(values.numel() for _, values in adapter_layers(model, n).values()) for n in ("a", "b"))
    assert not reg.adapters["a"].layers  # the active adapter's values are the modules' own, held nowhere else
    layers = [m for m in model.modules() if isinstance(m, SpraLinear)]
    assert sum(m.spra_indices.numel() for m in layers) == k_a  # indices of the active adapter only
    assert sum(p.numel() for _, p in trainable_parameters(model)) == k_a  # b's values are not model parameters
    set_adapter(model, "b")
    assert sum(m.spra_indices.numel() for m in layers) == k_b
    assert sum(p.numel() for _, p in trainable_parameters(model)) == k_b
    gone = weakref.ref(next(iter(reg.adapters["a"].layers.values()))[1])
    delete_adapter(model, "a")
    gc.collect()
    assert gone() is None and list_adapters(model) == ["b"]
    delete_adapter(model, "b")  # the active one: the model runs as its base
    assert active_adapter(model) is None and not spra_modules(model)
    assert torch.equal(logits(model, batch()), logits(tiny_llama(), batch()))


@pytest.mark.parametrize("overlap", [False, True], ids=["disjoint-seeds", "same-seed"])
def test_combination_is_the_weighted_sum_and_saves_as_an_adapter(two, tmp_path, overlap, capsys):
    a, b = two
    if overlap:  # the same seed: the masks coincide, the values add on the same entries
        b = make_adapter(tmp_path / "b_same", mask_seed=11, fill_seed=3)
    x = batch()
    base = tiny_llama()
    model = load_adapter(tiny_llama(), a, adapter_name="a")
    load_adapter(model, b, adapter_name="b")
    combine_adapters(model, {"a": 0.7, "b": -0.4}, name="mix")
    assert active_adapter(model) == "a"
    set_adapter(model, "mix")
    mixed = logits(model, x, torch.float32)
    torch.testing.assert_close(mixed.double(), logits(dense_reference(base, [(0.7, a), (-0.4, b)]), x),
                               rtol=0, atol=2e-5)
    saved = save_adapter(model, tmp_path / "mix")
    config = json.loads((saved / "adapter_config.json").read_text())
    assert set(load_file(saved / "adapter.safetensors")) == {"spra_values"}  # values only, no indices
    layer = config["layers"]["model.layers.0.self_attn.q_proj"]
    if overlap:  # one seed's mask: an ordinary adapter
        assert "mask" not in layer and layer["k"] == 128 and config["format_version"] == 1
    else:
        assert layer["mask"] == [[11, 128], [22, 128]] and config["format_version"] == 2
        assert layer["k"] == 256 - _overlap(11, 22, "model.layers.0.self_attn.q_proj", 1024, 128)
    assert config["combination"] == {"a": 0.7, "b": -0.4}
    assert main(["inspect", str(saved)]) == 0
    assert "combination:  a: 0.7, b: -0.4" in capsys.readouterr().out
    reloaded = load_adapter(tiny_llama(), saved)  # union masks rebuilt from the seeds
    assert torch.equal(logits(reloaded, x, torch.float32), mixed)


def _overlap(s1: int, s2: int, name: str, numel: int, k: int) -> int:
    m1, m2 = (set(sample_indices(s, f"{name}.weight", numel, k).tolist()) for s in (s1, s2))
    return len(m1 & m2)


def test_dense_heads_switch_disable_and_combine(tmp_path):
    """A classifier trained densely: each adapter's head is switched in, the base's comes back when disabled."""
    a = make_adapter(tmp_path / "a", mask_seed=5, fill_seed=1, model=tiny_bert(), trainable_modules=["classifier"])
    b = make_adapter(tmp_path / "b", mask_seed=6, fill_seed=2, model=tiny_bert(), trainable_modules=["classifier"])
    x, base = batch(), tiny_bert()
    model = load_adapter(tiny_bert(), a, adapter_name="a")
    load_adapter(model, b, adapter_name="b")
    torch.testing.assert_close(logits(model, x), logits(dense_reference(base, [(1.0, a)]), x), rtol=0, atol=2e-5)
    with disable_adapter(model):
        assert torch.equal(model.classifier.weight, base.classifier.weight)
        assert torch.equal(logits(model, x, torch.float32), logits(base, x, torch.float32))
    set_adapter(model, "b")
    torch.testing.assert_close(logits(model, x), logits(dense_reference(base, [(1.0, b)]), x), rtol=0, atol=2e-5)
    combine_adapters(model, {"a": 0.5, "b": 0.5}, name="mix")
    set_adapter(model, "mix")
    torch.testing.assert_close(logits(model, x), logits(dense_reference(base, [(0.5, a), (0.5, b)]), x),
                               rtol=0, atol=2e-5)


def test_bf16_base_switches_and_disables_bit_exactly(two, tmp_path):
    a = make_adapter(tmp_path / "a16", mask_seed=11, fill_seed=1, model=tiny_llama().to(torch.bfloat16))
    b = make_adapter(tmp_path / "b16", mask_seed=22, fill_seed=2, model=tiny_llama().to(torch.bfloat16))
    x, base = batch(), tiny_llama().to(torch.bfloat16)
    model = load_adapter(tiny_llama().to(torch.bfloat16), a, adapter_name="a")
    load_adapter(model, b, adapter_name="b")
    assert all(m.spra_values.dtype == torch.float32 for _, m in spra_modules(model))  # fp32 values on bf16
    first = logits(model, x, torch.float32)
    set_adapter(model, "b")
    with disable_adapter(model):
        assert torch.equal(logits(model, x, torch.float32), logits(base, x, torch.float32))
    set_adapter(model, "a")
    assert torch.equal(logits(model, x, torch.float32), first)
    combine_adapters(model, {"a": 0.5, "b": 0.5}, name="mix")
    set_adapter(model, "mix")
    got = logits(model, x)
    want = logits(dense_reference(base.float(), [(0.5, a), (0.5, b)]), x)
    assert (got - want).abs().max() < 0.05 * want.abs().max()  # bf16 weights: within bf16 resolution


def test_training_after_a_switch_updates_only_the_active_adapter(two):
    a, b = two
    model = load_adapter(tiny_llama(), a, adapter_name="a")
    load_adapter(model, b, adapter_name="b")
    set_adapter(model, "b")
    before = {n: v.detach().clone() for n, (_, v) in registry(model).adapters["a"].layers.items()}
    opt = torch.optim.AdamW([p for _, p in trainable_parameters(model)], lr=1e-2)
    x = batch()
    model(x, labels=x).loss.backward()
    opt.step()
    assert all(torch.equal(v, registry(model).adapters["a"].layers[n][1]) for n, v in before.items())
    _, saved_b = read_adapter(b)
    changed = [n for n, (_, v) in registry(model).adapters["b"].layers.items()
               if not torch.equal(v.detach(), saved_b[f"{n}.spra_values"])]
    assert len(changed) == len(registry(model).adapters["b"].layers)


def test_refusals_name_the_adapter(two, tmp_path):
    a, b = two
    model = load_adapter(tiny_llama(), a, adapter_name="a")
    with pytest.raises(ValueError, match="an adapter named 'a' is already loaded"):
        load_adapter(model, b, adapter_name="a")
    with pytest.raises(ValueError, match=r"no adapter named 'c'; this model has \['a'\]"):
        set_adapter(model, "c")
    with pytest.raises(ValueError, match=r"cannot combine \['c'\]"):
        combine_adapters(model, {"a": 1.0, "c": 1.0}, name="mix")
    bigger = LlamaForCausalLM(tiny_llama().config.__class__(**{**tiny_llama().config.to_dict(),
                                                                "intermediate_size": 96}))
    foreign = make_adapter(tmp_path / "foreign", mask_seed=3, fill_seed=3, model=bigger)
    with pytest.raises(ValueError, match=r"adapter 'other' \(.*foreign\).*intermediate_size"):
        load_adapter(model, foreign, adapter_name="other")
    assert list_adapters(model) == ["a"]
    with pytest.raises(ValueError, match=r"adapter 'other' \(.*foreign\) adapts model.layers.0.mlp.down_proj of "
                                         r"shape \[32, 96\]"):
        load_adapter(model, foreign, adapter_name="other", check_base=False)
    assert list_adapters(model) == ["a"]


def test_disabling_an_adapter_trained_in_place_with_a_dense_head_is_refused():
    model = apply_spra(tiny_bert(), SpraConfig(seed=1, trainable_modules=["classifier"]))
    with pytest.raises(ValueError, match="classifier.bias was trained densely in place"):
        with disable_adapter(model):
            pass
    assert active_adapter(model) == "default"


def test_spra_merge_of_weighted_adapters(tmp_path, capsys):
    base_dir = tmp_path / "base"
    tiny_llama().save_pretrained(base_dir)
    a = make_adapter(tmp_path / "a", mask_seed=11, fill_seed=1, model=LlamaForCausalLM.from_pretrained(base_dir))
    b = make_adapter(tmp_path / "b", mask_seed=22, fill_seed=2, model=LlamaForCausalLM.from_pretrained(base_dir))
    out = tmp_path / "merged"
    assert main(["merge", "--adapter", str(a), "--adapter", str(b), "--weights", "0.25", "0.75",
                 "--out", str(out)]) == 0
    merged = LlamaForCausalLM.from_pretrained(out)
    ref = dense_reference(tiny_llama(), [(0.25, a), (0.75, b)])
    for name, p in merged.named_parameters():
        torch.testing.assert_close(p.double(), dict(ref.named_parameters())[name], rtol=0, atol=1e-7)
    capsys.readouterr()
    code = main(["merge", "--adapter", str(a), "--adapter", str(b), "--weights", "0.5", "--out",
                 str(tmp_path / "m2")])
    err = capsys.readouterr().err
    assert code == 2 and "--weights gives 1 numbers for 2 --adapter" in err and err.count("\n") == 1
    assert not (tmp_path / "m2").exists()
