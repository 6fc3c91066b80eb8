"""The values' gradient: the sampled product ``Σ_tokens dY[:, row] · X[:, col]`` at the k mask positions (SDDMM).

Never a dense ``dW``: the cost is ``2·T·k`` plus the structure, not ``2·T·n_in·n_out``.
"""

from __future__ import annotations

import torch

from spra_dist.kernels.cpu_sddmm import cpu_sampled_matmul_t
from spra_dist.kernels.shared import per_input
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


def csr_structure(indices: torch.Tensor, n_rows: int, n_cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row pointers and column indices of sorted row-major flat ``indices`` into (n_rows, n_cols): they are
    already in CSR order, so the row pointers come from a binary search, O(rows · log k). A layer computes them
    once per mask (``SpraLinear.rebuild_indices``), not every backward."""
    bounds = torch.arange(n_rows + 1, device=indices.device, dtype=indices.dtype) * n_cols
    return torch.searchsorted(indices, bounds), indices % n_cols


def feature_major(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x2d.t()`` as a contiguous ``dtype`` tensor (features × tokens) for ``x`` (..., features); one copy per
    input, however many sibling layers (q/k/v, gate/up) ask for it during a backward."""
    return per_input(x, ("feature_major", dtype), lambda: x.reshape(-1, x.shape[-1]).t().to(dtype).contiguous())


def sampled_matmul_t(a: torch.Tensor, b: torch.Tensor, indices: torch.Tensor, n_cols: int, *,
                     csr: tuple[torch.Tensor, torch.Tensor] | None = None, shared: str | None = None,
                     a_source: torch.Tensor | None = None, b_source: torch.Tensor | None = None) -> torch.Tensor:
    """``(aᵀ @ b).view(-1)[indices]`` for ``a`` (T, m), ``b`` (T, n) and sorted flat ``indices`` into (m, n),
    without forming the (m, n) product, summed in at least fp32.

    On CPU the token-major kernel of ``spra_dist.kernels.cpu_sddmm`` runs when it is built and switched on.
    Otherwise ``torch.sparse.sampled_addmm`` on the CSR mask computes one vectorised dot product over the tokens
    per entry; it takes fp32/fp64 operands, feature-major (each made here by one explicit copy, far cheaper than
    the kernel's own handling of transposed views). ``a_source`` / ``b_source``: the layer input the operand was
    reshaped from, whose feature-major copy sibling layers share (``feature_major``).
    """
    acc = acc_dtype(a.dtype)
    n_rows = a.shape[1]
    if a.device.type not in ("cpu", "cuda"):
        return sampled_gather(a, b, indices // n_cols, indices % n_cols)
    crow, cols = csr if csr is not None else csr_structure(indices, n_rows, n_cols)
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
                        csr: tuple[torch.Tensor, torch.Tensor] | None = None,
                        x: torch.Tensor | None = None) -> torch.Tensor:
    """Entries of the weight gradient at the flat ``indices``, for inputs ``x2d`` (T, in) and output gradients
    ``dy2d`` (T, out), in at least fp32. ``csr``: the mask's cached (row pointers, column indices); ``x``: the
    layer input ``x2d`` was reshaped from, to share its prepared copy with sibling layers.

    Linear stores its weight as (out, in) and ``dW = dYᵀ X``; Conv1D stores (in, out) and ``dW = Xᵀ dY``.
    """
    if use_triton(x2d, dy2d):  # CUDA (or SPRA_SDDMM=triton): the Triton kernel, no fp32 or transposed copies
        return triton_sampled_weight_grad(x2d, dy2d, indices, transposed=transposed)
    if transposed:
        return sampled_matmul_t(x2d, dy2d, indices, dy2d.shape[1], csr=csr, a_source=x)
    return sampled_matmul_t(dy2d, x2d, indices, x2d.shape[1], csr=csr, b_source=x)
