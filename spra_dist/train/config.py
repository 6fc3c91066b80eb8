"""Training configuration from a YAML file and ``key=value`` overrides; the schema is ``spra_dist.train.schema``.

    cfg = load_config("configs/train/debug_tiny_llama.yaml", ["max_steps=5", "spra.lora_rank=4"])

Override keys are dotted (``data.max_length=64``) or bare when the leaf name is unique
(``lora_rank=4``). A bare name that is a top-level field means that field: ``seed`` is the training seed
(init, data order), ``spra.seed`` the mask seed. Values are parsed as YAML scalars (``lr=3e-4``,
``target_modules=[q_proj,v_proj]``, ``head_lr=null``). An unknown key gets the nearest valid one ("did you mean
'lr'?"), also from the names other tools use (``learning_rate``); a value of the wrong type or out of range gets
its dotted key and what the field takes.
"""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Any

import yaml

from spra_dist.train.schema import ModelConfig, TrainConfig, from_dict, to_dict

__all__ = ["ModelConfig", "TrainConfig", "build_config", "load_config", "parse_override", "resolve_key", "to_dict",
           "valid_keys"]


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a YAML file (or start from defaults when path is None), apply overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file {str(path)!r} does not exist; pass --config <path to a .yaml>")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ValueError(f"config file {str(path)!r} is not valid YAML{where} "
                             f"({getattr(err, 'problem', None) or err}); fix the file's syntax") from None
        if not isinstance(raw, dict):
            raise ValueError(f"config file {str(path)!r} must hold a mapping of keys to values")
    flat = _flatten(raw)
    for item in overrides:
        key, value = parse_override(item)
        key = resolve_key(key)
        flat[key] = value
        # lora_rank and density are exclusive: an override of one replaces a budget the file gave as the other.
        other = _EXCLUSIVE.get(key)
        if other and value is not None and not any(resolve_key(parse_override(o)[0]) == other for o in overrides):
            flat[other] = None
    cfg = build_config(flat)
    if cfg.output_dir is None:
        stem = path.stem if path is not None else "default"
        cfg.output_dir = str(Path("runs") / stem)
    cfg.validate()
    return cfg


_EXCLUSIVE = {"spra.lora_rank": "spra.density", "spra.density": "spra.lora_rank"}


def parse_override(item: str) -> tuple[str, Any]:
    """Split ``key=value``; the value is parsed as a YAML scalar (or flow list)."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"override {item!r} is not key=value; write e.g. lr=3e-4 or spra.lora_rank=4")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as err:
        raise ValueError(f"override {item!r}: value {text!r} is not valid YAML ({err.problem})") from None
    return key.strip(), value


def valid_keys() -> list[str]:
    """Every settable key: bare top-level fields and dotted ``section.field`` keys."""
    sections = _sections()
    keys = []
    for f in dataclasses.fields(TrainConfig):
        if f.name in sections:
            keys += [f"{f.name}.{sub.name}" for sub in dataclasses.fields(sections[f.name])]
        else:
            keys.append(f.name)
    return keys


def resolve_key(key: str) -> str:
    """Map a dotted or bare key to its canonical form; unknown keys get the nearest valid one."""
    keys = valid_keys()
    if key in keys:
        return key
    if key in _ALIASES:
        return _ALIASES[key]
    owners = [k for k in keys if k.split(".")[-1] == key]
    if len(owners) == 1:
        return owners[0]
    if len(owners) > 1:
        raise ValueError(f"key {key!r} is ambiguous; write one of {', '.join(owners)}")
    raise ValueError(f"unknown config key {key!r}; {_hint(key, keys)}")


def _hint(key: str, keys: list[str]) -> str:
    """The nearest valid key: another tool's name for one of ours first (also inside a section,
    ``data.sequence_length``), else the closest spelling."""
    tail = key.lower().rsplit(".", 1)[-1]
    ours = _SYNONYMS.get(key.lower()) or _SYNONYMS.get(tail)
    if ours is None:
        bare = {k.split(".")[-1] for k in keys}
        # Names from other tools are candidates too, so that typos of their spellings find ours.
        candidates = {k: k for k in keys} | {b: b for b in sorted(bare)} | _SYNONYMS
        near = difflib.get_close_matches(key.lower(), list(candidates), n=1, cutoff=0.6)
        if not near:  # a short name (lr) is far from its typos by ratio: compare the key's tail too
            near = difflib.get_close_matches(tail, list(candidates), n=1, cutoff=0.6)
        if not near:
            return "spra config lists every key"
        ours = candidates[near[0]]
    note = _SYNONYM_NOTES.get(ours)
    return f"did you mean {ours!r}?" + (f" ({note})" if note else "")


# Names other tools use for one of our keys, accepted as that key.
_ALIASES = {"sequence_len": "data.max_length", "data.sequence_len": "data.max_length",
            "val_set_size": "data.val_set_size", "sample_packing": "data.sample_packing"}

# Keys that users of the HF Trainer, TRL, PEFT, axolotl and torchtune write for our settings.
_SYNONYMS = {
    "learning_rate": "lr", "num_steps": "max_steps", "max_train_steps": "max_steps",
    "train_batch_size": "batch_size", "global_batch_size": "batch_size",
    "per_device_train_batch_size": "batch_size", "micro_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum", "gradient_accumulation": "grad_accum",
    "lr_scheduler_type": "schedule", "lr_scheduler": "schedule", "warmup": "warmup_steps",
    "clip_grad_norm": "max_grad_norm", "gradient_clipping": "max_grad_norm",
    "save_steps": "checkpoint_every", "save_total_limit": "checkpoint_keep", "logging_steps": "log_every",
    "eval_steps": "eval_every", "resume_from_checkpoint": "resume", "output": "output_dir",
    "rank": "spra.lora_rank", "r": "spra.lora_rank", "lora_r": "spra.lora_rank",
    "target_modules": "spra.target_modules", "modules_to_save": "spra.trainable_modules",
    "base_model": "model.name_or_path", "model_name_or_path": "model.name_or_path",
    "sequence_len": "data.max_length", "max_seq_length": "data.max_length", "max_seq_len": "data.max_length",
    "sequence_length": "data.max_length", "max_length": "data.max_length", "seq_len": "data.max_length",
    "num_train_epochs": "max_steps", "num_epochs": "max_steps", "epochs": "max_steps", "bf16": "mixed_precision",
    "report": "report_to", "tracker": "report_to", "logger": "report_to",
}

# What to know when another tool's name maps to a key that counts differently.
_SYNONYM_NOTES = {
    "max_steps": "spra_dist counts optimizer steps, not epochs",
    "batch_size": "the global batch over all ranks and micro batches; grad_accum splits it",
}


def _flatten(raw: dict[str, Any]) -> dict[str, Any]:
    """Nested YAML mapping -> canonical dotted keys (validating each key on the way)."""
    sections = _sections()
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        if key in sections:
            if value is None:
                continue
            if not isinstance(value, dict):
                raise ValueError(f"section {key!r} must be a mapping, got {value!r}")
            for sub, sub_value in value.items():
                flat[resolve_key(f"{key}.{sub}")] = sub_value
        else:
            flat[resolve_key(str(key))] = value
    return flat


def _sections() -> dict[str, type]:
    return {
        f.name: f.default_factory
        for f in dataclasses.fields(TrainConfig)
        if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory)
    }


def build_config(flat: dict[str, Any]) -> TrainConfig:
    """Build the dataclasses from canonical dotted keys, each value typed and checked (``schema.from_dict``)."""
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        head, _, leaf = key.partition(".")
        if leaf:
            nested.setdefault(head, {})[leaf] = value
        else:
            nested[head] = value
    return from_dict(nested)
