"""Inject SpaRA into a model: pick the target linears, swap each for a SpraLinear, freeze the rest.

Apply this to the plain, unwrapped model (meta device allowed) before any engine touches it: mask keys
are the module names of the unwrapped model.
"""

from __future__ import annotations

import dataclasses
import re

import torch
import torch.distributed as dist
from torch import nn

from spra_dist.core.config import SpraConfig
from spra_dist.core.layer import SpraLinear, build_masks, is_conv1d
from spra_dist.core.masks import budget
from spra_dist.core.quantized import check_quantizable, compute_dtype, logical_shape, release_freed_heap, to_nf4
from spra_dist.core.registry import DEFAULT_NAME, AdapterRegistry, NamedAdapter, attach_registry
from spra_dist.distributed.agreement import agree_seed, check_masks


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def _output_head_names(model: nn.Module) -> set[str]:
    """Names of the output head (``lm_head``), which ``all-linear`` excludes as PEFT does."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return {name for name, m in model.named_modules() if head is not None and m is head}


def _matches(name: str, pattern: str) -> bool:
    if name == pattern or name.endswith("." + pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def _under(name: str, patterns: list[str]) -> bool:
    """``name`` is, or sits inside, a module matching one of ``patterns``."""
    parts = name.split(".")
    prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(_matches(prefix, p) for prefix in prefixes for p in patterns)


def select_targets(model: nn.Module, cfg: SpraConfig) -> list[str]:
    """Names of the modules to adapt; ``ValueError`` when nothing or something unsupported matches."""
    excluded = _output_head_names(model)
    names = []
    for name, module in model.named_modules():
        if not name or _under(name, cfg.trainable_modules):
            continue
        if cfg.target_modules == "all-linear":
            if _is_linear(module) and name not in excluded:
                names.append(name)
            continue
        if any(_matches(name, t) for t in cfg.target_modules):
            if not _is_linear(module):
                raise ValueError(
                    f"target_modules matched {name!r}, a {type(module).__name__}; only nn.Linear and Conv1D "
                    f"can be adapted: name the linear layers inside it instead"
                )
            names.append(name)
    if not names:
        raise ValueError(
            f"target_modules={cfg.target_modules!r} matched no linear layer of {type(model).__name__}; "
            f"use 'all-linear' or suffixes of names such as {_example_linear_names(model)}"
        )
    return names


def _example_linear_names(model: nn.Module) -> list[str]:
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if _is_linear(m)})[:8]


def check_targets(model: nn.Module, cfg: SpraConfig, *, quantize_base: str = "none") -> None:
    """The errors ``apply_spra(model, cfg)`` (and ``quantize_targets(model, quantize_base)`` after it) would raise
    for the config and its module names, without changing the model: for callers that must fail before they
    write anything."""
    cfg.validate()
    check_quantizable({name: model.get_submodule(name) for name in select_targets(model, cfg)}, quantize_base)
    _dense_module_names(model, cfg.trainable_modules)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def apply_spra(model: nn.Module, cfg: SpraConfig, *, group: dist.ProcessGroup | None = None) -> nn.Module:
    """Adapt ``model`` in place and return it: target linears become SpraLinear, everything else is frozen
    except ``cfg.trainable_modules``. The resolved config (seed set) is the active adapter's, ``default``
    (``spra_dist.core.registry.spra_config(model)``).

    Under torch.distributed, call it on every rank of ``group`` (default: the world): rank 0's seed is
    broadcast (drawn there when ``cfg.seed`` is None) and the ranks' mask fingerprints are compared.
    """
    if any(isinstance(m, SpraLinear) for m in model.modules()):
        raise ValueError("this model already has SpaRA applied; use a fresh base model or load_adapter")
    cfg.validate()
    requested = cfg
    cfg = dataclasses.replace(cfg, seed=agree_seed(cfg.seed, group=group),
                              trainable_modules=list(cfg.trainable_modules))
    targets = select_targets(model, cfg)
    dense = _dense_module_names(model, cfg.trainable_modules)
    for p in model.parameters():
        p.requires_grad_(False)
    bases = [model.get_submodule(name) for name in targets]
    shapes = [logical_shape(base.weight) for base in bases]
    ks = [budget(shape, lora_rank=cfg.lora_rank, density=cfg.density) for shape in shapes]
    masks = build_masks([(f"{n}.weight", s, ((cfg.seed, k),)) for n, s, k in zip(targets, shapes, ks, strict=True)])
    for name, base, k, mask in zip(targets, bases, ks, masks, strict=True):
        replace_module(model, name, SpraLinear(base, name=name, k=k, seed=cfg.seed, mask=mask,
                                               value_dtype=cfg.values_dtype_for(compute_dtype(base.weight)),
                                               mask_residency=cfg.mask_residency))
    for name in dense:
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(True)
    trained = {n: None for n in dense_parameter_names(model)}
    attach_registry(model, AdapterRegistry(adapters={DEFAULT_NAME: NamedAdapter(config=cfg, dense=dict(trained))},
                                           active=DEFAULT_NAME, base_dense=dict(trained)))
    entries = [(m.spra_key, m.weight_shape, m.spra_indices) for _, m in spra_modules(model)]
    check_masks(entries, config=requested.adapter_dict(), group=group)
    return model


@torch.no_grad()
def quantize_targets(model: nn.Module, kind: str) -> int:
    """Pack the frozen weight of every SpraLinear of ``model`` in ``kind`` (``nf4``); the rest (embeddings,
    norms, the output head, linears left out of the targets) stays in its dtype. On the meta device it gives the
    packed shapes, which ``spra_dist.distributed.loading`` fills. Returns the number of matrices packed."""
    layers = {m.spra_key: m for m in model.modules() if isinstance(m, SpraLinear)}
    check_quantizable(layers, kind)
    if kind == "none":
        return 0
    for m in layers.values():
        m.weight = nn.Parameter(to_nf4(m.weight), requires_grad=False)
    release_freed_heap()  # packing frees about 4x the packed bytes in small temporaries, which glibc would keep
    return len(layers)


def _dense_module_names(model: nn.Module, patterns: list[str]) -> list[str]:
    names = [n for n, _ in model.named_modules() if n and any(_matches(n, p) for p in patterns)]
    missing = [p for p in patterns if not any(_matches(n, p) for n in names)]
    if missing:
        raise ValueError(
            f"trainable_modules {missing} matched no module of {type(model).__name__}; "
            f"top-level modules are {[n for n, _ in model.named_children()]}"
        )
    return [n for n in names if not any(n.startswith(o + ".") for o in names)]  # outermost only


def spra_modules(model: nn.Module) -> list[tuple[str, SpraLinear]]:
    """``(name, module)`` for every SpraLinear of the active adapter, names as in the unwrapped model."""
    return [(name, m) for name, m in spra_layers(model) if m.active]


def spra_layers(model: nn.Module) -> list[tuple[str, SpraLinear]]:
    """``(name, module)`` for every SpraLinear, also those no active adapter uses (see ``spra_dist.adapters.named``)."""
    return [(m.spra_key[: -len(".weight")], m) for m in model.modules() if isinstance(m, SpraLinear)]


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def dense_parameter_names(model: nn.Module) -> list[str]:
    """Trainable parameters that are not SpaRA values (the densely trained ``trainable_modules``)."""
    return [n for n, _ in trainable_parameters(model) if not n.endswith("spra_values")]


def reset_spra_parameters(model: nn.Module) -> None:
    """After a model built on the meta device is materialised (``to_empty``, then the base weights loaded):
    zero every delta (the masks live outside the parameters: ``to_empty`` leaves them). Works on FSDP2-sharded
    modules too.

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        apply_spra(model, cfg); apply_fsdp2(model)
        model.to_empty(device="cuda"); <load base weights>; reset_spra_parameters(model)
    """
    for _, m in spra_modules(model):
        m.reset_spra_parameters()
