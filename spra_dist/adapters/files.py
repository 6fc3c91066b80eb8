"""Adapter files: ``adapter.safetensors`` (the k values per matrix, plus densely trained modules) and
``adapter_config.json`` (seed, mask_version, targets, per-key shape, k and offset, dtype, base model). No
indices: they are rebuilt from the seed. No pickle anywhere.

The values of all matrices are stored as one 1-D tensor ``spra_values``, matrix after matrix in the order of
their names, at the offsets the config records: a safetensors header entry per matrix would cost ~110 bytes
each (0.2 MB of headers on a 70B model), more than many matrices' values.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from spra_dist.adapters.base import base_model_info, check_base_model
from spra_dist.adapters.named import add_adapter, rename_active, set_adapter
from spra_dist.core.config import SpraConfig
from spra_dist.core.layer import union_mask
from spra_dist.core.masks import MASK_VERSION, SUPPORTED_MASK_VERSIONS
from spra_dist.core.model import apply_spra, dense_parameter_names, spra_layers, spra_modules
from spra_dist.core.quantized import describe
from spra_dist.core.registry import DEFAULT_NAME, NamedAdapter, find_registry, spra_config
from spra_dist.distributed.group import on_rank0
from spra_dist.distributed.tensors import full_tensor, global_shape, is_sharded, set_full, unwrap
from spra_dist.utils.atomic import atomic_files, committed_file, read_verified_json, sha256_file, write_safetensors

WEIGHTS_NAME = "adapter.safetensors"
CONFIG_NAME = "adapter_config.json"
FORMAT = "spra_dist.adapter"
FORMAT_VERSION = 2  # 2: a layer may list its mask's parts (a combination of adapters); 1: one seed for all
PACKED_VALUES = "spra_values"

def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trained tensors, keyed by unwrapped names: ``<module>.spra_values`` and dense parameters.

    Under FSDP2 or ZeRO-3 this gathers only these O(k) tensors (never a frozen weight): call it on every rank.
    """
    model = unwrap(model)
    state = {f"{name}.spra_values": full_tensor(m.spra_values) for name, m in spra_modules(model)}
    params = dict(model.named_parameters())
    for name in dense_parameter_names(model):
        state[name] = full_tensor(params[name])
    return state


def adapter_config(model: nn.Module) -> dict:
    """The ``adapter_config.json`` of the model's active adapter (its ``offset`` entries are filled on write)."""
    reg = find_registry(model)
    cfg: SpraConfig = reg.config
    mods = spra_modules(model)
    params = dict(model.named_parameters())
    dense_shapes = {n: list(global_shape(params[n])) for n in dense_parameter_names(model)}
    layers = {name: {"shape": list(m.weight_shape), "k": m.k, "layout": "conv1d" if m.transposed else "linear"}
              for name, m in mods}
    for name, m in mods:
        if m.mask_parts != ((cfg.seed, m.k),):  # a combination: the union of these seeded masks
            layers[name]["mask"] = [list(part) for part in m.mask_parts]
    combination = reg.adapters[reg.active].combination
    return {
        "format": FORMAT,
        "format_version": 2 if any("mask" in layer for layer in layers.values()) else 1,
        "mask_version": MASK_VERSION,
        "seed": cfg.seed,
        "spra_config": cfg.adapter_dict(),
        "layers": layers,
        **({"combination": combination} if combination else {}),
        "dense_parameters": dense_shapes,
        "dtype": str(mods[0][1].spra_values.dtype).removeprefix("torch.") if mods else None,
        "total_k": sum(m.k for _, m in mods),
        "base_model": base_model_info(model),
        "base_quantization": describe(mods[0][1].weight) if mods else None,
    }


def save_adapter(model: nn.Module, path: str | os.PathLike, *, state: dict[str, torch.Tensor] | None = None,
                 label_names: list[str] | None = None, adapter_name: str | None = None) -> Path:
    """Write ``adapter.safetensors`` + ``adapter_config.json`` into ``path``, atomically.

    ``label_names``: a classifier's class names in id order, recorded as ``label_names`` in the config.
    ``adapter_name``: which of the model's named adapters to save (default: the active one).

    Works on a plain, DDP, FSDP2 or DeepSpeed model: under torch.distributed call it on every rank (the k
    values are gathered), and rank 0 writes. ``state`` lets a caller pass values it already gathered.
    """
    model = unwrap(model)
    reg = find_registry(model)
    if adapter_name is not None and reg is not None and adapter_name != reg.active:
        was = reg.active
        set_adapter(model, adapter_name)
        try:
            return save_adapter(model, path, state=state, label_names=label_names)
        finally:
            set_adapter(model, was)
    if spra_config(model) is None:
        raise ValueError(f"{type(model).__name__} has no active SpaRA adapter: call apply_spra, load_adapter or "
                         f"set_adapter first")
    state = adapter_state_dict(model) if state is None else state
    on_rank0(lambda: _write_adapter(model, state, Path(path), label_names))  # the files exist on return, on every rank
    return Path(path)


def _write_adapter(model: nn.Module, state: dict[str, torch.Tensor], path: Path,
                   label_names: list[str] | None = None) -> None:
    config = adapter_config(model)
    if label_names:
        config["label_names"] = list(label_names)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items() if not k.endswith(".spra_values")}
    values, offset = [], 0
    for name in sorted(config["layers"]):
        config["layers"][name]["offset"] = offset
        values.append(state[f"{name}.spra_values"].detach().to("cpu").reshape(-1))
        offset += values[-1].numel()
    if values:
        tensors[PACKED_VALUES] = torch.cat(values)
    # Only our two files are replaced; the config names the sha256 of the weights it was written with.
    with atomic_files(path) as tmp:
        write_safetensors(tensors, tmp / WEIGHTS_NAME, metadata={"format": "pt", "spra_format": FORMAT})
        config["adapter_sha256"] = sha256_file(tmp / WEIGHTS_NAME)
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def adapter_in(path: str | os.PathLike) -> Path:
    """The adapter directory that ``path`` names: ``path`` itself, or ``path/adapter`` when ``path`` is a run
    directory (``spra train``'s ``output_dir``) with an adapter inside and none of its own."""
    path = Path(path)
    inner = path / "adapter"
    if not committed_file(path, CONFIG_NAME).exists() and committed_file(inner, CONFIG_NAME).exists():
        return inner
    return path


def read_adapter_config(path: str | os.PathLike) -> tuple[dict, Path]:
    """An adapter directory's config, checked (format, mask_version, the weights' sha256), and the path of its
    weights file. ``ValueError`` naming the file and the problem."""
    path = Path(path)
    config, weights = read_verified_json(path, CONFIG_NAME, WEIGHTS_NAME, fmt=FORMAT, checksum_key="adapter_sha256",
                                         what="spra_dist adapter (spra train writes <output_dir>/adapter)")
    if not isinstance(config.get("format_version", 1), int) or config.get("format_version", 1) > FORMAT_VERSION:
        raise ValueError(f"{path / CONFIG_NAME}: format_version {config.get('format_version')!r} is newer than this "
                         f"spra_dist reads ({FORMAT_VERSION}): upgrade spra_dist to load it")
    if config.get("mask_version") not in SUPPORTED_MASK_VERSIONS:
        raise ValueError(
            f"{path / CONFIG_NAME}: unknown mask_version {config.get('mask_version')!r}; this spra_dist knows "
            f"{list(SUPPORTED_MASK_VERSIONS)}: upgrade spra_dist to load it"
        )
    return config, weights


def read_adapter(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read and check an adapter directory: its config, and its tensors by name (``<module>.spra_values``
    per adapted matrix, dense parameters by their own names). ``ValueError`` naming the file and problem."""
    config, weights = read_adapter_config(path)
    try:
        tensors = load_file(str(weights))
    except Exception as e:  # safetensors raises its own error type for a bad header or short file
        raise ValueError(f"{weights} is not a readable safetensors file ({e})") from e
    return config, _unpack(config, tensors, weights)


def _unpack(config: dict, tensors: dict[str, torch.Tensor], weights: Path) -> dict[str, torch.Tensor]:
    """Per-matrix ``<name>.spra_values`` views of the packed values, plus the dense tensors."""
    packed = tensors.pop(PACKED_VALUES, torch.empty(0))
    total = sum(layer["k"] for layer in config["layers"].values())
    if packed.numel() != total:
        raise ValueError(f"{weights} holds {packed.numel()} values but its config lists {total}: damaged adapter")
    for name, layer in config["layers"].items():
        tensors[f"{name}.spra_values"] = packed[layer["offset"]: layer["offset"] + layer["k"]]
    return tensors


def load_adapter(model: nn.Module, path: str | os.PathLike, *, adapter_name: str | None = None,
                 check_base: bool = True) -> nn.Module:
    """Load the adapter at ``path`` into ``model``.

    - A plain base: SpaRA is applied as the adapter records, its values loaded; it is the active adapter
      (named ``adapter_name``, default ``default``).
    - ``adapter_name`` on a model that has adapters: added beside them, by that name, not activated (see
      ``spra_dist.adapters.named``: ``set_adapter``, ``disable_adapter``, ``combine_adapters``).
    - No name, on a model with an active adapter: the values are loaded into it (same seed and layers). This
      also works on a model FSDP2 or ZeRO-3 already shards (call it on every rank then): each value tensor is
      laid out in the engine's own sharding.

    ``check_base``: refuse a model that is not the adapter's recorded base (model type, config, shape of every
    adapted weight); pass False only for a base whose config you changed in ways that keep the weights.
    """
    path = Path(path)
    model = unwrap(model)
    config, tensors = read_adapter(path)
    label = path if adapter_name is None else f"{adapter_name!r} ({path})"
    if check_base:
        check_base_model(model, config, adapter=label)
    combined = any("mask" in layer for layer in config["layers"].values())
    if adapter_name is None and spra_config(model) is not None:
        _load_into_active(model, config, tensors, path)
    elif not spra_layers(model) and not combined:
        _apply_and_load(model, config, tensors, path)
        if adapter_name is not None:
            rename_active(model, adapter_name)
    else:
        add_adapter(model, adapter_name or DEFAULT_NAME, _named_adapter(model, config, tensors, label))
    return model


def _apply_and_load(model: nn.Module, config: dict, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """A plain base: apply SpaRA as recorded (every rank agrees on the masks), then load the values."""
    apply_spra(model, SpraConfig.from_dict(config["spra_config"]))
    params = dict(model.named_parameters())
    _check_dense(params, config, path)
    base_dense = find_registry(model).base_dense
    for name in config.get("dense_parameters", {}):
        if not is_sharded(params[name]):  # kept for disable_adapter and switching to adapters without it
            base_dense[name] = params[name].detach().clone()
    _load_into_active(model, config, tensors, path)


def _load_into_active(model: nn.Module, config: dict, tensors: dict[str, torch.Tensor], path: Path) -> None:
    if spra_config(model).seed != config["seed"]:
        raise ValueError(f"model has SpaRA with seed {spra_config(model).seed}, adapter {path} has seed "
                         f"{config['seed']}: load it into a plain base model, or beside the active adapter with "
                         f"load_adapter(model, path, adapter_name=...)")
    mods = dict(spra_modules(model))
    _check_layers(mods, config, path)
    params = dict(model.named_parameters())
    _check_dense(params, config, path)
    for name, m in mods.items():
        set_full(m.spra_values, tensors[f"{name}.spra_values"])
    for name in config.get("dense_parameters", {}):
        set_full(params[name], tensors[name])


def _named_adapter(model: nn.Module, config: dict, tensors: dict[str, torch.Tensor], label) -> NamedAdapter:
    """An adapter file as a ``NamedAdapter`` on the model's devices and dtypes (values of the recorded config's
    ``value_dtype``)."""
    cfg = SpraConfig.from_dict(config["spra_config"])
    modules = dict(model.named_modules())
    layers = {}
    for name, record in config["layers"].items():
        module = modules.get(name)
        weight = getattr(module, "weight", None)
        if weight is None or list(global_shape(weight)) != record["shape"]:
            raise ValueError(f"adapter {label} adapts {name} of shape {record['shape']}, which this "
                             f"{type(model).__name__} does not have: it belongs to another model")
        parts = tuple((int(s), int(k)) for s, k in record.get("mask", [[config["seed"], record["k"]]]))
        values = tensors[f"{name}.spra_values"]
        if len(parts) > 1 and union_mask(f"{name}.weight", tuple(record["shape"]), parts).numel() != values.numel():
            raise ValueError(f"adapter {label}: layer {name} lists mask parts {parts} whose union is not its "
                             f"{values.numel()} values: damaged adapter config")
        dtype = cfg.values_dtype_for(weight.dtype)
        layers[name] = (parts, nn.Parameter(values.to(device=weight.device, dtype=dtype)))
    params = dict(model.named_parameters())
    _check_dense(params, config, label)
    dense = {n: tensors[n].to(device=params[n].device, dtype=params[n].dtype)
             for n in config.get("dense_parameters", {})}
    return NamedAdapter(config=cfg, layers=layers, dense=dense, source=str(label),
                        combination=config.get("combination"))


def _check_dense(params: dict[str, nn.Parameter], config: dict, path) -> None:
    for name, shape in config.get("dense_parameters", {}).items():
        if name not in params or list(global_shape(params[name])) != shape:
            have = list(global_shape(params[name])) if name in params else "none"
            raise ValueError(f"adapter {path} has dense parameter {name} {shape}; the model has {have}")


def _check_layers(mods: dict, config: dict, path: Path) -> None:
    layers = config["layers"]
    missing = sorted(set(layers) - set(mods))
    extra = sorted(set(mods) - set(layers))
    if missing or extra:
        raise ValueError(
            f"adapter {path} adapts layers the model doesn't match (missing in model: {missing[:3]}, "
            f"not in adapter: {extra[:3]}): it was made for another architecture"
        )
    for name, m in mods.items():
        want = layers[name]
        parts = tuple((int(s), int(k)) for s, k in want.get("mask", [[config["seed"], want["k"]]]))
        if list(m.weight_shape) != want["shape"] or m.k != want["k"] or m.mask_parts != parts:
            raise ValueError(
                f"adapter {path}: layer {name} has shape {want['shape']} and k={want['k']}, the model has "
                f"{list(m.weight_shape)} and k={m.k}: the adapter belongs to a model of another shape"
            )
