"""The one object SpaRA keeps on a model: its adapters, which one is active, and the base's own dense tensors.

``apply_spra`` attaches an :class:`AdapterRegistry` with one adapter, ``default``; ``load_adapter`` and
``spra_dist.adapters.named`` add, switch, combine and delete adapters through it; ``merge_adapter`` detaches it.
Every other module reads it through :func:`find_registry` / :func:`spra_config`, never through an attribute of
its own.

The active adapter's values are the modules' own ``spra_values`` parameters, and the registry holds no
reference to them: an engine that replaces parameters (FSDP2 makes them DTensors, ZeRO-3 partitions them)
leaves nothing stale behind, and a copy of the model (``copy.deepcopy``) carries the registry along.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from spra_dist.core.config import SpraConfig
from spra_dist.core.layer import Parts

DEFAULT_NAME = "default"
_ATTRIBUTE = "_spra_registry"  # a plain attribute: not a module, not in the state dict


@dataclass
class NamedAdapter:
    """One adapter. While it is inactive, ``layers`` holds ``(parts, values)`` per adapted module and ``dense`` a
    tensor per densely trained parameter; while it is active both are held by the model itself (the modules'
    ``spra_values`` and the parameters), ``layers`` is empty and ``dense`` maps each name to ``None``."""

    config: SpraConfig
    layers: dict[str, tuple[Parts, nn.Parameter]] = field(default_factory=dict)
    dense: dict[str, torch.Tensor | None] = field(default_factory=dict)
    source: str | None = None
    combination: dict[str, float] | None = None


@dataclass
class AdapterRegistry:
    adapters: dict[str, NamedAdapter]
    active: str | None
    base_dense: dict[str, torch.Tensor | None] = field(default_factory=dict)
    """The base's own tensors of parameters some adapter trains densely; ``None``: trained in place, not kept."""

    @property
    def config(self) -> SpraConfig | None:
        """The active adapter's config (``None`` while the model runs as its base)."""
        return self.adapters[self.active].config if self.active is not None else None


def find_registry(model: nn.Module) -> AdapterRegistry | None:
    """The registry of an unwrapped model, or ``None`` when SpaRA was never applied to it."""
    return model.__dict__.get(_ATTRIBUTE)


def attach_registry(model: nn.Module, registry: AdapterRegistry) -> None:
    model.__dict__[_ATTRIBUTE] = registry
    if getattr(model, "hf_quantizer", None) is not None:
        # transformers' Trainer (and TRL's) refuses a quantized model unless trainable adapters are attached, which
        # it learns from this flag (PEFT's add_adapter sets it): the k values are such adapters. Save with
        # save_adapter: the flag sends the model's own save_pretrained down PEFT's path.
        model._hf_peft_config_loaded = True


def detach_registry(model: nn.Module) -> None:
    model.__dict__.pop(_ATTRIBUTE, None)


def spra_config(model: nn.Module) -> SpraConfig | None:
    """The active adapter's resolved config (its seed set), or ``None`` when no adapter is active."""
    registry = find_registry(model)
    return registry.config if registry is not None else None
