"""SpraLinear: a frozen linear layer plus ``k`` trainable entries of a sparse delta.

Forward computes ``x @ (W + scatter(values))ᵀ + b`` by writing the ``k`` merged entries into the frozen
weight, running the ordinary matmul and writing the ``k`` saved originals back: no clone of the weight, no
dense delta, and the frozen weight is restored bit for bit (no add-then-subtract drift in bf16).

Backward gives the input gradient through the merged weight, and the values' gradient as the sampled
product ``Σ_tokens dY[:, row] · X[:, col]`` at the ``k`` positions (SDDMM) — never a dense ``dW``.

The module keeps the base layer's ``weight`` and ``bias`` names, so base checkpoints load unchanged and every
engine's hooks (FSDP2, ZeRO-3) see and gather the module's own parameters. ``spra_indices`` is a
non-persistent buffer: it is rebuilt from the seed, never saved.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from spra_dist.masks import sample_indices

try:  # GPT-2 style layers keep their weight as (in, out)
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency
    Conv1D = None

# Rows of the sampled product computed at once in the fallback path (bounds its temporary memory).
_SDDMM_CHUNK = 1 << 14

# torch warns once that CSR tensors are "beta"; we only build one and call sampled_addmm on it, both pinned by
# tests against a dense float64 reference, so the warning would only alarm users.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)


def is_conv1d(module: nn.Module) -> bool:
    return Conv1D is not None and isinstance(module, Conv1D)


def merged_entries(originals: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``originals + values`` added in at least fp32, rounded once to the weight's dtype."""
    acc = torch.promote_types(originals.dtype, torch.float32)
    return (originals.to(acc) + values.to(acc)).to(originals.dtype)


class _MergedWeight:
    """Context manager: the weight holds ``W + delta`` at the sampled positions inside the block only."""

    def __init__(self, weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor):
        self.flat, self.indices, self.values = weight.view(-1), indices, values

    def __enter__(self) -> None:
        self.saved = self.flat[self.indices]  # a gather: a copy of k entries
        self.flat.index_copy_(0, self.indices, merged_entries(self.saved, self.values))

    def __exit__(self, *exc) -> None:
        self.flat.index_copy_(0, self.indices, self.saved)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Sums over tokens run in at least fp32, whatever the activations' dtype."""
    return torch.promote_types(dtype, torch.float32)


def _sampled_gather(a: torch.Tensor, b: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Fallback for devices without sparse CSR kernels: gathered rows multiplied and summed, in chunks."""
    acc = _acc_dtype(a.dtype)
    out = torch.empty(rows.numel(), dtype=acc, device=a.device)
    at, bt = a.t().contiguous(), b.t().contiguous()  # (m, T), (n, T): gathered rows are contiguous in T
    for s in range(0, rows.numel(), _SDDMM_CHUNK):
        r, c = rows[s:s + _SDDMM_CHUNK], cols[s:s + _SDDMM_CHUNK]
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
    acc = _acc_dtype(a.dtype)
    n_rows = a.shape[1]
    if a.device.type not in ("cpu", "cuda"):
        return _sampled_gather(a, b, indices // n_cols, indices % n_cols)
    # Row pointers by binary search on the flat indices: O(rows · log k), no division over k.
    bounds = torch.arange(n_rows + 1, device=indices.device, dtype=indices.dtype) * n_cols
    crow = torch.searchsorted(indices, bounds)
    mask = torch.sparse_csr_tensor(crow, indices % n_cols, torch.zeros(indices.numel(), dtype=acc, device=a.device),
                                   (n_rows, n_cols), check_invariants=False)
    return torch.sparse.sampled_addmm(mask, a.t().to(acc), b.to(acc), beta=0.0).values()


def sampled_weight_grad(x2d: torch.Tensor, dy2d: torch.Tensor, indices: torch.Tensor, *,
                        shape: tuple[int, int], transposed: bool) -> torch.Tensor:
    """Entries of the weight gradient at the flat ``indices`` of a weight stored with ``shape``.

    Linear stores (out, in) and ``dW = dYᵀ X``; Conv1D stores (in, out) and ``dW = Xᵀ dY``.
    """
    n_cols = shape[1]
    if transposed:
        return sampled_matmul_t(x2d, dy2d, indices, n_cols)
    return sampled_matmul_t(dy2d, x2d, indices, n_cols)


class SpraFunction(torch.autograd.Function):
    """``y = x @ W_mergedᵀ + b`` (Linear) or ``x @ W_merged + b`` (Conv1D), gradient only for the values."""

    @staticmethod
    def forward(ctx, x, weight, bias, values, indices, transposed: bool):
        with torch.no_grad(), _MergedWeight(weight, indices, values):
            y = _plain_linear(x, weight, bias, transposed)
        # Only the activation goes through save_for_backward (so checkpointing and offloading hooks see
        # it); parameters and the mask stay on ctx, which also spares the weight a version check that a
        # second call of a shared module would trip.
        ctx.save_for_backward(x)
        ctx.weight, ctx.values, ctx.indices, ctx.transposed = weight, values, indices, transposed
        return y

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        weight, values, indices, transposed = ctx.weight, ctx.values, ctx.indices, ctx.transposed
        dy2d = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_bias = grad_values = None
        if ctx.needs_input_grad[0]:
            with torch.no_grad(), _MergedWeight(weight, indices, values):
                # dX = dY @ W for Linear's (out, in) weight, dY @ Wᵀ for Conv1D's (in, out)
                grad_x = (dy2d @ (weight.t() if transposed else weight)).reshape(x.shape)
        if ctx.needs_input_grad[2]:
            grad_bias = dy2d.sum(0)
        if ctx.needs_input_grad[3]:
            x2d = x.reshape(-1, x.shape[-1])
            grad_values = sampled_weight_grad(x2d, dy2d, indices, shape=tuple(weight.shape),
                                              transposed=transposed).to(values.dtype)
        return grad_x, None, grad_bias, grad_values, None, None


def _plain_linear(x, weight, bias, transposed: bool):
    if not transposed:
        return F.linear(x, weight, bias)
    y = x.reshape(-1, x.shape[-1]) @ weight
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], weight.shape[-1])


class SpraLinear(nn.Module):
    """A frozen ``nn.Linear`` / ``Conv1D`` with ``k`` trainable entries (``spra_values``) of a sparse delta.

    ``spra_values[j]`` is the delta at the j-th smallest flat index of ``weight`` in its stored layout;
    the indices are ``sample_indices(seed, f"{name}.weight", weight.numel(), k)``.
    """

    def __init__(self, base: nn.Module, *, name: str, k: int, seed: int):
        super().__init__()
        if not isinstance(base, nn.Linear) and not is_conv1d(base):
            raise TypeError(f"SpraLinear wraps nn.Linear or Conv1D, got {type(base).__name__}")
        self.transposed = is_conv1d(base)
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        # Kept because ZeRO-3 replaces a partitioned weight's data with an empty tensor between uses.
        self.weight_shape = tuple(self.weight.shape)
        n_rows, n_cols = self.weight_shape
        self.in_features, self.out_features = (n_rows, n_cols) if self.transposed else (n_cols, n_rows)
        self.spra_key, self.k, self.seed = f"{name}.weight", int(k), int(seed)
        self.merged = False
        self.spra_values = nn.Parameter(torch.zeros(self.k, dtype=self.weight.dtype, device=self.weight.device))
        self.register_buffer("spra_indices", torch.empty(0, dtype=torch.long), persistent=False)
        self.register_buffer("_spra_originals", None, persistent=False)
        self.rebuild_indices()

    def mask(self) -> torch.Tensor:
        """The sorted flat indices on the CPU, rebuilt from the seed (also while the module is on meta)."""
        return sample_indices(self.seed, self.spra_key, self.weight_shape[0] * self.weight_shape[1], self.k)

    def rebuild_indices(self) -> None:
        """Recompute the mask from the seed (after ``to_empty`` or on a new device)."""
        device = self.weight.device
        self.spra_indices = self.mask().to("meta" if device.type == "meta" else device)

    @torch.no_grad()
    def reset_spra_parameters(self) -> None:
        """Zero delta and a fresh mask: the state right after ``apply_spra``, for a model built on meta."""
        self.rebuild_indices()
        self.spra_values.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return _plain_linear(x, self.weight, self.bias, self.transposed)
        return SpraFunction.apply(x, self.weight, self.bias, self.spra_values, self.spra_indices, self.transposed)

    def get_delta_weight(self) -> torch.Tensor:
        """The dense delta (for inspection and tests; training never builds it)."""
        delta = torch.zeros(self.weight.numel(), dtype=self.spra_values.dtype, device=self.weight.device)
        delta[self.spra_indices] = self.spra_values.detach()
        return delta.view_as(self.weight)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the delta into ``weight``; ``unmerge`` restores the original entries exactly."""
        if self.merged:
            return
        self._spra_originals = self.weight.view(-1)[self.spra_indices].clone()
        merged = merged_entries(self._spra_originals, self.spra_values)
        self.weight.view(-1).index_copy_(0, self.spra_indices, merged)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        self.weight.view(-1).index_copy_(0, self.spra_indices, self._spra_originals)
        self._spra_originals = None
        self.merged = False

    def to_plain(self) -> nn.Module:
        """A plain ``nn.Linear`` / ``Conv1D`` sharing this module's (merged) weight and bias."""
        self.merge()
        with torch.device("meta"):  # the new module's own weight is replaced at once: don't allocate it
            if self.transposed:
                plain = Conv1D(self.out_features, self.in_features)
            else:
                plain = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        plain.weight = self.weight
        plain.bias = self.bias
        return plain

    def extra_repr(self) -> str:
        kind = "Conv1D" if self.transposed else "Linear"
        return f"{kind}(in={self.in_features}, out={self.out_features}), k={self.k}, merged={self.merged}"
