"""The layer against a dense reference: forward, input and value gradients, exact restore, checkpointing."""

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.pytorch_utils import Conv1D

from spra_dist.core.layer import SpraLinear


def make_layer(kind: str, bias: bool, dtype=torch.float64, n_in=24, n_out=16, k=40):
    torch.manual_seed(0)
    if kind == "linear":
        base = nn.Linear(n_in, n_out, bias=bias, dtype=dtype)
    else:
        base = Conv1D(n_out, n_in).to(dtype)
        if not bias:
            base.bias = None
    layer = SpraLinear(base, name="block.proj", k=k, seed=5)
    with torch.no_grad():
        layer.spra_values.normal_()
    return layer


def dense_reference(layer: SpraLinear, x: torch.Tensor):
    w = (layer.weight.detach() + layer.get_delta_weight()).requires_grad_(True)
    y = x @ w if layer.transposed else x @ w.t()
    if layer.bias is not None:
        y = y + layer.bias
    return y, w


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(6, 24), (2, 5, 24)])
def test_matches_dense_float64(kind, bias, shape):
    layer = make_layer(kind, bias)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    g = torch.randn_like(y)
    (y * g).sum().backward()

    x_ref = x.detach().clone().requires_grad_(True)
    y_ref, w_ref = dense_reference(layer, x_ref)
    (y_ref * g).sum().backward()

    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(layer.spra_values.grad, w_ref.grad.view(-1)[layer.spra_indices], rtol=0, atol=1e-12)
    assert layer.weight.grad is None and not layer.weight.requires_grad


def test_bf16_weight_bit_identical_after_100_steps():
    layer = make_layer("linear", True, dtype=torch.bfloat16, n_in=64, n_out=48, k=300)
    before = layer.weight.detach().clone()
    opt = torch.optim.AdamW([layer.spra_values], lr=1e-2)
    for _ in range(100):
        x = torch.randn(8, 64, dtype=torch.bfloat16)
        layer(x).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    assert torch.equal(layer.weight.view(torch.int16), before.view(torch.int16))
    assert layer.spra_values.abs().sum() > 0  # it did train


def test_gradient_checkpointing_same_gradients():
    layer = make_layer("linear", True)
    x = torch.randn(4, 24, dtype=torch.float64)
    layer(x).tanh().sum().backward()
    plain = layer.spra_values.grad.clone()
    layer.spra_values.grad = None
    for reentrant in (True, False):
        x_in = x.clone().requires_grad_(reentrant)  # reentrant checkpointing needs an input requiring grad
        checkpoint(lambda t: layer(t).tanh(), x_in, use_reentrant=reentrant).sum().backward()
        torch.testing.assert_close(layer.spra_values.grad, plain, rtol=0, atol=1e-12)
        layer.spra_values.grad = None


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_merge_unmerge(kind):
    layer = make_layer(kind, True)
    x = torch.randn(3, 24, dtype=torch.float64)
    before = layer.weight.detach().clone()
    expected = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-12)
    changed = (layer.weight != before).view(-1).nonzero().squeeze(1)
    assert set(changed.tolist()) <= set(layer.spra_indices.tolist())
    layer.unmerge()
    assert torch.equal(layer.weight, before)


def test_zero_values_equal_base():
    torch.manual_seed(1)
    base = nn.Linear(8, 8)
    x = torch.randn(2, 8)
    ref = base(x)
    layer = SpraLinear(base, name="l", k=10, seed=0)
    assert torch.equal(layer(x), ref)


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 7, 300, 48 * 40])  # one entry, rows left empty, typical, every entry
@pytest.mark.parametrize("index", [torch.int32, torch.int64])  # a layer's indices, and those of a ≥ 2³¹ matrix
def test_sampled_weight_grad_kernels_match_dense_float64(transposed, dtype, k, index):
    from spra_dist.core.kernels import sampled_gather, sampled_weight_grad
    from spra_dist.core.masks import sample_indices

    torch.manual_seed(3)
    n_in, n_out, tokens = 40, 48, 33
    shape = (n_in, n_out) if transposed else (n_out, n_in)
    idx = sample_indices(1, "kernel", n_in * n_out, k).to(index)
    x, dy = torch.randn(tokens, n_in, dtype=dtype), torch.randn(tokens, n_out, dtype=dtype)
    dense = x.double().t() @ dy.double() if transposed else dy.double().t() @ x.double()
    expected = dense.view(-1)[idx]
    got = sampled_weight_grad(x, dy, idx, transposed=transposed)
    a, b = (x, dy) if transposed else (dy, x)
    fallback = sampled_gather(a, b, idx // shape[1], idx % shape[1])
    tol = 1e-12 if dtype == torch.float64 else 1e-4  # bf16 inputs are exact in fp32; only the sum order differs
    for out in (got, fallback):
        assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        torch.testing.assert_close(out.double(), expected, rtol=0, atol=tol)


def test_indices_are_int32_with_cached_row_pointers_only():
    """4 bytes a value of mask state (the indices), the row pointers beside them; int64 only from 2³¹ entries."""
    from spra_dist.core.kernels import index_dtype, row_pointers
    from spra_dist.core.kernels.entries import MergedWeight

    layer = make_layer("linear", True)
    assert layer.spra_indices.dtype == layer.spra_crow.dtype == torch.int32 and layer.spra_crow.numel() == 17
    assert torch.equal(layer.spra_indices.long(), layer.mask()) and not hasattr(layer, "spra_cols")
    assert index_dtype(2**31 - 1) == torch.int32 and index_dtype(2**31) == torch.int64
    idx = layer.mask()  # int64 row pointers agree with int32 ones, and the merge takes either
    assert torch.equal(row_pointers(idx, 16, 24), layer.spra_crow.long())
    before = layer.weight.detach().clone()
    for indices in (idx, layer.spra_indices):
        with MergedWeight(layer.weight.data, indices, layer.spra_values.detach()):
            torch.testing.assert_close(layer.weight - before, layer.get_delta_weight(), rtol=0, atol=1e-12)
        assert torch.equal(layer.weight, before)


def autocast_reference(layer: SpraLinear, x: torch.Tensor, device: str, dtype: torch.dtype):
    """What the plain layer computes with W + delta (fp32) under the same autocast: ``F.linear`` for Linear,
    ``addmm`` as transformers' Conv1D does. Returns the output and the dense weight (for dW)."""
    w = (layer.weight.detach() + layer.get_delta_weight()).requires_grad_(True)
    with torch.autocast(device, dtype=dtype):
        if layer.transposed:
            y = torch.addmm(layer.bias, x.reshape(-1, x.shape[-1]), w).reshape(*x.shape[:-1], w.shape[-1])
        else:
            y = nn.functional.linear(x, w, layer.bias)
    return y, w


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_autocast_bf16_cpu_matches_dense_reference(kind):
    layer = make_layer(kind, True, dtype=torch.float32, n_in=64, n_out=48, k=300)
    with torch.no_grad():
        layer.spra_values.mul_(0.05)
    before = layer.weight.detach().clone()
    x = torch.randn(4, 10, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref, w_ref = autocast_reference(layer, x_ref, "cpu", torch.bfloat16)
    assert y.dtype == y_ref.dtype == torch.bfloat16  # what autocast gives a plain linear
    g = torch.randn(y.shape)
    (y.float() * g).sum().backward()
    (y_ref.float() * g).sum().backward()

    torch.testing.assert_close(y.float(), y_ref.float(), rtol=1.6e-2, atol=1e-2)  # bf16 tolerance
    assert x.grad.dtype == torch.float32
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1.6e-2, atol=1e-2)
    grad = layer.spra_values.grad
    assert grad.dtype == torch.float32  # fp32 master values keep an fp32 gradient
    scale = w_ref.grad.abs().max()
    torch.testing.assert_close(grad, w_ref.grad.view(-1)[layer.spra_indices], rtol=0, atol=1.6e-2 * scale)
    # Summed in fp32 from the bf16 operands, it equals the float64 product of those operands closely.
    xb = x.detach().to(torch.bfloat16).double().reshape(-1, 64)
    gb = g.to(torch.bfloat16).double().reshape(-1, 48)
    exact = (xb.t() @ gb) if layer.transposed else (gb.t() @ xb)
    torch.testing.assert_close(grad.double(), exact.view(-1)[layer.spra_indices], rtol=0, atol=1e-4 * scale)
    assert torch.equal(layer.weight, before) and layer.weight.grad is None


def test_autocast_keeps_low_precision_values_dtype():
    """Values stored in bf16 (FSDP2's param_dtype, DeepSpeed bf16) get a bf16 gradient."""
    layer = make_layer("linear", False, dtype=torch.bfloat16)
    x = torch.randn(5, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x).float().sum().backward()
    assert layer.spra_values.grad.dtype == torch.bfloat16


def test_dtype_mismatch_outside_autocast_names_the_fix():
    layer = make_layer("linear", True, dtype=torch.float32)
    with pytest.raises(ValueError, match="run the forward under torch.autocast"):
        layer(torch.randn(2, 24, dtype=torch.bfloat16))


_DEVICES = [pytest.param("cpu"), pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="fp16 autocast with GradScaler on CUDA needs a CUDA device"))]


@pytest.mark.parametrize("device", _DEVICES)
def test_fp16_grad_scaler_trains_and_skips_overflow(device):
    """fp16 autocast + GradScaler: scaled gradients are unscaled to the fp32 values; an overflow skips the step."""
    torch.manual_seed(0)
    base = nn.Linear(32, 16, device=device)
    layer = SpraLinear(base, name="proj", k=64, seed=3)
    before = layer.weight.detach().clone()
    opt = torch.optim.SGD([layer.spra_values], lr=0.1)
    scaler = torch.amp.GradScaler(device, init_scale=2.0 ** 10)
    x = torch.randn(16, 32, device=device)
    target = torch.randn(16, 16, device=device)
    losses = []
    for _ in range(20):
        with torch.autocast(device, dtype=torch.float16):
            y = layer(x)
            assert y.dtype == torch.float16
            loss = (y.float() - target).pow(2).mean()
        scaler.scale(loss).backward()
        assert layer.spra_values.grad.dtype == torch.float32
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert torch.equal(layer.weight, before)

    # A loss scale that overflows fp16 in the backward: GradScaler sees inf in the values' gradient and skips.
    values = layer.spra_values.detach().clone()
    scaler = torch.amp.GradScaler(device, init_scale=2.0 ** 60)
    with torch.autocast(device, dtype=torch.float16):
        loss = (layer(x).float() - target).pow(2).mean()
    scaler.scale(loss).backward()
    assert not torch.isfinite(layer.spra_values.grad).all()
    scaler.step(opt)
    scaler.update()
    assert torch.equal(layer.spra_values.detach(), values) and scaler.get_scale() < 2.0 ** 60


def test_custom_ops_pass_opcheck():
    """Schema (no undeclared mutation: the merge is undone inside the op), fake tensors, autograd, AOT dispatch."""
    from spra_dist.core.kernels.ops import linear_op

    for kind in ("linear", "conv1d"):
        layer = make_layer(kind, True, dtype=torch.float32)
        x = torch.randn(3, 24, requires_grad=True)
        for crow in (layer.spra_crow, None):  # cached by the layer, or built in the backward
            result = torch.library.opcheck(linear_op, (x, layer.weight, layer.bias, layer.spra_values,
                                                       layer.spra_indices, crow, layer.transposed))
            assert set(result.values()) == {"SUCCESS"}, result


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_sibling_layers_share_one_prepared_input(autocast, monkeypatch):
    """q/k/v (and gate/up) read one input: one feature-major copy serves them all, and nothing is held once the
    backward is done. Gradients are bit-identical to a run that shares nothing."""
    from tiny_models import batch, tiny_llama

    from spra_dist import SpraConfig, apply_spra
    from spra_dist.core.kernels import shared

    monkeypatch.setenv("SPRA_CPU_KERNEL", "0")
    model = apply_spra(tiny_llama(), SpraConfig(seed=1))
    x = batch()

    def grads(share: bool) -> dict[str, torch.Tensor]:
        model.zero_grad()
        monkeypatch.setattr(shared, "enabled", share)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(x, labels=x).loss
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    before, live_before = dict(shared.counts), shared.live_entries()
    shared_grads = grads(True)
    made, reused = shared.counts["made"] - before["made"], shared.counts["shared"] - before["shared"]
    # per decoder layer: inputs of q/k/v, o, gate/up, down -> 4 copies made, 3 reused (k, v, up). Under autocast
    # each layer casts its own input (as for nn.Linear, so input gradients are summed in fp32): nothing to share.
    assert (made, reused) == ((14, 0) if autocast else (8, 6))
    assert shared.live_entries() == live_before
    plain = grads(False)
    assert shared_grads.keys() == plain.keys()
    for name, g in shared_grads.items():
        assert torch.equal(g, plain[name]), name


def _cpu_kernel():
    from spra_dist.core.kernels import cpu_sddmm

    module = cpu_sddmm._load()
    if module is None:
        pytest.skip("the C++ SDDMM kernel did not build here (no compiler): the sampled_addmm path is tested instead")
    return module


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(48, 40), (7, 129)])
def test_cpu_token_major_kernel_matches_dense_float64(dtype, shape):
    """Exact against dYᵀX in float64 on the same (rounded) operands; low-precision inputs summed in fp32. T = 75
    is not a multiple of the 32-token tile; the mask spans rows with none, one and many entries."""
    from spra_dist.core.kernels import csr_structure
    from spra_dist.core.masks import sample_indices

    module = _cpu_kernel()
    out, inp = shape
    g = torch.Generator().manual_seed(0)
    dy, x = torch.randn(75, out, generator=g).to(dtype), torch.randn(75, inp, generator=g).to(dtype)
    idx = sample_indices(3, "w", out * inp, max(1, out * inp // 9))
    crow, cols = csr_structure(idx, out, inp)
    got = module.sddmm_token_major(dy, x, crow.long(), cols.int(), 32)
    want = (dy.double().t() @ x.double()).view(-1)[idx]
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    scale = (dy.double().abs().t() @ x.double().abs()).view(-1)[idx]  # Σ|a·b|: the sum's rounding scale
    bound = 1e-12 if dtype == torch.float64 else 1e-6
    assert ((got.double() - want).abs() <= bound * scale + 1e-30).all()


def test_cpu_kernel_in_the_layer_matches_the_default_path(monkeypatch):
    _cpu_kernel()
    layer = make_layer("linear", True, dtype=torch.float32)
    x = torch.randn(2, 9, 24)

    def values_grad(kernel: str) -> torch.Tensor:
        monkeypatch.setenv("SPRA_CPU_KERNEL", kernel)
        layer.spra_values.grad = None
        layer(x).square().sum().backward()
        return layer.spra_values.grad.clone()

    torch.testing.assert_close(values_grad("1"), values_grad("0"), rtol=1e-5, atol=1e-6)


def test_a_missing_compiler_falls_back_with_one_warning(monkeypatch):
    import torch.utils.cpp_extension as cpp_extension

    from spra_dist.core.kernels import cpu_sddmm

    monkeypatch.setattr(cpu_sddmm, "_module", None)
    monkeypatch.setattr(cpu_sddmm, "_failed", False)
    monkeypatch.setenv("SPRA_CPU_KERNEL", "1")

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Error building extension: c++: command not found")

    monkeypatch.setattr(cpp_extension, "load_inline", no_compiler)
    a, b = torch.randn(4, 3), torch.randn(4, 5)
    with pytest.warns(RuntimeWarning, match="could not be compiled.*c\\+\\+: command not found.*sampled_addmm"):
        assert cpu_sddmm.cpu_sampled_matmul_t(a, b, torch.tensor([0, 1, 1, 2]), torch.tensor([0, 4])) is None
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call: no second warning
        assert cpu_sddmm.cpu_sampled_matmul_t(a, b, torch.tensor([0, 1, 1, 2]), torch.tensor([0, 4])) is None
