"""SpaRA's linear as ``torch.library`` custom ops, with fake (meta) implementations and registered autograd.

Three ops, each opaque to ``torch.compile`` (it traces them from their fake implementations, so the CSR
structure built inside the values' gradient causes no graph break):

- ``spra_dist::linear``       ``y = x @ (W + δ)ᵀ + b`` (``x @ (W + δ) + b`` for Conv1D), computed in ``x``'s dtype;
- ``spra_dist::input_grad``   ``dX = dY @ (W + δ)`` (``dY @ (W + δ)ᵀ`` for Conv1D), in ``dY``'s dtype;
- ``spra_dist::values_grad``  the sampled product at the k positions, summed in fp32, in the values' dtype.

Each op takes the layer's mask wherever the layer keeps it (host memory by default) and copies it to the
weight's device for its own use, so the autograd context holds the kept copy and no device-side mask outlives an
op. ``W + δ`` exists only inside an op: the k merged entries are written into the frozen weight and the originals
written back before the op returns, so from outside the weight never changes (no op declares a mutation).

Mixed precision is handled in ``spra_linear``, the one function the layer calls: under ``torch.autocast`` the
input is cast to the autocast dtype, as autocast does for ``nn.Linear``, and every op then computes in explicit
dtypes with autocast off inside. The backward therefore needs no autocast state (``custom_bwd``'s job).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from spra_dist.core.kernels.entries import MergedWeight
from spra_dist.core.kernels.sddmm import sampled_weight_grad

# Floating dtypes that autocast casts to its lower precision (it leaves float64 alone).
_AUTOCAST_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)


def _out_features(weight: Tensor, transposed: bool) -> int:
    return weight.shape[1] if transposed else weight.shape[0]


@torch.library.custom_op("spra_dist::linear", mutates_args=())
def linear_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], values: Tensor, indices: Tensor,  # noqa: UP045
              crow: Optional[Tensor], transposed: bool) -> Tensor:  # noqa: UP045
    """``x @ (W + δ)ᵀ + b`` in ``x``'s dtype (the merged weight and the bias are cast to it when they differ)."""
    indices = to_device(indices, weight)
    with torch.autocast(x.device.type, enabled=False), MergedWeight(weight, indices, values):
        w = weight.to(x.dtype)  # the merged weight itself when the dtypes agree: used inside the block only
        b = None if bias is None else bias.to(x.dtype)
        return plain_linear(x, w, b, transposed=transposed)


def to_device(mask: Tensor, like: Tensor) -> Tensor:
    """A layer's mask where ``like`` lives. A mask kept in host memory is copied for this op alone and freed
    after it (asynchronously from page-locked memory), so a device holds one matrix's mask at a time; the
    autograd context keeps the host copy, not this one."""
    return mask if mask.device == like.device else mask.to(like.device, non_blocking=True)


def plain_linear(x: Tensor, weight: Tensor, bias: Tensor | None, *, transposed: bool) -> Tensor:
    """``nn.Linear`` (weight ``(out, in)``) or GPT-2 ``Conv1D`` (weight ``(in, out)``) on ``x``."""
    if not transposed:
        return F.linear(x, weight, bias)
    y = x.reshape(-1, x.shape[-1]) @ weight
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], weight.shape[-1])


@linear_op.register_fake
def _linear_fake(x, weight, bias, values, indices, crow, transposed):
    return x.new_empty((*x.shape[:-1], _out_features(weight, transposed)))


@torch.library.custom_op("spra_dist::input_grad", mutates_args=())
def input_grad_op(grad_out: Tensor, weight: Tensor, values: Tensor, indices: Tensor, transposed: bool) -> Tensor:
    """``dX = dY @ (W + δ)`` for Linear's (out, in) weight, ``dY @ (W + δ)ᵀ`` for Conv1D's (in, out)."""
    dy = grad_out.reshape(-1, grad_out.shape[-1])
    indices = to_device(indices, weight)
    with torch.autocast(grad_out.device.type, enabled=False), MergedWeight(weight, indices, values):
        w = weight.to(dy.dtype)
        dx = dy @ (w.t() if transposed else w)
    return dx.reshape(*grad_out.shape[:-1], dx.shape[-1])


@input_grad_op.register_fake
def _input_grad_fake(grad_out, weight, values, indices, transposed):
    n_in = weight.shape[0] if transposed else weight.shape[1]
    return grad_out.new_empty((*grad_out.shape[:-1], n_in))


@torch.library.custom_op("spra_dist::values_grad", mutates_args=())
def values_grad_op(x: Tensor, grad_out: Tensor, indices: Tensor, crow: Optional[Tensor],  # noqa: UP045
                   transposed: bool, dtype: torch.dtype) -> Tensor:
    """The weight gradient at the k flat ``indices`` (SDDMM, summed in fp32), returned in ``dtype``. ``crow``:
    the mask's CSR row pointers when the layer cached them."""
    x2d, dy2d = x.reshape(-1, x.shape[-1]), grad_out.reshape(-1, grad_out.shape[-1])
    indices, crow = to_device(indices, x), None if crow is None else to_device(crow, x)
    with torch.autocast(x.device.type, enabled=False):
        return sampled_weight_grad(x2d, dy2d, indices, transposed=transposed, crow=crow, x=x).to(dtype)


@values_grad_op.register_fake
def _values_grad_fake(x, grad_out, indices, crow, transposed, dtype):
    return x.new_empty(indices.shape, dtype=dtype)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, values, indices, crow, transposed = inputs
    # Only the activation goes through save_for_backward (so checkpointing and offloading hooks see it);
    # parameters and the mask stay on ctx, which also spares the weight a version check that the merge inside
    # a second call of a shared module would trip.
    ctx.save_for_backward(x)
    ctx.weight, ctx.values, ctx.indices, ctx.transposed = weight, values, indices, transposed
    ctx.crow = crow
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad_out):
    (x,) = ctx.saved_tensors
    grad_x = grad_bias = grad_values = None
    indices = to_device(ctx.indices, grad_out)  # one copy of a host-kept mask for both gradients
    if ctx.needs_input_grad[0]:
        grad_x = input_grad_op(grad_out, ctx.weight, ctx.values, indices, ctx.transposed)
    if ctx.needs_input_grad[2]:
        grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0).to(ctx.bias_dtype)
    if ctx.needs_input_grad[3]:
        grad_values = values_grad_op(x, grad_out, indices, ctx.crow, ctx.transposed, ctx.values.dtype)
    return grad_x, None, grad_bias, grad_values, None, None, None


linear_op.register_autograd(_backward, setup_context=_setup_context)


def spra_linear(x: Tensor, weight: Tensor, bias: Tensor | None, values: Tensor, indices: Tensor, *,
                transposed: bool, crow: Tensor | None = None) -> Tensor:
    """The adapted linear, differentiable in ``x``, ``bias`` and ``values``; what ``SpraLinear.forward`` calls.

    Under ``torch.autocast`` the output has the dtype autocast gives ``nn.Linear`` (the autocast dtype), the
    input gradient comes back in the input's dtype and ``values.grad`` in the values' own dtype (fp32 master
    values stay fp32). Outside autocast, ``x`` and ``weight`` must share a dtype, as ``nn.Linear`` requires.
    ``crow``: the mask's CSR row pointers, cached by the layer; built in the backward when absent. ``indices``
    may be int32 (``index_dtype``).
    """
    device = x.device.type
    if torch.is_autocast_enabled(device) and x.dtype in _AUTOCAST_ELIGIBLE:
        # A cast per call, as autocast does for nn.Linear: one cast shared by q/k/v would sum their input
        # gradients in bf16 (measured: different gradients) instead of in the input's dtype.
        x = x.to(torch.get_autocast_dtype(device))  # its backward casts dX back to the input's dtype
    elif x.dtype != weight.dtype:
        raise ValueError(f"SpraLinear got a {x.dtype} input for a {weight.dtype} weight; cast the input (or the "
                         f"model) to one dtype, or run the forward under torch.autocast")
    return linear_op(x, weight, bias, values, indices, crow, transposed)
