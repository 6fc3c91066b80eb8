"""What an adapter records of its base model, and the check that a base given later is that same model.

An adapter's values are deltas at fixed positions of fixed weights: on another base they are noise. So every
path that puts an adapter on a base (``load_adapter``, ``spra merge``) first compares the base with the
record: the model type, the config (by fingerprint, then key by key), and the shape of every adapted weight.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from spra_dist.core.model import spra_layers
from spra_dist.core.quantized import roundtrip
from spra_dist.demos.packaged import PACKAGED, packaged_name
from spra_dist.distributed.tensors import global_shape
from spra_dist.utils.hub import is_hub_id

# Config entries that differ between copies of the same base model (paths, dtype, runtime switches, labels
# of a freshly initialised head). The fingerprint leaves them out; changing this set changes fingerprints.
_VOLATILE_CONFIG_KEYS = {
    "_name_or_path", "name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures",
    "use_cache", "output_attentions", "output_hidden_states", "return_dict", "id2label", "label2id",
    "_attn_implementation", "_attn_implementation_autoset", "attn_implementation", "problem_type",
    "_commit_hash", "quantization_config", "gradient_checkpointing",
}
# Special-token ids that training code sets on a loaded base (a pad id for batching) without touching a
# weight: a difference in them alone does not make another base.
_TOKEN_ID_KEYS = {"pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "decoder_start_token_id"}


def _stable(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in _VOLATILE_CONFIG_KEYS and not k.startswith("_")}


def config_fingerprint(config: dict) -> str:
    stable = json.dumps(_stable(config), sort_keys=True, default=str)
    return hashlib.sha256(stable.encode()).hexdigest()[:16]


def base_model_info(model: nn.Module) -> dict:
    """What an adapter records of its base: a portable name, the class, the full config and its fingerprint.

    The name is the short name of a packaged model (``minilm``, ``smollm2``) when the base is one, else the
    name or path the base was loaded from, as given.
    """
    config = getattr(model, "config", None)
    if config is None:
        return {"name_or_path": None, "class": model_class_name(model), "config": None, "config_fingerprint": None}
    d = json.loads(json.dumps(config.to_dict(), default=str))
    path = getattr(config, "_name_or_path", None) or None
    name = packaged_name(path) or path
    if "_name_or_path" in d:
        d["_name_or_path"] = name  # the same portable name inside the recorded config
    return {"name_or_path": name, "class": model_class_name(model), "config": d,
            "config_fingerprint": config_fingerprint(d)}


def model_class_name(model: nn.Module) -> str:
    """The model's own class: FSDP2's ``fully_shard`` swaps in a subclass named ``FSDP<class>``, which no loader
    knows."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule)).__name__


def config_differences(recorded: dict, found: dict) -> list[str]:
    """``key: recorded -> found`` for every config entry that makes ``found`` another base than ``recorded``."""
    a, b = _stable(recorded), _stable(found)
    keys = sorted(k for k in a.keys() | b.keys() if k not in _TOKEN_ID_KEYS and a.get(k) != b.get(k))
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys]


def expected_base(adapter_config: dict) -> str:
    """How an error names the base an adapter was trained on."""
    base = adapter_config.get("base_model") or {}
    model_type = (base.get("config") or {}).get("model_type")
    if base.get("name_or_path"):
        return f"base {base['name_or_path']!r} ({base.get('class')}, model_type {model_type!r})"
    return f"a base of class {base.get('class')} (model_type {model_type!r})"


def check_base_config(adapter_config: dict, found: dict, *, adapter: Path, base: str) -> None:
    """``ValueError`` unless the config ``found`` of base ``base`` is the one the adapter recorded."""
    recorded = (adapter_config.get("base_model") or {}).get("config")
    if not recorded:
        return
    if recorded.get("model_type") != found.get("model_type"):
        problem = f"its model_type is {found.get('model_type')!r}, not {recorded.get('model_type')!r}"
    elif config_fingerprint(recorded) == config_fingerprint(found):
        return
    elif diffs := config_differences(recorded, found):
        problem = f"its config differs in {len(diffs)} entries ({'; '.join(diffs[:3])})"
    else:
        return
    raise ValueError(f"adapter {adapter} was trained on {expected_base(adapter_config)}, but {base!r} is another "
                     f"model: {problem}. Give it the base it was trained on (spra merge --base <its directory>)")


def check_base_model(model: nn.Module, adapter_config: dict, *, adapter: Path) -> None:
    """``ValueError`` unless ``model`` is the base the adapter recorded: model type, config, adapted shapes."""
    config = getattr(model, "config", None)
    name = (base_model_info(model)["name_or_path"] or type(model).__name__) if config is not None else None
    if config is not None:
        check_base_config(adapter_config, json.loads(json.dumps(config.to_dict(), default=str)), adapter=adapter,
                          base=name)
    modules = dict(model.named_modules())
    for layer, record in adapter_config.get("layers", {}).items():
        module = modules.get(layer)
        shape = list(global_shape(module.weight)) if hasattr(module, "weight") else None
        if shape != record["shape"]:
            found = f"has shape {shape}" if shape else "does not exist"
            raise ValueError(f"adapter {adapter} was trained on {expected_base(adapter_config)}: its layer {layer} "
                             f"has shape {record['shape']}, and in this {type(model).__name__} it {found}. Give it "
                             f"the base it was trained on")


def resolve_base(name_or_path: str, *, adapter: Path) -> str:
    """A model directory for a recorded or given base: a packaged model's folder, an existing path, or a
    hub id (``org/model``) passed on to transformers as is (see spra_dist.utils.hub)."""
    if name_or_path in PACKAGED:
        return str(PACKAGED[name_or_path]())
    path = Path(name_or_path).expanduser()
    if path.exists():
        return str(path)
    if is_hub_id(name_or_path):
        return name_or_path
    raise ValueError(f"adapter {adapter} was trained on base {name_or_path!r}, which does not exist on this "
                     f"machine; pass --base <directory of that model, or its hub id>")


def rebuild_quantized_base(model: nn.Module, record: dict | None) -> None:
    """Give each adapted matrix of the unquantized ``model`` the weight the adapter was trained on, dequant(quant(W))
    as ``record`` (its ``base_quantization``; None: nothing to do) says, in its dtype (every other weight too, the
    trained values aside). A merge then writes dequant(W) + Δ, never requantized; evaluation and generation run the
    model the adapter was trained as."""
    if not record:
        return
    dtype = getattr(torch, record["dtype"])
    for name, p in model.named_parameters():
        if p.is_floating_point() and not name.endswith("spra_values"):  # values stay fp32 until they are added
            p.data = p.data.to(dtype)
    for _, m in spra_layers(model):
        m.weight = nn.Parameter(roundtrip(m.weight, record), requires_grad=False)
