"""Several named adapters on one base model, managed the way PEFT users manage theirs.

    load_adapter(model, "runs/sst/adapter", adapter_name="sst")     # spra_dist.adapters.files: adds, by name
    load_adapter(model, "runs/news/adapter", adapter_name="news")
    set_adapter(model, "sst")                       # switch: the next forward runs base + sst
    with disable_adapter(model):                    # the base model, bit for bit
        ...
    combine_adapters(model, {"sst": 0.5, "news": 0.5}, name="mix")   # W + 0.5 Δ_sst + 0.5 Δ_news
    save_adapter(model, "runs/mix", adapter_name="mix")
    delete_adapter(model, "news")                   # its values are freed

How they are held. Each adapter keeps, per adapted module, its mask *parts* (``(seed, k)`` pairs: one for a trained
adapter, several for a combination) and its values as an ``nn.Parameter``. The active adapter's Parameters *are*
the modules' ``spra_values``, so training, saving and every engine see an ordinary single-adapter model; an
inactive adapter costs its k values and nothing else: its indices are rebuilt from the seeds when it is switched
in. Switching rewrites no frozen weight (a merged model is unmerged and merged again). Densely trained modules
(``trainable_modules``, e.g. a classifier head) hold the active adapter's tensors; the others', and the base's,
are kept aside and copied in on a switch.

A combination is the weighted sum of sparse deltas on the union of their masks, exact whether or not the masks
overlap (differently seeded masks barely do). The union is a pure function of the parts, so a saved combination
still carries no indices: its ``adapter_config.json`` lists each layer's parts.

Named adapters are switched on an unsharded model (before FSDP2 / ZeRO-3, or for inference); loading values into
the active adapter of a sharded model is ``load_adapter(model, path)`` without a name.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import torch
from torch import nn

from spra_dist.core.layer import Parts, SpraLinear, union_mask
from spra_dist.core.model import replace_module, spra_layers
from spra_dist.core.registry import AdapterRegistry, NamedAdapter, attach_registry, find_registry
from spra_dist.distributed.tensors import is_sharded, unwrap


def registry(model: nn.Module, *, create: bool = False) -> AdapterRegistry:
    """The model's adapters. A plain model (SpaRA never applied, or merged away) has none: an empty registry,
    attached to it only with ``create`` (when an adapter is about to be added)."""
    model = unwrap(model)
    reg = find_registry(model)
    if reg is None:
        reg = AdapterRegistry(adapters={}, active=None)
        if create:
            attach_registry(model, reg)
    return reg


def adapter_layers(model: nn.Module, name: str) -> dict[str, tuple[Parts, nn.Parameter]]:
    """``(parts, values)`` per module of adapter ``name``: the modules' own while it is active."""
    reg = registry(model)
    if name == reg.active:
        return {layer: (m.mask_parts, m.spra_values) for layer, m in spra_layers(unwrap(model)) if m.active}
    return reg.adapters[name].layers


def list_adapters(model: nn.Module) -> list[str]:
    return list(registry(model).adapters)


def active_adapter(model: nn.Module) -> str | None:
    return registry(model).active


def rename_active(model: nn.Module, name: str) -> None:
    """Give the active adapter ``name`` (``load_adapter(..., adapter_name=)`` on a plain model)."""
    reg = registry(model)
    if reg.active is not None and reg.active != name:
        reg.adapters[name] = reg.adapters.pop(reg.active)
        reg.active = name


def add_adapter(model: nn.Module, name: str, adapter: NamedAdapter) -> None:
    """Register ``adapter`` under ``name``, wrapping the linears it adapts that are still plain; not activated
    unless no adapter is active."""
    model = _unsharded(model, "add an adapter to")
    reg = registry(model, create=True)
    _check_name(reg, name)
    for layer in adapter.layers:
        module = model.get_submodule(layer)
        if not isinstance(module, SpraLinear):
            off = SpraLinear(module, name=layer, k=0, seed=0)  # runs as the base layer until switched in
            off.set_adapter_state(None, ())
            replace_module(model, layer, off)
    params = dict(model.named_parameters())
    trained_now = reg.adapters[reg.active].dense if reg.active else {}
    for n in adapter.dense:
        if n not in reg.base_dense:  # the model holds the base's own tensor unless the active adapter trains it
            reg.base_dense[n] = None if n in trained_now else params[n].detach().clone()
    reg.adapters[name] = adapter
    if reg.active is None:
        set_adapter(model, name)


def set_adapter(model: nn.Module, name: str | None) -> None:
    """Make ``name`` the active adapter (``None``: none, the plain base). Other adapters are kept."""
    model = _unsharded(model, "switch adapters on")
    reg = registry(model)
    if name is not None and name not in reg.adapters:
        raise ValueError(f"no adapter named {name!r}; this model has {list(reg.adapters)}: load it with "
                         f"load_adapter(model, path, adapter_name={name!r})")
    if name == reg.active:
        return
    old = reg.adapters.get(reg.active) if reg.active else None
    new = reg.adapters[name] if name else None
    params = dict(model.named_parameters())
    _check_dense_available(reg, old, new)
    if old is not None:  # the modules hand its values back to the registry
        old.layers = adapter_layers(model, reg.active)
    merged = [m for _, m in spra_layers(model) if m.merged]
    for m in merged:
        m.unmerge()
    with torch.no_grad():
        for n in sorted(set(old.dense if old else ()) | set(new.dense if new else ())):
            p = params[n]
            if old is not None and n in old.dense:
                old.dense[n] = p.detach().clone()
            source = new.dense[n] if new is not None and n in new.dense else reg.base_dense[n]
            p.copy_(source)
            p.requires_grad_(new is not None and n in new.dense)
            if new is not None and n in new.dense:
                new.dense[n] = None
    for layer, m in spra_layers(model):
        parts, values = new.layers[layer] if new is not None and layer in new.layers else ((), None)
        m.set_adapter_state(values, parts)
    if new is not None:  # from now on the modules hold its values
        new.layers = {}
    for m in merged:
        m.merge()
    reg.active = name


@contextlib.contextmanager
def disable_adapter(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the model is its base, bit for bit; the active adapter comes back after it."""
    was = active_adapter(model)
    set_adapter(model, None)
    try:
        yield model
    finally:
        set_adapter(model, was)


@contextlib.contextmanager
def bypass_adapter(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the model computes its base, bit for bit, as ``disable_adapter`` does, but nothing is
    switched: every SpaRA module skips its values for a while, keeping them, their mask and their optimizer state.
    It costs a flag per module, so it suits a forward per step (RL's reference model), and it needs no unsharded
    model (checked under FSDP2 on 2 ranks: the base's logits bit for bit). Refused where the base is not what the modules hold: merged values, or modules the adapter
    trains densely (``trainable_modules``: use ``disable_adapter`` on the unsharded model)."""
    model = unwrap(model)
    named = spra_layers(model)
    merged = [name for name, m in named if m.merged]
    if merged:
        raise ValueError(f"{merged[0]} holds its adapter merged into the weight, so skipping its values would not "
                         f"give the base: unmerge it first (SpraLinear.unmerge() on each module)")
    reg = registry(model)
    dense = sorted(reg.adapters[reg.active].dense) if reg.active else []
    if dense:
        raise ValueError(f"the active adapter also trains {dense[:3]} densely (trainable_modules), which skipping "
                         f"SpaRA values cannot undo: use disable_adapter(model) on the unsharded model, or train "
                         f"without trainable_modules")
    was = [(m, m.bypassed) for _, m in named]
    for m, _ in was:
        m.bypassed = True
    try:
        yield model
    finally:
        for m, before in was:
            m.bypassed = before


def delete_adapter(model: nn.Module, name: str) -> None:
    """Drop an adapter and free its values; deleting the active one leaves the model on its base."""
    reg = registry(model)
    if name not in reg.adapters:
        raise ValueError(f"no adapter named {name!r} to delete; this model has {list(reg.adapters)}")
    if reg.active == name:
        set_adapter(model, None)
    del reg.adapters[name]


def combine_adapters(model: nn.Module, weights: dict[str, float], *, name: str) -> NamedAdapter:
    """Add adapter ``name`` = Σ wᵢ Δᵢ over the union of the adapters' masks (dense parameters: base + Σ wᵢ
    (θᵢ − base)). Not activated: ``set_adapter(model, name)``; ``save_adapter(model, path, adapter_name=name)``."""
    model = _unsharded(model, "combine adapters on")
    reg = registry(model)
    _check_name(reg, name)
    if not weights:
        raise ValueError("combine_adapters needs at least one adapter name and weight, e.g. {'a': 0.5, 'b': 0.5}")
    unknown = [a for a in weights if a not in reg.adapters]
    if unknown:
        raise ValueError(f"cannot combine {unknown}: this model has adapters {list(reg.adapters)}")
    parts = {a: reg.adapters[a] for a in weights}
    held = {a: adapter_layers(model, a) for a in weights}
    modules = dict(spra_layers(model))
    layers = {}
    for layer in sorted({lay for a in held.values() for lay in a}):
        members = [(w, *held[a][layer]) for a, w in weights.items() if layer in held[a]]
        layers[layer] = _combine_layer(modules[layer], members)
    first = next(iter(parts.values())).config
    config = dataclasses.replace(
        first, target_modules=sorted(layers),
        trainable_modules=sorted({t for a in parts.values() for t in a.config.trainable_modules}))
    dense = _combine_dense(model, reg, parts, weights)
    combined = NamedAdapter(config=config, layers=layers, dense=dense, combination=dict(weights))
    reg.adapters[name] = combined
    return combined


def _combine_layer(module: SpraLinear, members: list[tuple[float, Parts, nn.Parameter]]) -> tuple[Parts, nn.Parameter]:
    """Parts and values of Σ wᵢ δᵢ for one module: each δᵢ's values are added at their positions in the union."""
    parts = tuple(dict.fromkeys(p for _, ps, _ in members for p in ps))  # in order, each part once
    union = union_mask(module.spra_key, module.weight_shape, parts)
    dtype = members[0][2].dtype
    for _, _, values in members[1:]:
        dtype = torch.promote_types(dtype, values.dtype)
    acc = torch.zeros(union.numel(), dtype=torch.float64)
    for weight, ps, values in members:
        at = torch.searchsorted(union, union_mask(module.spra_key, module.weight_shape, ps))
        acc.index_add_(0, at, float(weight) * values.detach().to("cpu", torch.float64))
    values = nn.Parameter(acc.to(dtype=dtype, device=members[0][2].device))
    return parts, values


def _combine_dense(model: nn.Module, reg: AdapterRegistry, parts: dict[str, NamedAdapter],
                   weights: dict[str, float]) -> dict[str, torch.Tensor | None]:
    params = dict(model.named_parameters())
    dense = {}
    for n in sorted({n for a in parts.values() for n in a.dense}):
        base = reg.base_dense.get(n)
        if base is None:
            raise ValueError(f"cannot combine: {n} was trained densely in place, so the base's own {n} was not kept; "
                             f"save the adapters and load them by name into a fresh base model to combine them")
        acc = base.to(torch.float64)
        for a, w in weights.items():
            if n in parts[a].dense:
                mine = parts[a].dense[n] if parts[a].dense[n] is not None else params[n].detach()
                acc = acc + float(w) * (mine.to(torch.float64) - base.to(torch.float64))
        dense[n] = acc.to(base.dtype)
    return dense


def _check_dense_available(reg: AdapterRegistry, old: NamedAdapter | None, new: NamedAdapter | None) -> None:
    for n in sorted(set(old.dense if old else ()) - set(new.dense if new else ())):
        if reg.base_dense.get(n) is None:
            target = "the base" if new is None else "an adapter that does not train it"
            raise ValueError(f"cannot switch to {target}: {n} was trained densely in place and the base's own {n} "
                             f"was not kept; save the adapter and load it by name into a fresh base model")


def _check_name(reg: AdapterRegistry, name: str) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"adapter_name must be a non-empty string, got {name!r}")
    if name in reg.adapters:
        raise ValueError(f"an adapter named {name!r} is already loaded; delete_adapter(model, {name!r}) first or "
                         f"choose another name")


def _unsharded(model: nn.Module, what: str) -> nn.Module:
    model = unwrap(model)
    if any(is_sharded(m.weight) for _, m in spra_layers(model)):
        raise ValueError(f"cannot {what} a model that FSDP2 or ZeRO-3 shards: load, switch and combine adapters "
                         f"before sharding (or for inference); load_adapter(model, path) without a name loads "
                         f"values into the active adapter of a sharded model")
    return model
