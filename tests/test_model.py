"""apply_spra on tiny Llama, GPT-2 (Conv1D) and BERT: what trains, budgets, save/load, merge."""

import pytest
import torch
from tiny_models import BUILDERS, batch

from spra_dist import SpraConfig, apply_spra, load_adapter, merge_adapter, save_adapter, spra_modules
from spra_dist.core.masks import sample_indices


def spra_cfg(arch: str, **kw) -> SpraConfig:
    kw.setdefault("seed", 1234)
    if arch == "bert":
        kw.setdefault("trainable_modules", ["classifier"])
    return SpraConfig(**kw)


def perturb(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def out(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_only_values_and_trainable_modules_train(arch):
    model = apply_spra(BUILDERS[arch](), spra_cfg(arch))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    expected_dense = {"classifier.weight", "classifier.bias"} if arch == "bert" else set()
    assert {n for n in trainable if not n.endswith(".spra_values")} == expected_dense
    mods = spra_modules(model)
    assert len(mods) == sum(n.endswith(".spra_values") for n in trainable) > 0
    for name, m in mods:
        n_rows, n_cols = m.weight.shape
        assert m.k == min(8 * (n_rows + n_cols), n_rows * n_cols)
        assert m.spra_values.numel() == m.k
        assert torch.equal(m.spra_indices.cpu(), sample_indices(1234, f"{name}.weight", m.weight.numel(), m.k))
    names = [n for n, _ in mods]
    assert "lm_head" not in names and not any(n.startswith("classifier") for n in names)


def test_conv1d_layers_adapted_in_gpt2():
    model = apply_spra(BUILDERS["gpt2"](), spra_cfg("gpt2"))
    kinds = {m.transposed for _, m in spra_modules(model)}
    assert kinds == {True}


def test_target_list_and_regex():
    model = apply_spra(BUILDERS["llama"](), spra_cfg("llama", target_modules=["q_proj", r".*mlp\.down_proj"]))
    names = sorted(n for n, _ in spra_modules(model))
    assert names == ["model.layers.0.mlp.down_proj", "model.layers.0.self_attn.q_proj",
                     "model.layers.1.mlp.down_proj", "model.layers.1.self_attn.q_proj"]


def test_density_budget():
    model = apply_spra(BUILDERS["llama"](), spra_cfg("llama", lora_rank=None, density=0.05))
    for _, m in spra_modules(model):
        assert m.k == round(0.05 * m.weight.numel())


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_starts_equal_to_base(arch):
    ids = batch()
    ref = out(BUILDERS[arch](), ids)
    assert torch.equal(out(apply_spra(BUILDERS[arch](), spra_cfg(arch)), ids), ref)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_save_load_roundtrip(arch, tmp_path):
    ids = batch()
    model = apply_spra(BUILDERS[arch](), spra_cfg(arch))
    perturb(model)
    expected = out(model, ids)
    save_adapter(model, tmp_path / "adapter")
    total_k = sum(m.k for _, m in spra_modules(model))
    size = (tmp_path / "adapter" / "adapter.safetensors").stat().st_size
    dense = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "spra" not in n)
    assert size <= (total_k + dense) * 4 + 1024  # values only, no indices, one small header
    fresh = load_adapter(BUILDERS[arch](), tmp_path / "adapter")
    torch.testing.assert_close(out(fresh, ids), expected, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_merge_identical_outputs_and_only_masked_entries(arch):
    ids = batch()
    base = BUILDERS[arch]()
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    model = apply_spra(base, spra_cfg(arch))
    perturb(model)
    expected = out(model, ids)
    masks = {f"{n}.weight": m.spra_indices.clone() for n, m in spra_modules(model)}
    dense = {n for n, p in model.named_parameters() if p.requires_grad and "spra" not in n}
    plain = merge_adapter(model)
    assert not any("Spra" in type(m).__name__ for m in plain.modules())
    torch.testing.assert_close(out(plain, ids), expected, rtol=1e-5, atol=1e-6)
    for key, value in plain.state_dict().items():
        if key in dense:
            continue
        changed = (value != base_state[key]).view(-1).nonzero().squeeze(1)
        if key in masks:
            assert set(changed.tolist()) <= set(masks[key].tolist()) and changed.numel() > 0
        else:
            assert changed.numel() == 0, key


def test_meta_device_build_then_materialise():
    """Large models are built on meta, adapted, then materialised: masks rebuild from the seed."""
    from tiny_models import tiny_llama as build

    from spra_dist.core.model import reset_spra_parameters

    ids = batch()
    reference = apply_spra(build(), spra_cfg("llama"))
    base = build()
    with torch.device("meta"):
        model = build()
    apply_spra(model, spra_cfg("llama"))  # fingerprint and budgets work without any real weight
    model.to_empty(device="cpu")
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and all(k.endswith(".spra_values") for k in missing)  # the base loads unchanged
    with torch.no_grad():  # non-persistent base buffers (rotary inv_freq) are the loader's job, as usual
        for name, buf in base.named_buffers():
            model.get_buffer(name).copy_(buf)
    reset_spra_parameters(model)
    for (_, a), (_, b) in zip(spra_modules(model), spra_modules(reference), strict=True):
        assert torch.equal(a.spra_indices, b.spra_indices)
        assert torch.count_nonzero(a.spra_values) == 0
    torch.testing.assert_close(out(model, ids), out(reference, ids), rtol=0, atol=0)
