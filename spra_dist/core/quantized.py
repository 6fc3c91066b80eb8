"""A frozen base held quantized: what SpraLinear needs to read a weight it can never write.

Two kinds of packed weight are read:

- torchao's ``NF4Tensor`` (``quantize_base: nf4``; ``quantize_targets`` makes them). 4-bit NormalFloat in blocks
  of 64 values with double-quantized scales, as QLoRA; FSDP2 shards it on dim 0 and all-gathers the packed data
  (about 0.52 bytes a value instead of bf16's 2) through its ``fsdp_pre_all_gather`` hooks.
- bitsandbytes' ``Params4bit``, what ``from_pretrained(..., quantization_config=BitsAndBytesConfig(
  load_in_4bit=True))`` puts in each ``Linear4bit``.

The adapted linear over such a weight (``quantized_spra_linear``) dequantizes it into the compute dtype, adds the
k values at their indices (in fp32, rounded once), runs one GEMM and drops the dense copy. It keeps only the packed
weight and the input for the backward, which dequantizes again for dX; the values' gradient is the same sampled
product (SDDMM) as over a dense weight. The packed data is never written: a merge writes dequant(W) + Δ densely.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import logging
from typing import Literal, get_args

import torch
from torch import Tensor, nn

from spra_dist.core.kernels import merged_entries, plain_linear, put
from spra_dist.core.kernels.ops import to_device, values_grad_op

QuantizeBase = Literal["none", "nf4"]
QUANTIZE_BASE: tuple[str, ...] = get_args(QuantizeBase)
NF4_BLOCK = 64  # values per 4-bit block (QLoRA's and torchtune's)
NF4_MAX_SCALER_BLOCK = 256  # blocks per double-quantized scale at most (QLoRA's choice)


def _nf4_module():
    try:
        with _quiet_import():
            return importlib.import_module("torchao.quantization.quantize_.workflows.nf4.nf4_tensor")
    except ImportError as err:
        raise ValueError("quantize_base=nf4 needs torchao: pip install 'spra_dist[quant]' (or pip install "
                         "torchao>=0.18)") from err


@contextlib.contextmanager
def _quiet_import():
    """torchao 0.18 logs, on import, that its CUDA-only extensions did not load on a CPU and that torch no
    longer needs its enum registrations: warnings about nothing a user can act on."""
    loggers = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def is_nf4(weight: Tensor) -> bool:
    """``weight`` (or a DTensor's local shard of it) is a torchao NF4Tensor."""
    local = getattr(weight, "_local_tensor", weight)
    return type(local).__name__ == "NF4Tensor"


def is_bnb_4bit(weight: Tensor) -> bool:
    """``weight`` is a bitsandbytes 4-bit parameter (``Params4bit``, quantized: it has its quant state)."""
    return type(weight).__name__ == "Params4bit" and getattr(weight, "quant_state", None) is not None


def is_bnb_int8(weight: Tensor) -> bool:
    return type(weight).__name__ == "Int8Params"


def quantization_of(weight: Tensor) -> str | None:
    """How a frozen weight is stored: ``nf4`` (torchao), ``bnb-nf4`` / ``bnb-fp4`` (bitsandbytes 4-bit),
    ``bnb-int8``, or None for a plain dense tensor."""
    if type(weight) in (nn.Parameter, Tensor):  # the common case, checked in every forward: a plain weight
        return None
    if is_nf4(weight):
        return "nf4"
    if is_bnb_4bit(weight):
        return f"bnb-{weight.quant_state.quant_type}"
    if is_bnb_int8(weight):
        return "bnb-int8"
    return None


def logical_shape(weight: Tensor) -> tuple[int, int]:
    """The shape of the matrix ``weight`` stands for (bitsandbytes stores 4-bit data as a packed column)."""
    if is_bnb_4bit(weight):
        return tuple(weight.quant_state.shape)
    return tuple(weight.shape)


def compute_dtype(weight: Tensor) -> torch.dtype:
    """The dtype a quantized weight dequantizes to (for a dense weight, its own dtype)."""
    if is_bnb_4bit(weight):
        return weight.quant_state.dtype
    return weight.dtype


def dequantize(weight: Tensor, dtype: torch.dtype) -> Tensor:
    """A fresh dense copy of the matrix ``weight`` stands for, in ``dtype``."""
    if is_nf4(weight):
        return weight.get_original_weight().to(dtype)
    if is_bnb_4bit(weight):
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(weight.data, weight.quant_state).to(dtype)
    return weight.detach().to(dtype, copy=True)


def nf4_scaler_block(shape: tuple[int, int]) -> int:
    """Blocks per double-quantized scale for a matrix of ``shape``: the largest divisor of the blocks in one row
    up to 256. A scale then never spans two rows, so any split into whole rows (FSDP2's shards) cuts the
    packed data, the scales and their factors at the same places."""
    per_row = shape[1] // NF4_BLOCK
    return max(d for d in range(1, min(per_row, NF4_MAX_SCALER_BLOCK) + 1) if per_row % d == 0)


def check_nf4_shape(name: str, shape: tuple[int, ...]) -> None:
    """``ValueError`` unless a matrix of ``shape`` can be held in NF4 (rows of whole 64-value blocks)."""
    if len(shape) != 2 or shape[1] % NF4_BLOCK:
        raise ValueError(f"quantize_base=nf4 cannot pack {name} of shape {tuple(shape)}: NF4 needs rows of a "
                         f"multiple of {NF4_BLOCK} values; leave it out of spra.target_modules or use "
                         f"quantize_base=none")


def to_nf4(weight: Tensor) -> Tensor:
    """``weight`` packed in torchao's NF4 (a pure function of its values, so a merge can rebuild it)."""
    shape = tuple(weight.shape)
    check_nf4_shape("the weight", shape)
    return _nf4_module().to_nf4(weight.detach(), NF4_BLOCK, nf4_scaler_block(shape))


def release_freed_heap() -> None:
    """Hand the heap that freed temporaries left back to the system (glibc's ``malloc_trim``; elsewhere nothing).
    ``to_nf4`` on a CPU frees its temporaries in blocks small enough for glibc's heap, which it keeps and does not
    reuse for a step's large activations: measured on SmolLM2-135M, up to 1 GB more than the bf16 model held."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def check_quantizable(modules: dict[str, nn.Module], kind: str) -> None:
    """``ValueError`` unless every linear of ``modules`` (name -> module) can have its weight packed in ``kind``:
    for callers that must fail before they write anything."""
    if kind == "none":
        return
    if kind not in QUANTIZE_BASE:
        raise ValueError(f"quantize_base={kind!r} is not one of {', '.join(QUANTIZE_BASE)}")
    for name, m in modules.items():
        if quantization_of(m.weight):
            raise ValueError(f"quantize_base={kind} on a base that is already quantized ({name} is "
                             f"{quantization_of(m.weight)}); load the unquantized base, or set quantize_base=none")
        if getattr(m, "transposed", False) or type(m).__name__ == "Conv1D":
            raise ValueError(f"quantize_base={kind}: {name} is a GPT-2 Conv1D (weight stored transposed), which NF4 "
                             f"does not pack; use quantize_base=none for this model")
        check_nf4_shape(name, tuple(m.weight.shape))


class _QuantizedLinear(torch.autograd.Function):
    """``y = x @ (dequant(W) + δ)ᵀ + b``: the dense copy of W lives inside forward and backward only."""

    @staticmethod
    def forward(ctx, x, bias, values, weight, indices, crow):
        with torch.autocast(x.device.type, enabled=False):
            w = merged_dense(weight, None if values is None else to_device(indices, x), values, x.dtype)
            y = plain_linear(x, w, None if bias is None else bias.to(x.dtype), transposed=False)
        ctx.save_for_backward(x)  # the activation only: the packed weight stays on ctx, as in the dense op
        ctx.weight, ctx.indices, ctx.crow, ctx.values = weight, indices, crow, values
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        grad_x = grad_bias = grad_values = None
        idx = None if ctx.values is None else to_device(ctx.indices, grad_out)
        with torch.autocast(grad_out.device.type, enabled=False):
            if ctx.needs_input_grad[0]:
                w = merged_dense(ctx.weight, idx, ctx.values, grad_out.dtype)
                grad_x = (grad_out.reshape(-1, grad_out.shape[-1]) @ w).view(*grad_out.shape[:-1], w.shape[1])
            if ctx.needs_input_grad[1]:
                grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0).to(ctx.bias_dtype)
            if ctx.needs_input_grad[2]:
                grad_values = values_grad_op(x, grad_out, idx, ctx.crow, False, ctx.values.dtype)
        return grad_x, grad_bias, grad_values, None, None, None


def merged_dense(weight: Tensor, indices: Tensor | None, values: Tensor | None, dtype: torch.dtype) -> Tensor:
    """dequant(W) in ``dtype`` with the k merged entries ``dequant(W)[idx] + v`` added in fp32 and rounded once
    (dequant(W) alone for ``values`` None)."""
    w = dequantize(weight, dtype)
    if values is not None and values.numel():
        flat = w.view(-1)
        put(flat, indices, merged_entries(flat[indices], values.detach()))
    return w


def quantized_spra_linear(x: Tensor, weight: Tensor, bias: Tensor | None, values: Tensor | None,
                          indices: Tensor | None, *, crow: Tensor | None = None) -> Tensor:
    """The adapted linear over a packed ``weight``, differentiable in ``x``, ``bias`` and ``values`` (None, None:
    the base layer alone). It computes in the autocast dtype under ``torch.autocast`` and in ``x``'s dtype otherwise
    (as bitsandbytes' Linear4bit)."""
    device = x.device.type
    if torch.is_autocast_enabled(device) and x.is_floating_point():
        x = x.to(torch.get_autocast_dtype(device))
    return _QuantizedLinear.apply(x, bias, values, weight, indices, crow)


def check_quantize_engine(kind: str, *, engine: str) -> None:
    """``ValueError`` for ``quantize_base=kind`` under an engine that cannot hold NF4 weights, before anything
    is built or written."""
    if kind != "none" and engine == "deepspeed":
        raise ValueError(f"quantize_base={kind} runs under engine none, ddp or fsdp2 (FSDP2 shards and all-gathers "
                         f"the packed weights); DeepSpeed would cast or flatten them: launch with torchrun and "
                         f"engine=fsdp2, or set quantize_base=none")


def check_engine(model: nn.Module, *, engine: str, zero_stage: int = 0, world_size: int = 1) -> None:
    """``ValueError`` when ``model``'s quantized weights cannot go under ``engine`` as asked: bitsandbytes 4-bit
    under FSDP2 or ZeRO-3 (known to lose its quant state or train at loss 0 / NaN), NF4 under DeepSpeed, or an NF4
    matrix whose rows FSDP2 cannot split evenly over ``world_size`` ranks."""
    kinds: dict[str, str] = {}
    for name, p in model.named_parameters():
        kind = quantization_of(p)
        if kind:
            kinds.setdefault(kind, name)
    bnb = next((k for k in kinds if k.startswith("bnb-")), None)
    if bnb and (engine == "fsdp2" or (engine == "deepspeed" and zero_stage == 3)):
        raise ValueError(f"{kinds[bnb]} is a bitsandbytes {bnb[4:]} weight, which {engine} cannot shard safely (its "
                         f"quant state is lost, or training runs at loss 0 / NaN); load the unquantized base and set "
                         f"quantize_base=nf4 (torchao's NF4, which FSDP2 shards), or use engine none, ddp, or "
                         f"DeepSpeed ZeRO-1/2")
    if "nf4" in kinds:
        check_quantize_engine("nf4", engine=engine)
        if engine == "fsdp2" and world_size == 1:
            # torch 2.13's FSDP2 skips the all-gather extension on one rank, and torchao 0.18's NF4 then fails
            raise ValueError("FSDP2 on one rank cannot hold NF4 weights (its one-rank path bypasses their "
                             "all-gather); on one process use engine=none, which holds the same packed base")
        if engine == "fsdp2":
            uneven = [(n, p.shape[0]) for n, p in model.named_parameters() if is_nf4(p) and p.shape[0] % world_size]
            if uneven:
                raise ValueError(f"FSDP2 over {world_size} ranks cannot split NF4 weight {uneven[0][0]} of "
                                 f"{uneven[0][1]} rows evenly ({len(uneven)} such); run on a number of ranks that "
                                 f"divides every adapted matrix's rows, or leave those matrices out of "
                                 f"spra.target_modules")


@torch.no_grad()
def fill_nf4_rows(out: Tensor, full: Tensor, rows: tuple[int, int] | None) -> None:
    """Pack the whole matrix ``full`` in NF4 and write its rows ``rows`` (all of them for None) into the NF4
    tensor ``out`` (a rank's FSDP2 shard). Packing the whole matrix keeps the double quantization's mean scale that
    of the whole matrix, so every world size holds the same packed base; a scale never spans two rows
    (``nf4_scaler_block``), so rows cut every packed part cleanly."""
    packed = to_nf4(full.to(out.dtype))
    n = full.shape[0]
    start, stop = rows or (0, n)
    for attr in ("quantized_data", "quantized_scalers", "quantization_factor"):
        getattr(out, attr).copy_(getattr(packed, attr).view(n, -1)[start:stop].reshape(-1))
    # In place: FSDP2 keeps its own wrappers of these tensors (sharing their storage), which must see the values.
    out.scaler_mean.copy_(packed.scaler_mean)
    out.nf4.copy_(packed.nf4)


def nf4_on_meta_for(weight: Tensor, device: torch.device) -> Tensor:
    """A meta NF4 ``weight`` (``quantize_targets`` on a meta model) whose two unsharded parts, the mean scale and the
    16-value codebook, live on ``device`` already: ``to_empty`` materialises only the sharded parts, so these must be
    real before sharding for ``fill_nf4_rows`` to write them where every FSDP2 wrapper of the shard reads them."""
    parts = _nf4_module()
    return parts.NF4Tensor(*parts.construct_nf4_args(weight, {
        "scaler_mean": torch.zeros((), dtype=weight.scaler_mean.dtype, device=device),
        "nf4": torch.zeros(weight.nf4.shape, dtype=weight.nf4.dtype, device=device)}))


def describe(weight: Tensor) -> dict | None:
    """What an adapter records of a quantized base weight, so that a merge can rebuild the same packed base from
    the unquantized one (``roundtrip``); None for a dense weight."""
    kind = quantization_of(weight)
    if kind is None:
        return None
    dtype = str(compute_dtype(weight)).removeprefix("torch.")
    if kind == "nf4":
        return {"method": "nf4", "dtype": dtype, "block_size": NF4_BLOCK}
    if kind.startswith("bnb-") and kind != "bnb-int8":
        state = weight.quant_state
        return {"method": kind, "dtype": dtype, "block_size": state.blocksize, "double_quant": bool(state.nested)}
    return {"method": kind, "dtype": dtype}


@torch.no_grad()
def roundtrip(weight: Tensor, record: dict) -> Tensor:
    """dequant(quant(``weight``)) as the base ``record`` (``describe``) was packed, in the record's dtype: the
    frozen weight the adapter was trained on, rebuilt from the unquantized base."""
    dtype = getattr(torch, record["dtype"])
    w = weight.detach().to(dtype)
    match record["method"]:
        case "nf4":
            return to_nf4(w).get_original_weight().to(dtype)
        case "bnb-nf4" | "bnb-fp4":
            import bitsandbytes.functional as bnbf

            packed, state = bnbf.quantize_4bit(w, blocksize=record["block_size"], quant_type=record["method"][4:],
                                               compress_statistics=record["double_quant"])
            return bnbf.dequantize_4bit(packed, state).to(dtype)
        case other:
            raise ValueError(f"the adapter's base was held in {other}, which a merge cannot rebuild; merge onto the "
                             f"quantized base in Python (merge_adapter) instead")
