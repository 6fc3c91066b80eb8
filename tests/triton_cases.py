"""The Triton SDDMM against a float64 dense reference; run by tests/test_triton.py in a process of their own.

With ``TRITON_INTERPRET=1`` the kernel runs on CPU tensors through Triton's interpreter (numpy underneath), else
compiled on CUDA. The variable must be set before triton is first imported (triton.language's own jitted
functions, ``tl.sum`` among them, are built at import in the mode of that moment), hence the separate process.
The interpreter is slow (about 0.3 s a call here): small shapes only.

Tolerance. The kernel converts each operand to fp32 and sums in fp32. Products of bf16 (8-bit significand) or
fp16 (11-bit) operands are exact in fp32 (24-bit), so for every input dtype the only error is fp32 summation over
T tokens, bounded by about T·2⁻²⁴ times Σ_t |a·b| (2.2e-6 at T = 37). The cases assert 1e-5 of that sum against
the product of the same (rounded) operands in float64: a kernel that rounded to bf16 or fp16 on the way would
miss it by orders of magnitude (2⁻⁸ = 3.9e-3 for bf16), which ``test_bf16_is_summed_in_fp32_not_bf16`` shows.
"""

import os

import pytest
import torch
from torch import nn

pytest.importorskip("triton", reason="triton is not installed (pip install -e .[gpu])")

from spra_dist.core.kernels.triton_sddmm import triton_sampled_weight_grad  # noqa: E402
from spra_dist.core.layer import SpraLinear  # noqa: E402
from spra_dist.core.masks import sample_indices  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("neither TRITON_INTERPRET=1 nor a CUDA device: nothing can run the kernel", allow_module_level=True)

RTOL_OF_ABS_SUM = 1e-5


@pytest.fixture
def device(monkeypatch):
    """``cpu`` under the interpreter, else ``cuda`` (compiled); SPRA_SDDMM at its default."""
    monkeypatch.delenv("SPRA_SDDMM", raising=False)
    return "cpu" if INTERPRET else "cuda"


def operands(tokens, n_in, n_out, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n_in, generator=g).to(dtype)
    dy = torch.randn(tokens, n_out, generator=g).to(dtype)
    return x.to(device), dy.to(device)


def check(got, x, dy, idx, *, transposed):
    """``got`` equals the float64 product of the same operands at ``idx``, within RTOL_OF_ABS_SUM of Σ|a·b|;
    returns the largest error relative to the largest reference entry (what the docs report)."""
    a, b = (x, dy) if transposed else (dy, x)
    a, b = a.double().cpu(), b.double().cpu()
    idx = idx.long().cpu()
    ref = (a.t() @ b).reshape(-1)[idx]
    abs_sum = (a.abs().t() @ b.abs()).reshape(-1)[idx]
    assert got.dtype == torch.float32 and got.shape == idx.shape
    err = (got.double().cpu() - ref).abs()
    worst = (err / abs_sum.clamp_min(1e-30)).max().item() if idx.numel() else 0.0
    assert worst <= RTOL_OF_ABS_SUM, f"error {worst:.2e} of Σ|a·b| (allowed {RTOL_OF_ABS_SUM})"
    return (err.max() / ref.abs().max()).item() if idx.numel() else 0.0


@pytest.mark.parametrize("transposed", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_matches_dense_float64(device, dtype, transposed):
    # T = 37: one full 32-token tile and a ragged one; k = 300 of 40 x 24: two full 128-entry blocks and a ragged
    # one, spanning every row of the mask.
    n_in, n_out, tokens, k = 40, 24, 37, 300
    idx = sample_indices(7, "block.proj.weight", n_in * n_out, k).to(device)
    x, dy = operands(tokens, n_in, n_out, dtype, device)
    got = triton_sampled_weight_grad(x, dy, idx, transposed=transposed)
    err = check(got, x, dy, idx, transposed=transposed)
    print(f"max error / max |reference|: {err:.2e} ({dtype}, {'conv1d' if transposed else 'linear'}, {device})")
    n_cols = n_out if transposed else n_in
    assert (idx // n_cols).unique().numel() > 5  # the mask spans several rows


def test_bf16_is_summed_in_fp32_not_bf16(device):
    """The assertion has teeth: a bf16 sum of the same products misses the reference by far more than allowed."""
    n_in, n_out, tokens, k = 32, 16, 64, 40
    idx = sample_indices(2, "w", n_in * n_out, k).to(device)
    x, dy = operands(tokens, n_in, n_out, torch.bfloat16, device, seed=4)
    check(triton_sampled_weight_grad(x, dy, idx, transposed=False), x, dy, idx, transposed=False)
    rows, cols = idx // n_in, idx % n_in
    acc = torch.zeros(k, dtype=torch.bfloat16, device=device)
    for t in range(tokens):  # a running sum kept in bf16, as a kernel without the fp32 cast would keep it
        acc = acc + dy[t, rows] * x[t, cols]
    with pytest.raises(AssertionError, match="of Σ"):
        check(acc.float(), x, dy, idx, transposed=False)


@pytest.mark.parametrize(("block_k", "block_t", "splits"), [(32, 16, 3), (16, 64, 2), (128, 32, 1)])
def test_blocks_and_token_splits(device, block_k, block_t, splits):
    """Several entry blocks and token ranges, the last of each ragged; partial sums added per split."""
    n_in, n_out, tokens, k = 24, 20, 150, 211
    idx = sample_indices(3, "w", n_in * n_out, k).to(device)
    x, dy = operands(tokens, n_in, n_out, torch.float32, device, seed=1)
    got = triton_sampled_weight_grad(x, dy, idx, transposed=False, block_k=block_k, block_t=block_t, splits=splits)
    check(got, x, dy, idx, transposed=False)


@pytest.mark.parametrize("transposed", [False, True], ids=["linear", "conv1d"])
def test_corners_one_entry_and_int32_indices(device, transposed):
    n_in, n_out, tokens = 17, 13, 5
    x, dy = operands(tokens, n_in, n_out, torch.float32, device, seed=2)
    n_cols = n_out if transposed else n_in
    numel = n_in * n_out
    corners = torch.tensor([0, n_cols - 1, n_cols, numel - n_cols, numel - 1], device=device)
    for idx in (corners, corners.int(), corners[-1:], corners[:1]):  # k = 5 in int64 and int32, k = 1 twice
        check(triton_sampled_weight_grad(x, dy, idx, transposed=transposed), x, dy, idx, transposed=transposed)
    empty = triton_sampled_weight_grad(x, dy, corners[:0], transposed=transposed)
    assert empty.shape == (0,) and empty.dtype == torch.float32


def test_strided_operands_are_read_in_place(device):
    """Views with any strides (a column slice, a transposed feature-major buffer) give the contiguous result."""
    n_in, n_out, tokens, k = 20, 12, 40, 90
    idx = sample_indices(5, "w", n_in * n_out, k).to(device)
    x, dy = operands(tokens, n_in, n_out, torch.bfloat16, device, seed=3)
    wide = torch.zeros(tokens, n_in + 9, dtype=x.dtype, device=device)
    wide[:, 4:4 + n_in] = x
    x_view = wide[:, 4:4 + n_in]
    dy_view = dy.t().contiguous().t()  # feature-major storage of the same values
    assert not x_view.is_contiguous() and not dy_view.is_contiguous()
    got = triton_sampled_weight_grad(x_view, dy_view, idx, transposed=False)
    torch.testing.assert_close(got, triton_sampled_weight_grad(x, dy, idx, transposed=False), rtol=0, atol=0)
    check(got, x, dy, idx, transposed=False)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_layer_through_triton_matches_sampled_addmm(device, kind, monkeypatch):
    """SpraLinear's backward with SPRA_SDDMM=triton equals the default CPU path (sampled_addmm) on one batch."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    base = nn.Linear(24, 16) if kind == "linear" else Conv1D(16, 24)
    layer = SpraLinear(base.to(device), name="block.proj", k=70, seed=5)
    x = torch.randn(3, 11, 24, device=device)
    g = torch.randn(3, 11, 16, device=device)
    grads = {}
    for backend in ("triton", "sampled_addmm"):
        monkeypatch.setenv("SPRA_SDDMM", backend)
        layer.spra_values.grad = None
        (layer(x) * g).sum().backward()
        grads[backend] = layer.spra_values.grad.clone()
    torch.testing.assert_close(grads["triton"], grads["sampled_addmm"], rtol=1e-5, atol=1e-5)
