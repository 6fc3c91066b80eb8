"""The values' gradient: the sampled product ``Σ_tokens dY[:, row] · X[:, col]`` at the k mask positions (SDDMM).

Never a dense ``dW``: the cost is ``2·T·k`` plus the structure, not ``2·T·n_in·n_out``.
"""

from __future__ import annotations

import numpy as np
import torch

from spra_dist.core.kernels.cpu_sddmm import cpu_sampled_matmul_t
from spra_dist.core.kernels.shared import per_input
from spra_dist.core.kernels.triton_sddmm import triton_sampled_weight_grad, use_triton

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


def index_dtype(numel: int) -> torch.dtype:
    """The narrowest dtype for flat indices into ``numel`` entries: int32 below 2³¹ (every matrix of today's
    models), int64 above. Indices are the one per-value state that sharding does not divide, so 4 bytes a value
    instead of 8 matter: Llama-3-70B at r=8 holds about 415 MB of them on every rank instead of 830."""
    return torch.int32 if numel < 2**31 else torch.int64


def row_pointers(indices: torch.Tensor, n_rows: int, n_cols: int) -> torch.Tensor:
    """CSR row pointers of sorted row-major flat ``indices`` into (n_rows, n_cols), in their dtype: the indices
    are already in CSR order, so a binary search finds each row's start, O(rows · log k). A layer computes them
    once per mask (``SpraLinear.rebuild_indices``), not every backward."""
    if indices.device.type == "cpu":  # where masks are built: numpy's search is about twice torch's here
        flat = indices.numpy()
        bounds = np.arange(n_rows + 1, dtype=flat.dtype) * flat.dtype.type(n_cols)  # ≤ numel: fits the dtype
        return torch.from_numpy(np.searchsorted(flat, bounds).astype(flat.dtype))
    bounds = torch.arange(n_rows + 1, device=indices.device, dtype=indices.dtype) * n_cols
    return torch.searchsorted(indices, bounds, out_int32=indices.dtype == torch.int32)


def column_indices(indices: torch.Tensor, n_cols: int) -> torch.Tensor:
    """CSR column indices of flat ``indices`` into rows of ``n_cols``: one remainder over k entries, made in the
    backward instead of kept beside the indices (which would double the mask's memory)."""
    return indices % n_cols


def csr_structure(indices: torch.Tensor, n_rows: int, n_cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row pointers, column indices) of sorted row-major flat ``indices`` into (n_rows, n_cols)."""
    return row_pointers(indices, n_rows, n_cols), column_indices(indices, n_cols)


def feature_major(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x2d.t()`` as a contiguous ``dtype`` tensor (features × tokens) for ``x`` (..., features); one copy per
    input, however many sibling layers (q/k/v, gate/up) ask for it during a backward."""
    return per_input(x, ("feature_major", dtype), lambda: x.reshape(-1, x.shape[-1]).t().to(dtype).contiguous())


def sampled_matmul_t(a: torch.Tensor, b: torch.Tensor, indices: torch.Tensor, n_cols: int, *,
                     crow: torch.Tensor | None = None, a_source: torch.Tensor | None = None,
                     b_source: torch.Tensor | None = None) -> torch.Tensor:
    """``(aᵀ @ b).view(-1)[indices]`` for ``a`` (T, m), ``b`` (T, n) and sorted flat ``indices`` into (m, n),
    without forming the (m, n) product, summed in at least fp32.

    On CPU the token-major kernel of ``spra_dist.core.kernels.cpu_sddmm`` runs when it is built and switched on.
    Otherwise ``torch.sparse.sampled_addmm`` on the CSR mask computes one vectorised dot product over the tokens
    per entry; it takes fp32/fp64 operands, feature-major (each made here by one explicit copy, far cheaper than
    the kernel's own handling of transposed views). ``crow``: the mask's cached row pointers (built here when
    absent). ``a_source`` / ``b_source``: the layer input the operand was reshaped from, whose feature-major copy
    sibling layers share (``feature_major``).
    """
    acc = acc_dtype(a.dtype)
    n_rows = a.shape[1]
    if a.device.type not in ("cpu", "cuda"):
        return sampled_gather(a, b, indices // n_cols, indices % n_cols)
    crow = crow if crow is not None else row_pointers(indices, n_rows, n_cols)
    cols = column_indices(indices, n_cols)
    if a.device.type == "cpu":
        out = cpu_sampled_matmul_t(a, b, crow, cols)
        if out is not None:
            return out
    mask = torch.sparse_csr_tensor(crow, cols, torch.zeros(indices.numel(), dtype=acc, device=a.device),
                                   (n_rows, n_cols), check_invariants=False)
    a_fm = feature_major(a_source, acc) if a_source is not None else a.t().to(acc).contiguous()
    b_fm = feature_major(b_source, acc) if b_source is not None else b.t().to(acc).contiguous()
    return torch.sparse.sampled_addmm(mask, a_fm, b_fm.t(), beta=0.0).values()


def sampled_weight_grad(x2d: torch.Tensor, dy2d: torch.Tensor, indices: torch.Tensor, *, transposed: bool,
                        crow: torch.Tensor | None = None, x: torch.Tensor | None = None) -> torch.Tensor:
    """Entries of the weight gradient at the flat ``indices``, for inputs ``x2d`` (T, in) and output gradients
    ``dy2d`` (T, out), in at least fp32. ``crow``: the mask's cached row pointers; ``x``: the layer input ``x2d``
    was reshaped from, to share its prepared copy with sibling layers.

    Linear stores its weight as (out, in) and ``dW = dYᵀ X``; Conv1D stores (in, out) and ``dW = Xᵀ dY``.
    """
    if use_triton(x2d, dy2d):  # CUDA (or SPRA_SDDMM=triton): the Triton kernel, no fp32 or transposed copies
        return triton_sampled_weight_grad(x2d, dy2d, indices, transposed=transposed)
    if transposed:
        return sampled_matmul_t(x2d, dy2d, indices, dy2d.shape[1], crow=crow, a_source=x)
    return sampled_matmul_t(dy2d, x2d, indices, x2d.shape[1], crow=crow, b_source=x)
