"""The values' gradient: the sampled product ``Σ_tokens dY[:, row] · X[:, col]`` at the k mask positions (SDDMM).

Never a dense ``dW``: the cost is ``2·T·k`` plus the structure, not ``2·T·n_in·n_out``.
"""

from __future__ import annotations

import torch

from spra_dist.kernels.triton_sddmm import triton_sampled_weight_grad, use_triton

# Rows of the sampled product computed at once in the fallback path (bounds its temporary memory).
SDDMM_CHUNK = 1 << 14


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Sums over tokens run in at least fp32, whatever the activations' dtype."""
    return torch.promote_types(dtype, torch.float32)


def sampled_gather(a: torch.Tensor, b: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Fallback for devices without sparse CSR kernels: gathered rows multiplied and summed, in chunks."""
    acc = acc_dtype(a.dtype)
    out = torch.empty(rows.numel(), dtype=acc, device=a.device)
    at, bt = a.t().contiguous(), b.t().contiguous()  # (m, T), (n, T): gathered rows are contiguous in T
    for s in range(0, rows.numel(), SDDMM_CHUNK):
        r, c = rows[s:s + SDDMM_CHUNK], cols[s:s + SDDMM_CHUNK]
        out[s:s + r.numel()] = (at[r].to(acc) * bt[c].to(acc)).sum(1)
    return out


def sampled_matmul_t(a: torch.Tensor, b: torch.Tensor, indices: torch.Tensor, n_cols: int) -> torch.Tensor:
    """``(aᵀ @ b).view(-1)[indices]`` for ``a`` (T, m), ``b`` (T, n) and sorted flat ``indices`` into (m, n),
    without forming the (m, n) product.

    Sorted row-major flat indices are already in CSR order, so ``torch.sparse.sampled_addmm`` computes one
    vectorised dot product over the tokens per entry, reusing a row of ``aᵀ`` across its row's entries: about
    20x faster than gathering rows of ``aᵀ`` and ``bᵀ`` into temporaries (see docs/benchmarks.md). Its CPU
    kernel takes fp32/fp64 only, so bf16/fp16 activations are summed in fp32.
    """
    acc = acc_dtype(a.dtype)
    n_rows = a.shape[1]
    if a.device.type not in ("cpu", "cuda"):
        return sampled_gather(a, b, indices // n_cols, indices % n_cols)
    # Row pointers by binary search on the flat indices: O(rows · log k), no division over k.
    bounds = torch.arange(n_rows + 1, device=indices.device, dtype=indices.dtype) * n_cols
    crow = torch.searchsorted(indices, bounds)
    mask = torch.sparse_csr_tensor(crow, indices % n_cols, torch.zeros(indices.numel(), dtype=acc, device=a.device),
                                   (n_rows, n_cols), check_invariants=False)
    return torch.sparse.sampled_addmm(mask, a.t().to(acc), b.to(acc), beta=0.0).values()


def sampled_weight_grad(x2d: torch.Tensor, dy2d: torch.Tensor, indices: torch.Tensor, *,
                        transposed: bool) -> torch.Tensor:
    """Entries of the weight gradient at the flat ``indices``, for inputs ``x2d`` (T, in) and output gradients
    ``dy2d`` (T, out), in at least fp32.

    Linear stores its weight as (out, in) and ``dW = dYᵀ X``; Conv1D stores (in, out) and ``dW = Xᵀ dY``.
    """
    if use_triton(x2d, dy2d):  # CUDA (or SPRA_SDDMM=triton): the Triton kernel, no fp32 or transposed copies
        return triton_sampled_weight_grad(x2d, dy2d, indices, transposed=transposed)
    if transposed:
        return sampled_matmul_t(x2d, dy2d, indices, dy2d.shape[1])
    return sampled_matmul_t(dy2d, x2d, indices, x2d.shape[1])
