"""SpraLinear: a frozen linear layer plus ``k`` trainable entries of a sparse delta.

Forward computes ``x @ (W + scatter(values))ᵀ + b`` by writing the ``k`` merged entries into the frozen
weight, running the ordinary matmul and writing the ``k`` saved originals back: no clone of the weight, no
dense delta, and the frozen weight is restored bit for bit (no add-then-subtract drift in bf16).

Backward gives the input gradient through the merged weight, and the values' gradient as the sampled
product ``Σ_tokens dY[:, row] · X[:, col]`` at the ``k`` positions (SDDMM) — never a dense ``dW``. The kernels
live in ``spra_dist.core.kernels`` (custom ops, so ``torch.autocast`` and ``torch.compile`` treat the layer like
``nn.Linear``); the module calls one function, ``spra_linear``.

The module keeps the base layer's ``weight`` and ``bias`` names, so base checkpoints load unchanged and every
engine's hooks (FSDP2, ZeRO-3) see and gather the module's own parameters. The mask (``spra_indices``, sorted
flat indices, and ``spra_crow``, their CSR row pointers) is neither a parameter nor a buffer: it is rebuilt from
the seed, never saved, never sent, and held in int32 for any matrix of fewer than 2³¹ entries (``index_dtype``),
4 bytes a value. It is the one per-value state that sharding cannot divide, so where it lives is a setting
(``SpraConfig.mask_residency``): ``host`` (default) keeps it in host memory and each op copies the one matrix's
mask it needs to the weight's device, so an accelerator holds one layer's mask at a time; ``device`` keeps it on
the weight's device, whole (no copy per use; the whole model's mask on every GPU). On a CPU the two are the same.

A module holds one adapter at a time (``spra_dist.adapters.named`` keeps the others' values and switches them in):
its mask is the union of one or more seeded parts ``(seed, k)`` — one for a trained adapter, several for a
combination of adapters — and ``spra_values`` is ``None`` while no adapter is active, when the module runs as
the plain base layer.
"""

from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

from spra_dist.core.kernels import index_dtype, merged_entries, plain_linear, put, row_pointers, spra_linear
from spra_dist.core.masks import host_threads, sample_indices
from spra_dist.core.quantized import (
    compute_dtype,
    logical_shape,
    merged_dense,
    quantization_of,
    quantized_spra_linear,
)

Parts = tuple[tuple[int, int], ...]
MASK_RESIDENCIES = ("host", "device")

try:  # GPT-2 style layers keep their weight as (in, out)
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency
    Conv1D = None

# torch warns once that CSR tensors are "beta"; we only build one and call sampled_addmm on it, both pinned by
# tests against a dense float64 reference, so the warning would only alarm users.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)


def union_mask(key: str, shape: tuple[int, int], parts: Parts) -> torch.Tensor:
    """Sorted flat indices: the union of the seeded masks ``sample_indices(seed, key, numel, k)`` of ``parts``."""
    numel = shape[0] * shape[1]
    masks = [sample_indices(seed, key, numel, k) for seed, k in parts]
    if len(masks) == 1:
        return masks[0]
    return torch.unique(torch.cat(masks)) if masks else torch.empty(0, dtype=torch.long)


def mask_buffers(key: str, shape: tuple[int, int], parts: Parts) -> tuple[torch.Tensor, torch.Tensor]:
    """What a layer keeps of its mask, on the CPU: the sorted flat indices in ``index_dtype`` (int32 below 2³¹
    entries) and their CSR row pointers (``shape[0] + 1`` of them)."""
    mask = union_mask(key, shape, parts).to(index_dtype(shape[0] * shape[1]))
    return mask, row_pointers(mask, *shape)


def build_masks(requests: list[tuple[str, tuple[int, int], Parts]], *,
                threads: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``mask_buffers`` for every ``(key, shape, parts)``, in order, on ``threads`` threads (default: this rank's
    share of the node's CPUs, ``host_threads``). numpy's hashing and sorting release the GIL, so the masks build in
    parallel."""
    threads = threads or host_threads()
    if threads <= 1 or len(requests) <= 1:
        return [mask_buffers(*r) for r in requests]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(lambda r: mask_buffers(*r), requests))


def is_conv1d(module: nn.Module) -> bool:
    return Conv1D is not None and isinstance(module, Conv1D)


class SpraLinear(nn.Module):
    """A frozen ``nn.Linear`` / ``Conv1D`` with ``k`` trainable entries (``spra_values``) of a sparse delta.

    ``spra_values[j]`` is the delta at the j-th smallest flat index of ``weight`` in its stored layout;
    the indices are ``sample_indices(seed, f"{name}.weight", weight.numel(), k)``. ``mask``: those indices and
    their row pointers as ``mask_buffers`` returns them, when the caller built them already (``apply_spra`` builds
    all masks in parallel).
    """

    def __init__(self, base: nn.Module, *, name: str, k: int, seed: int, value_dtype: torch.dtype | None = None,
                 mask_residency: str = "host", mask: tuple[torch.Tensor, torch.Tensor] | None = None):
        super().__init__()
        if not isinstance(base, nn.Linear) and not is_conv1d(base):
            raise TypeError(f"SpraLinear wraps nn.Linear or Conv1D, got {type(base).__name__}")
        if quantization_of(base.weight) == "bnb-int8":
            raise ValueError(f"{name} is a bitsandbytes 8-bit weight, which SpaRA does not read; load the base in "
                             f"4-bit (BitsAndBytesConfig(load_in_4bit=True)) or unquantized with quantize_base=nf4")
        self.transposed = is_conv1d(base)
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        # Kept because ZeRO-3 replaces a partitioned weight's data with an empty tensor between uses (and a
        # bitsandbytes 4-bit weight is stored as a packed column).
        self.weight_shape = logical_shape(self.weight)
        n_rows, n_cols = self.weight_shape
        self.in_features, self.out_features = (n_rows, n_cols) if self.transposed else (n_cols, n_rows)
        self.spra_key, self.k, self.seed = f"{name}.weight", int(k), int(seed)
        self.mask_parts: Parts = ((self.seed, self.k),) if self.k else ()
        self.merged = False
        self.bypassed = False  # the base layer alone for a while (a reference forward), values and mask kept
        if mask_residency not in MASK_RESIDENCIES:
            raise ValueError(f"mask_residency={mask_residency!r}: use one of {MASK_RESIDENCIES}")
        self.mask_residency = mask_residency
        # value_dtype: fp32 master values on a bf16 / fp16 weight (the merged forward adds in fp32, rounds once)
        self.spra_values = nn.Parameter(torch.zeros(self.k, dtype=value_dtype or self.weight.dtype,
                                                    device=self.weight.device))
        self.register_buffer("_spra_originals", None, persistent=False)
        # Plain attributes, not buffers: module.to(), FSDP2, DeepSpeed and DDP's buffer broadcast leave them alone.
        self.spra_indices, self.spra_crow = mask if mask is not None else mask_buffers(self.spra_key, self.weight_shape,
                                                                                        self.mask_parts)
        self._place_mask()

    def mask(self) -> torch.Tensor:
        """The sorted flat indices (int64, on the CPU), rebuilt from the seed."""
        return union_mask(self.spra_key, self.weight_shape, self.mask_parts)

    @property
    def active(self) -> bool:
        """An adapter is switched in (otherwise the module is the plain base layer)."""
        return self.spra_values is not None

    def set_adapter_state(self, values: nn.Parameter | None, parts: Parts) -> None:
        """Switch in ``values`` on the mask of ``parts`` (``None``, ``()``: no adapter). Never touches ``weight``:
        call it on an unmerged module."""
        assert not self.merged, "unmerge before switching adapters"
        self.spra_values = values
        self.mask_parts = tuple((int(s), int(k)) for s, k in parts)
        if values is None:
            self.k, self.seed = 0, None
            empty = torch.empty(0, dtype=self.spra_indices.dtype)
            self.spra_indices, self.spra_crow = empty, empty
            return
        self.seed = self.mask_parts[0][0]
        self.rebuild_indices()
        self.k = self.spra_indices.numel()
        assert values.numel() == self.k, f"{self.spra_key}: {values.numel()} values for a mask of {self.k}"

    def rebuild_indices(self) -> None:
        """Recompute the mask from the seed."""
        self.spra_indices, self.spra_crow = mask_buffers(self.spra_key, self.weight_shape, self.mask_parts)
        self._place_mask()

    def _place_mask(self) -> None:
        """Host residency: page-locked host memory when CUDA is present (so the per-use copy is asynchronous);
        device residency: the weight's device (meta stays on the host: a meta mask would be lost)."""
        if self.mask_residency == "host":
            if torch.cuda.is_available() and not self.spra_indices.is_pinned():
                self.spra_indices, self.spra_crow = self.spra_indices.pin_memory(), self.spra_crow.pin_memory()
        else:
            self._mask_on(self.weight.device)

    def _mask_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The mask for an op on ``device``: the host copy under host residency (each op copies what it needs),
        moved there once and kept under device residency."""
        if self.mask_residency == "device" and device.type != "meta" and self.spra_indices.device != device:
            self.spra_indices, self.spra_crow = self.spra_indices.to(device), self.spra_crow.to(device)
        return self.spra_indices, self.spra_crow

    def mask_bytes(self) -> dict[str, int]:
        """Bytes of this matrix's mask: ``device`` kept on the accelerator, ``host`` kept in host memory, and
        ``transient``, brought to the device for one op and freed after it (host residency)."""
        size = self.spra_indices.nbytes + self.spra_crow.nbytes
        if self.mask_residency == "device":
            return {"device": size, "host": 0, "transient": 0}
        return {"device": 0, "host": size, "transient": size}

    @torch.no_grad()
    def reset_spra_parameters(self) -> None:
        """Zero delta: the state right after ``apply_spra``, for a model built on meta and materialised. The mask
        lives outside the parameters, so ``to_empty`` left it intact."""
        self.spra_values.zero_()

    @property
    def quantization(self) -> str | None:
        """How the frozen weight is stored: None (dense), ``nf4`` (torchao), ``bnb-nf4`` / ``bnb-fp4``
        (bitsandbytes 4-bit); see ``spra_dist.core.quantized``."""
        return quantization_of(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        quantized = self.quantization is not None
        if self.merged or self.spra_values is None or self.bypassed:
            if quantized:
                return quantized_spra_linear(x, self.weight, self.bias, None, None)
            return plain_linear(x, self.weight, self.bias, transposed=self.transposed)
        indices, crow = self._mask_on(self.weight.device)
        if quantized:
            return quantized_spra_linear(x, self.weight, self.bias, self.spra_values, indices, crow=crow)
        return spra_linear(x, self.weight, self.bias, self.spra_values, indices, transposed=self.transposed, crow=crow)

    def get_delta_weight(self) -> torch.Tensor:
        """The dense delta (for inspection and tests; training never builds it)."""
        dtype = compute_dtype(self.weight) if self.spra_values is None else self.spra_values.dtype
        delta = torch.zeros(self.weight_shape[0] * self.weight_shape[1], dtype=dtype, device=self.weight.device)
        if self.spra_values is not None:
            delta[self.spra_indices.to(delta.device)] = self.spra_values.detach()
        return delta.view(self.weight_shape)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the delta into ``weight``; ``unmerge`` restores the original entries exactly."""
        if self.merged or self.spra_values is None:
            return
        if self.quantization is not None:
            raise ValueError(f"{self.spra_key} is held in {self.quantization}, which is never written: merge the "
                             f"adapter with merge_adapter(model) (or spra merge), which writes dequant(W) + delta "
                             f"in the compute dtype")
        indices = self.spra_indices.to(self.weight.device)
        self._spra_originals = self.weight.view(-1).index_select(0, indices)
        put(self.weight.view(-1), indices, merged_entries(self._spra_originals, self.spra_values))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        put(self.weight.view(-1), self.spra_indices.to(self.weight.device), self._spra_originals)
        self._spra_originals = None
        self.merged = False

    def to_plain(self) -> nn.Module:
        """A plain ``nn.Linear`` / ``Conv1D`` sharing this module's (merged) weight and bias. Over a quantized
        weight: a dense one holding dequant(W) + delta, added in fp32 and rounded once to the compute dtype
        (never requantized)."""
        if self.quantization is not None:
            self._densify()
        self.merge()
        with torch.device("meta"):  # the new module's own weight is replaced at once: don't allocate it
            if self.transposed:
                plain = Conv1D(self.out_features, self.in_features)
            else:
                plain = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        plain.weight = self.weight
        plain.bias = self.bias
        return plain

    @torch.no_grad()
    def _densify(self) -> None:
        """Replace the packed weight with dequant(W) + delta (the adapter folded in; no adapter stays active)."""
        values = self.spra_values if self.active else None
        indices = self.spra_indices.to(self.weight.device)
        dense = merged_dense(self.weight, indices, values, torch.float32).to(compute_dtype(self.weight))
        self.weight = nn.Parameter(dense, requires_grad=False)
        self.spra_values = None

    def extra_repr(self) -> str:
        kind = "Conv1D" if self.transposed else "Linear"
        state = f"k={self.k}, merged={self.merged}" if self.active else "no adapter active"
        return f"{kind}(in={self.in_features}, out={self.out_features}), {state}"
