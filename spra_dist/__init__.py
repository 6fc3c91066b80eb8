"""spra_dist: Sparse Random Parameter Adaptation (SpaRA) that scales out on FSDP2, DeepSpeed ZeRO and accelerate.

    from spra_dist import SpraConfig, apply_spra, save_adapter, load_adapter, merge_adapter
    model = apply_spra(model, SpraConfig(target_modules="all-linear", lora_rank=8, seed=1234))
"""

from spra_dist.adapter import load_adapter, merge_adapter, save_adapter
from spra_dist.adapters import (
    active_adapter,
    combine_adapters,
    delete_adapter,
    disable_adapter,
    list_adapters,
    set_adapter,
)
from spra_dist.config import SpraConfig
from spra_dist.layer import SpraLinear
from spra_dist.masks import MASK_VERSION, sample_indices
from spra_dist.model import apply_spra, spra_modules, trainable_parameters

__version__ = "0.1.0"
__all__ = [
    "MASK_VERSION", "SpraConfig", "SpraLinear", "active_adapter", "apply_spra", "combine_adapters", "delete_adapter",
    "disable_adapter", "list_adapters", "load_adapter", "merge_adapter", "sample_indices", "save_adapter",
    "set_adapter", "spra_modules", "trainable_parameters",
]
