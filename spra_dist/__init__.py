"""spra_dist: Sparse Random Parameter Adaptation (SpaRA) that scales out on FSDP2, DeepSpeed ZeRO and accelerate.

    from spra_dist import SpraConfig, apply_spra, save_adapter, load_adapter, merge_adapter
    model = apply_spra(model, SpraConfig(target_modules="all-linear", lora_rank=8, seed=1234))

The package, by concern: ``core`` (the method: config, masks, layer, model, kernels), ``adapters`` (files, named
adapters, base checks, merge and export), ``distributed`` (process group, engines, FSDP2, faults), ``data``,
``train`` (the recipe), ``integrations`` (HF Trainer, TRL), ``cli`` and ``demos`` (packaged models and data).
"""

from spra_dist import _compat
from spra_dist.adapters.files import load_adapter, save_adapter
from spra_dist.adapters.merge import merge_adapter
from spra_dist.adapters.named import (
    active_adapter,
    combine_adapters,
    delete_adapter,
    disable_adapter,
    list_adapters,
    set_adapter,
)
from spra_dist.core.config import SpraConfig
from spra_dist.core.layer import SpraLinear
from spra_dist.core.masks import MASK_VERSION, sample_indices
from spra_dist.core.model import apply_spra, quantize_targets, spra_modules, trainable_parameters

__version__ = "0.1.0"
__all__ = [
    "MASK_VERSION", "SpraConfig", "SpraLinear", "active_adapter", "apply_spra", "combine_adapters", "delete_adapter",
    "disable_adapter", "list_adapters", "load_adapter", "merge_adapter", "quantize_targets", "sample_indices",
    "save_adapter", "set_adapter", "spra_modules", "trainable_parameters",
]

_compat.install()
