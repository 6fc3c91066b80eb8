"""The layer against a dense reference: forward, input and value gradients, exact restore, checkpointing."""

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.pytorch_utils import Conv1D

from spra_dist.layer import SpraLinear


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
def test_sampled_weight_grad_kernels_match_dense_float64(transposed, dtype, k):
    from spra_dist.layer import _sampled_gather, sampled_weight_grad
    from spra_dist.masks import sample_indices

    torch.manual_seed(3)
    n_in, n_out, tokens = 40, 48, 33
    shape = (n_in, n_out) if transposed else (n_out, n_in)
    idx = sample_indices(1, "kernel", n_in * n_out, k)
    x, dy = torch.randn(tokens, n_in, dtype=dtype), torch.randn(tokens, n_out, dtype=dtype)
    dense = x.double().t() @ dy.double() if transposed else dy.double().t() @ x.double()
    expected = dense.view(-1)[idx]
    got = sampled_weight_grad(x, dy, idx, shape=shape, transposed=transposed)
    a, b = (x, dy) if transposed else (dy, x)
    fallback = _sampled_gather(a, b, idx // shape[1], idx % shape[1])
    tol = 1e-12 if dtype == torch.float64 else 1e-4  # bf16 inputs are exact in fp32; only the sum order differs
    for out in (got, fallback):
        assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        torch.testing.assert_close(out.double(), expected, rtol=0, atol=tol)
