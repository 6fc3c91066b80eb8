"""The values' gradient on GPUs: a Triton SDDMM that reads token-major activations in their own dtype.

    grad[j] = Σ_t a[t, r_j] · b[t, c_j],   (r_j, c_j) = divmod(indices[j], n)

with ``a = dY`` (T, out), ``b = X`` (T, in) for ``nn.Linear`` and ``a = X``, ``b = dY`` for GPT-2's ``Conv1D``.
``torch.sparse.sampled_addmm`` takes fp32/fp64 only and wants feature-major operands, so on a bf16 run it costs an
fp32, transposed copy of every activation; this kernel loads bf16 / fp16 / fp32 straight from the token-major
tensors (any strides), converts in registers and sums in fp32.

Blocking. Program ``(i, s)`` owns entries ``[i·BLOCK_K, (i+1)·BLOCK_K)`` and token split ``s``. It loads its
indices once, turns each into two pointers (``a + r·stride``, ``b + c·stride``), then walks its tokens in tiles of
``BLOCK_T``: one (BLOCK_T, BLOCK_K) tile of each operand, multiplied and summed over the tile's tokens into a
BLOCK_K fp32 accumulator. The entries are the fast axis of a tile, so one warp reads one token row at once:
sorted indices put neighbouring entries in the same row ``r`` (one address, broadcast) at increasing columns ``c``
(a few cache lines of one contiguous row of ``b``). When there are too few entry blocks to fill the GPU, the
tokens are split over a second grid axis; each split writes its own partial sums and they are added afterwards in
a fixed order, so the result is deterministic (no atomics).
"""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor

BLOCK_K = 128
"""Entries per program: 128 spans a few mask rows at SpaRA's densities and keeps a tile at 32 values a thread."""
BLOCK_T = 32
"""Tokens per tile (the loop step); two (BLOCK_T, BLOCK_K) fp32 tiles live in registers at once."""
NUM_WARPS = 4
MIN_TILES_PER_SPLIT = 8
"""A token split covers at least this many tiles, so splitting never leaves programs with almost nothing to do."""
PROGRAMS_PER_SM = 4
"""Aim for this many programs per multiprocessor when choosing how many token splits to run."""
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SDDMM_ENV = "SPRA_SDDMM"
BACKENDS = ("auto", "triton", "sampled_addmm")


@functools.cache
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except ImportError:
        return False
    return True


def _interpreting() -> bool:
    """Triton's interpreter is on (``TRITON_INTERPRET=1``): kernels then run on CPU tensors, through numpy."""
    try:
        from triton import knobs

        return bool(knobs.runtime.interpret)
    except (ImportError, AttributeError):  # triton before 3.4 has no knobs
        return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available(device: torch.device | str | None = None) -> bool:
    """Triton is importable and can run on ``device``: a CUDA device, or any device under ``TRITON_INTERPRET=1``.

    Without ``device``: whether it can run anywhere here (a CUDA device is present, or the interpreter is on).
    Set ``TRITON_INTERPRET`` before triton is first imported: triton.language builds its own jitted helpers
    (``tl.sum``) at import, in the mode of that moment (tests/test_triton.py starts a process for this).
    """
    if not _triton_importable():
        return False
    if _interpreting():
        return True
    if device is None:
        return torch.cuda.is_available()
    return torch.device(device).type == "cuda"


def sddmm_backend() -> str:
    """The backend asked for in ``SPRA_SDDMM``: ``auto`` (default: Triton on CUDA, else ``sampled_addmm``),
    ``triton`` (always, an error where it cannot run) or ``sampled_addmm`` (never Triton)."""
    backend = os.environ.get(SDDMM_ENV, "auto") or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"{SDDMM_ENV}={backend!r} is not one of {', '.join(BACKENDS)}")
    return backend


def use_triton(x2d: Tensor, dy2d: Tensor) -> bool:
    """Whether the values' gradient of these activations goes through the Triton kernel (see ``sddmm_backend``)."""
    backend = sddmm_backend()
    if backend == "sampled_addmm":
        return False
    dtypes_ok = x2d.dtype in TRITON_DTYPES and dy2d.dtype in TRITON_DTYPES
    if backend == "auto":
        return x2d.device.type == "cuda" and dtypes_ok and triton_available(x2d.device)
    if not triton_available(x2d.device):
        raise ValueError(f"{SDDMM_ENV}=triton, but Triton cannot run on {x2d.device}: it needs the triton package "
                         f"(pip install spra_dist[gpu]) and a CUDA device, or TRITON_INTERPRET=1 on CPU")
    if not dtypes_ok:
        raise ValueError(f"{SDDMM_ENV}=triton takes float32 / float16 / bfloat16 activations, got {x2d.dtype} and "
                         f"{dy2d.dtype}; unset it to use sampled_addmm (which also sums float64 in float64)")
    return True


@functools.cache
def _kernel(interpret: bool):
    """The jitted kernel, built on first use (``triton.jit`` picks the interpreter when the kernel is defined,
    hence one build per mode)."""
    import triton
    import triton.language as tl

    @triton.jit
    def sddmm_kernel(a_ptr, b_ptr, idx_ptr, out_ptr, k, n_tokens, n_cols, tokens_per_split,
                     stride_at, stride_ar, stride_bt, stride_bc,
                     BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr):
        pid_k = tl.program_id(0)
        split = tl.program_id(1)
        entries = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        in_k = entries < k
        flat = tl.load(idx_ptr + entries, mask=in_k, other=0).to(tl.int64)
        rows = flat // n_cols
        cols = flat - rows * n_cols
        a_entry = a_ptr + rows * stride_ar  # each entry's column of a, at token 0
        b_entry = b_ptr + cols * stride_bc
        t_begin = split * tokens_per_split
        t_end = tl.minimum(t_begin + tokens_per_split, n_tokens)
        acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for t0 in range(t_begin, t_end, BLOCK_T):
            tokens = t0 + tl.arange(0, BLOCK_T)
            live = (tokens < t_end)[:, None] & in_k[None, :]
            t64 = tokens.to(tl.int64)[:, None]  # T · stride can pass 2³¹
            av = tl.load(a_entry[None, :] + t64 * stride_at, mask=live, other=0.0).to(tl.float32)
            bv = tl.load(b_entry[None, :] + t64 * stride_bt, mask=live, other=0.0).to(tl.float32)
            acc += tl.sum(av * bv, axis=0)
        tl.store(out_ptr + split * k + entries, acc, mask=in_k)

    return sddmm_kernel


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.cache
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def token_splits(n_tokens: int, k_blocks: int, device: torch.device, *, block_t: int = BLOCK_T) -> int:
    """How many token ranges to run side by side: enough programs to fill the GPU, each range at least
    ``MIN_TILES_PER_SPLIT`` tiles long. One on the interpreter (nothing to fill)."""
    if device.type != "cuda":
        return 1
    wanted = _cdiv(PROGRAMS_PER_SM * _multiprocessors(device.index or 0), k_blocks)
    longest = max(1, n_tokens // (block_t * MIN_TILES_PER_SPLIT))
    return max(1, min(wanted, longest))


def triton_sampled_weight_grad(x2d: Tensor, dy2d: Tensor, indices: Tensor, *, transposed: bool,
                               block_k: int = BLOCK_K, block_t: int = BLOCK_T, splits: int | None = None,
                               num_warps: int = NUM_WARPS) -> Tensor:
    """Entries of the weight gradient at the sorted flat ``indices``, in fp32, for inputs ``x2d`` (T, in) and
    output gradients ``dy2d`` (T, out), token-major, in fp32 / fp16 / bf16 (no copy is made of either).

    The contract of ``sampled_weight_grad``: Linear's weight is (out, in) and ``dW = dYᵀ X``; Conv1D's
    (``transposed=True``) is (in, out) and ``dW = Xᵀ dY``. ``block_k`` / ``block_t`` (powers of two) set the
    entries per program and the tokens per tile; ``splits`` the token ranges (default: ``token_splits``).
    """
    a, b = (x2d, dy2d) if transposed else (dy2d, x2d)
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[0]:
        raise ValueError(f"expected token-major (T, features) activations with one T, got {tuple(x2d.shape)} and "
                         f"{tuple(dy2d.shape)}")
    n_tokens, n_cols, k = a.shape[0], b.shape[1], indices.numel()
    if k == 0 or n_tokens == 0:
        return torch.zeros(k, dtype=torch.float32, device=a.device)
    indices = indices.contiguous()
    k_blocks = _cdiv(k, block_k)
    splits = splits or token_splits(n_tokens, k_blocks, a.device, block_t=block_t)
    per_split = _cdiv(_cdiv(n_tokens, splits), block_t) * block_t  # a whole number of tiles
    splits = _cdiv(n_tokens, per_split)
    out = torch.empty((splits, k), dtype=torch.float32, device=a.device)
    _kernel(_interpreting())[(k_blocks, splits)](
        a, b, indices, out, k, n_tokens, n_cols, per_split,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        BLOCK_K=block_k, BLOCK_T=block_t, num_warps=num_warps)
    return out[0] if splits == 1 else out.sum(0)
