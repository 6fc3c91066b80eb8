"""The adapted layer's kernels: the merged-weight matmul, the input gradient and the values' sampled gradient.

``spra_linear`` is the one entry point (``SpraLinear.forward`` calls it); it dispatches to ``torch.library``
custom ops (``spra_dist::linear``, ``spra_dist::input_grad``, ``spra_dist::values_grad``) so that eager mode,
``torch.autocast`` and ``torch.compile`` all see the same opaque, differentiable op.
"""

from spra_dist.core.kernels.entries import MergedWeight, merged_entries, put
from spra_dist.core.kernels.ops import plain_linear, spra_linear
from spra_dist.core.kernels.sddmm import (
           column_indices,
           csr_structure,
           index_dtype,
           row_pointers,
           sampled_gather,
           sampled_matmul_t,
           sampled_weight_grad,
)

__all__ = ["MergedWeight", "column_indices", "csr_structure", "index_dtype", "merged_entries", "plain_linear", "put",
           "row_pointers", "sampled_gather", "sampled_matmul_t", "sampled_weight_grad", "spra_linear"]
