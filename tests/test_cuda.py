"""The layer and a model on CUDA: float64 dense references in fp32 and under bf16 autocast, the Triton SDDMM
against sampled_addmm, and a tiny Llama's training steps. ``make gpu-check`` runs this file on a GPU machine.

Tolerances as in tests/triton_cases.py: the values' gradient is summed in fp32 from operands whose products are
exact in fp32 (fp32, or bf16 under autocast), so it is held to 1e-5 of Σ_t |a·b| against the float64 product of
the same operands; outputs and input gradients computed by bf16 matmuls get bf16's 1.6e-2.
"""

import copy

import pytest
import torch
from tiny_models import batch, tiny_llama
from torch import nn

from spra_dist import SpraConfig, apply_spra
from spra_dist.core.kernels.sddmm import sampled_weight_grad
from spra_dist.core.kernels.triton_sddmm import triton_available
from spra_dist.core.layer import SpraLinear
from spra_dist.core.masks import budget, sample_indices

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA device (torch.cuda.is_available() is False); make gpu-check runs these")
RTOL_OF_ABS_SUM = 1e-5
BF16_TOL = {"rtol": 1.6e-2, "atol": 1e-2}


@pytest.fixture(autouse=True)
def exact_fp32_matmul(monkeypatch):
    """fp32 matmuls in fp32 (no TF32), and the default SDDMM backend (Triton when it is installed)."""
    monkeypatch.delenv("SPRA_SDDMM", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def assert_sampled(got, a, b, idx):
    """``got`` is (aᵀb)[idx] of the float64 operands within RTOL_OF_ABS_SUM of Σ|a·b| per entry."""
    a, b, idx = a.double().cpu(), b.double().cpu(), idx.cpu()
    ref = (a.t() @ b).reshape(-1)[idx]
    abs_sum = (a.abs().t() @ b.abs()).reshape(-1)[idx].clamp_min(1e-30)
    worst = ((got.double().cpu() - ref).abs() / abs_sum).max().item()
    assert worst <= RTOL_OF_ABS_SUM, f"values' gradient off by {worst:.2e} of Σ|a·b|"


def cuda_layer(kind: str, *, n_in=96, n_out=80, k=900) -> SpraLinear:
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    base = nn.Linear(n_in, n_out) if kind == "linear" else Conv1D(n_out, n_in)
    layer = SpraLinear(base, name="block.proj", k=k, seed=5).cuda()
    with torch.no_grad():
        layer.spra_values.normal_(0, 0.05)
    return layer


def dense_weight(layer: SpraLinear) -> torch.Tensor:
    return (layer.weight.detach() + layer.get_delta_weight()).double().cpu()


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_layer_fp32_matches_dense_float64(kind):
    layer = cuda_layer(kind)
    before = layer.weight.detach().clone()
    x = torch.randn(4, 50, 96, device="cuda", requires_grad=True)
    y = layer(x)
    g = torch.randn_like(y)
    (y * g).sum().backward()

    w, xd, gd = dense_weight(layer), x.detach().double().cpu(), g.double().cpu()
    y_ref = (xd @ w if layer.transposed else xd @ w.t()) + layer.bias.double().cpu()
    dx_ref = gd @ w.t() if layer.transposed else gd @ w
    torch.testing.assert_close(y.double().cpu(), y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double().cpu(), dx_ref, rtol=1e-5, atol=1e-5)
    x2, g2 = xd.reshape(-1, 96), gd.reshape(-1, 80)
    a, b = (x2, g2) if layer.transposed else (g2, x2)
    assert_sampled(layer.spra_values.grad, a, b, layer.spra_indices)
    assert torch.equal(layer.weight, before) and layer.weight.grad is None


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_layer_bf16_autocast_matches_dense_float64(kind):
    layer = cuda_layer(kind)
    before = layer.weight.detach().clone()
    x = torch.randn(4, 50, 96, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    g = torch.randn(y.shape, device="cuda")
    (y.float() * g).sum().backward()  # the gradient reaching the layer is g in bf16

    w = dense_weight(layer)
    xb, gb = x.detach().bfloat16().double().cpu(), g.bfloat16().double().cpu()
    y_ref = (xb @ w if layer.transposed else xb @ w.t()) + layer.bias.double().cpu()
    torch.testing.assert_close(y.double().cpu(), y_ref, **BF16_TOL)
    assert x.grad.dtype == torch.float32
    torch.testing.assert_close(x.grad.double().cpu(), gb @ w.t() if layer.transposed else gb @ w, **BF16_TOL)
    assert layer.spra_values.grad.dtype == torch.float32
    x2, g2 = xb.reshape(-1, 96), gb.reshape(-1, 80)
    a, b = (x2, g2) if layer.transposed else (g2, x2)
    assert_sampled(layer.spra_values.grad, a, b, layer.spra_indices)
    assert torch.equal(layer.weight, before)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_host_kept_mask_stays_pinned_on_the_host_and_trains_like_a_gpu_kept_one(kind):
    """Default residency: the mask stays in page-locked host memory and each op copies it; ``device`` keeps it on
    the GPU. Outputs and gradients are identical, and only ``device`` leaves a mask in GPU memory."""
    grads = []
    for residency in ("host", "device"):
        layer = cuda_layer(kind)
        layer.mask_residency = residency
        x = torch.randn(4, 50, 96, device="cuda", requires_grad=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = layer(x)
        y.float().sum().backward()
        grads.append((y.detach(), x.grad, layer.spra_values.grad))
        kept = layer.spra_indices.device.type
        assert kept == ("cpu" if residency == "host" else "cuda")
        assert residency == "device" or (layer.spra_indices.is_pinned() and layer.spra_crow.is_pinned())
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)


@pytest.mark.skipif(not triton_available("cuda"), reason="triton is not installed (pip install -e .[gpu])")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("n_out", "n_in"), [(576, 576), (1536, 576), (576, 1536)])
def test_triton_matches_sampled_addmm_on_smollm2_shapes(monkeypatch, dtype, n_out, n_in):
    """2,048 tokens at the r=8 budget: the split-token grid of the real shapes, both backends against float64."""
    k = budget((n_out, n_in), lora_rank=8, density=None)
    idx = sample_indices(0, "model.layers.0.mlp.proj.weight", n_out * n_in, k).cuda()
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(2048, n_in, device="cuda", generator=g).to(dtype)
    dy = torch.randn(2048, n_out, device="cuda", generator=g).to(dtype)
    got = {}
    for backend in ("triton", "sampled_addmm"):
        monkeypatch.setenv("SPRA_SDDMM", backend)
        got[backend] = sampled_weight_grad(x, dy, idx, transposed=False)
        assert got[backend].dtype == torch.float32
        assert_sampled(got[backend], dy, x, idx)
    torch.testing.assert_close(got["triton"], got["sampled_addmm"], rtol=1e-4, atol=1e-4)


def values_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().float().cpu() for n, p in model.named_parameters() if n.endswith("spra_values")}


def test_tiny_llama_train_step_on_cuda_matches_cpu():
    ids = batch(n=4, t=32)
    cpu = apply_spra(tiny_llama(), SpraConfig(lora_rank=4, seed=3)).train()
    with torch.no_grad():  # non-zero deltas, so the merge inside the forward matters
        for p in cpu.parameters():
            if p.requires_grad:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(p.numel()))
    cuda = copy.deepcopy(cpu).cuda()
    grads = {}
    for device, model in (("cpu", cpu), ("cuda", cuda)):
        model(input_ids=ids.to(device), labels=ids.to(device)).loss.backward()
        grads[device] = values_grads(model)
    assert grads["cpu"].keys() == grads["cuda"].keys() and len(grads["cpu"]) == 14  # 7 linears x 2 layers
    for name, ref in grads["cpu"].items():
        torch.testing.assert_close(grads["cuda"][name], ref, rtol=0, atol=1e-4 * ref.abs().max(), msg=name)


def test_tiny_llama_trains_under_bf16_autocast_on_cuda():
    model = apply_spra(tiny_llama(), SpraConfig(lora_rank=4, seed=3)).cuda().train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = batch(n=8, t=32).cuda()
    losses = []
    for _ in range(20):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.1, losses
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"{n} changed"


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["none", "fsdp2"])
def test_spra_train_runs_on_the_gpu_and_matches_the_cpu(engine, tmp_path):
    """``spra train`` puts the model, its masks and the batches on cuda:0 (nccl for fsdp2's group of one) and
    ends with the CPU run's adapter up to fp32 summation order."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from spra_dist.adapters.files import read_adapter

    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, HF_HUB_OFFLINE="1", NVIDIA_TF32_OVERRIDE="0")
    adapters = {}
    for device in ("cuda", "cpu"):
        out = tmp_path / device
        proc = subprocess.run([sys.executable, "-m", "spra_dist", "train", "--config",
                               str(root / "configs/train/debug_tiny_llama.yaml"), f"output_dir={out}", "max_steps=4",
                               "eval_every=0", f"engine={engine}", f"device={device}"],
                              capture_output=True, text=True, env=env, cwd=root, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        summary = json.loads((out / "summary.json").read_text())
        assert summary["device"] == device and summary["engine"] == engine
        adapters[device] = read_adapter(out / "adapter")[1]
    for key, value in adapters["cpu"].items():
        assert (adapters["cuda"][key] - value).norm() <= 1e-3 * value.norm(), key
