"""Training configuration: dataclasses filled from a YAML file and ``key=value`` overrides.

    cfg = load_config("configs/train/debug_tiny_llama.yaml", ["max_steps=5", "spra.lora_rank=4"])

Override keys are dotted (``data.max_length=64``) or bare when the leaf name is unique
(``lora_rank=4``). A bare name that is a top-level field means that field: ``seed`` is the training seed
(init, data order), ``spra.seed`` the mask seed. Values are parsed as YAML scalars (``lr=3e-4``,
``target_modules=[q_proj,v_proj]``, ``head_lr=null``).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from spra_dist.core.config import SpraConfig
from spra_dist.data.config import DATA_SOURCES, DATA_TYPES, EXCESS_LENGTH, ROLES, DataConfig
from spra_dist.distributed.devices import DEVICES
from spra_dist.train.trackers import check_tracker

MODEL_SOURCES = ("minilm", "smollm2", "tiny_llama", "tiny_gpt2", "tiny_bert", "hf")
TASKS = ("classification", "causal_lm")
DTYPES = ("float32", "bfloat16", "float16")
SCHEDULES = ("cosine", "linear", "constant")


@dataclass
class ModelConfig:
    source: str = "tiny_llama"
    """Where the base model comes from: minilm | smollm2 (offline packages), tiny_llama | tiny_gpt2 |
    tiny_bert (random init from a config, byte-level vocabulary) or hf (a local directory)."""

    name_or_path: str | None = None
    """Local model directory; required for source hf, ignored otherwise."""

    task: str = "causal_lm"
    """classification (sequence classification head) or causal_lm."""

    num_labels: int = 2
    """Number of classes for classification."""

    dtype: str = "float32"
    """Parameter dtype of the base model: float32 | bfloat16 | float16."""

    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory (transformers' gradient checkpointing)."""

    hidden_size: int = 64
    """Tiny models only: width of the residual stream."""

    num_layers: int = 2
    """Tiny models only: number of transformer blocks."""

    num_heads: int = 4
    """Tiny models only: attention heads (must divide hidden_size)."""

    intermediate_size: int = 128
    """Tiny models only: width of the MLP."""

    max_position_embeddings: int = 512
    """Tiny models only: longest sequence the position embeddings cover."""


@dataclass
class TrainConfig:
    output_dir: str | None = None
    """Where the adapter, metrics and plots go; default runs/<config file stem>/."""

    max_steps: int = 100
    """Number of optimizer steps."""

    seed: int = 0
    """Training seed: random init of tiny models, data order. The mask seed is spra.seed."""

    lr: float = 3e-3
    """Peak learning rate of the sparse values (3e-3: chosen on validation at r=8, r=16 and in SFT; r=4 took 5e-3;
    docs/quality.md)."""

    head_lr: float | None = None
    """Peak learning rate of spra.trainable_modules (the densely trained head); None: lr."""

    batch_size: int = 32
    """Global batch: examples per optimizer step over all ranks and accumulation steps."""

    grad_accum: int = 1
    """Micro batches per optimizer step on each rank; the micro batch is batch_size / (ranks * grad_accum)."""

    warmup_steps: int = 0
    """Steps of linear warmup from 0 to the peak learning rate."""

    schedule: str = "cosine"
    """Decay after warmup: cosine | linear (both to 0 at max_steps) | constant."""

    weight_decay: float = 0.0
    """AdamW weight decay of the dense modules (and of the sparse values if decay_spra_values)."""

    decay_spra_values: bool = False
    """Apply weight_decay to the sparse values too; off because decay pulls the deltas to zero."""

    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this value; None: no clipping."""

    eval_every: int = 0
    """Evaluate every this many steps (0: only before and after training)."""

    log_every: int = 10
    """Write a metrics line every this many steps."""

    eval_batch_size: int = 64
    """Examples per forward pass in evaluation."""

    eval_generate: int = 0
    """Causal LM with prompts (completion, alpaca, chat): greedily generate the answer of this many eval
    examples at each evaluation and report exact_match and contains; a few go to output_dir/samples.jsonl."""

    eval_generate_max_tokens: int = 64
    """Most new tokens per generated answer."""

    engine: str = "auto"
    """none | ddp | fsdp2 | deepspeed, or auto: what the launcher says (accelerate's config, a DeepSpeed
    preset given in deepspeed_config), else ddp for several processes and none for one."""

    deepspeed_config: str | None = None
    """DeepSpeed preset for engine deepspeed: a preset shipped with spra_dist (zero1, zero2, zero3,
    zero3_offload) or a JSON path; its "auto" values are filled from this config."""

    device: str = "auto"
    """auto (each rank on its GPU, cuda:LOCAL_RANK, over nccl, when torch sees CUDA; else the CPU over gloo) |
    cuda | cpu."""

    mixed_precision: str = "auto"
    """no | bf16 (bf16 compute, fp32 master values: torch.autocast under none and ddp, the engine's own bf16
    under fsdp2 and deepspeed), or auto: accelerate's setting."""

    checkpoint_every: int = 0
    """Write a resume checkpoint (O(k): values, AdamW moments, step, RNG) every this many steps; 0: never."""

    checkpoint_keep: int = 2
    """Resume checkpoints kept in output_dir/checkpoints (the newest ones)."""

    resume: str | None = None
    """auto: continue from the newest complete checkpoint in output_dir (fresh start if none); or a
    checkpoint directory. Works across engines and world sizes."""

    overwrite: bool = False
    """Train into an output_dir that holds an earlier run's adapter, replacing it. Without it (or resume) such
    a run is refused, so a finished adapter is never lost to a repeated command."""

    stop_after: int | None = None
    """End this run after this many optimizer steps in total (the schedule still spans max_steps): for
    time-limited jobs that continue with resume=auto. None: run to max_steps."""

    report_to: str = "none"
    """none | tensorboard (event files in output_dir/tensorboard) | wandb (an offline run in output_dir/wandb):
    the scalars of metrics.jsonl and the config, from rank 0."""

    comm_stats: bool = False
    """Count the bytes handed to collectives per step (metrics.jsonl, summary.json)."""

    dist_timeout_s: int = 300
    """Seconds any collective may wait for the other ranks before the job fails with an error naming the
    rank that did not arrive (a hung or stopped rank). Raise it if one step, or a checkpoint write, can
    take longer; the library defaults (10-30 min) leave a hung job waiting far longer."""

    on_nonfinite: str = "stop"
    """A non-finite loss or gradient norm on any rank: stop (save the last good state, exit with status 3)
    or skip (drop that step's update on every rank and count it in metrics.jsonl and summary.json)."""

    max_nonfinite_skips: int = 10
    """With on_nonfinite=skip: this many dropped steps in a row end the run as stop does."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The base model."""

    data: DataConfig = field(default_factory=DataConfig)
    """The data set."""

    spra: SpraConfig = field(default_factory=SpraConfig)
    """Which matrices are adapted and how many entries each trains (spra_dist.SpraConfig)."""

    def validate(self) -> None:
        """Raise ValueError naming the bad value and the fix."""
        _choice("model.source", self.model.source, MODEL_SOURCES)
        _choice("model.task", self.model.task, TASKS)
        _choice("model.dtype", self.model.dtype, DTYPES)
        _validate_data(self.data, self.model.task)
        _choice("schedule", self.schedule, SCHEDULES)
        _choice("device", self.device, DEVICES)
        for key in ("max_steps", "batch_size", "grad_accum", "log_every", "eval_batch_size"):
            _positive(key, getattr(self, key))
        _positive("data.max_length", self.data.max_length)
        for key in ("warmup_steps", "eval_every"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key}={getattr(self, key)} is negative; use 0 or more")
        if self.lr <= 0 or (self.head_lr is not None and self.head_lr <= 0):
            raise ValueError(f"lr={self.lr}, head_lr={self.head_lr}: learning rates must be > 0")
        if self.batch_size % self.grad_accum:
            raise ValueError(
                f"batch_size={self.batch_size} is not divisible by grad_accum={self.grad_accum}; "
                "pick a batch_size that is a multiple of grad_accum"
            )
        if self.seed < 0:
            raise ValueError(f"seed={self.seed} must be a non-negative integer")
        if self.model.task == "classification" and self.model.num_labels < 2:
            raise ValueError(f"model.num_labels={self.model.num_labels}: classification needs 2 or more classes")
        if self.model.source == "hf" and not self.model.name_or_path:
            raise ValueError("model.source=hf needs model.name_or_path=<local model directory>")
        if self.model.source in ("minilm", "tiny_bert") and self.model.task != "classification":
            raise ValueError(f"model.source={self.model.source} is an encoder; set model.task=classification")
        if self.model.source == "smollm2" and self.model.task != "causal_lm":
            raise ValueError("model.source=smollm2 supports model.task=causal_lm only")
        if self.eval_generate < 0 or self.eval_generate_max_tokens <= 0:
            raise ValueError(f"eval_generate={self.eval_generate}, eval_generate_max_tokens="
                             f"{self.eval_generate_max_tokens}: use eval_generate >= 0 and max tokens >= 1")
        if self.eval_generate and self.model.task != "causal_lm":
            raise ValueError("eval_generate needs model.task=causal_lm; classification reports accuracy and "
                             "macro_f1 already")
        _choice("engine", self.engine, ("auto", "none", "ddp", "fsdp2", "deepspeed"))
        check_tracker(self.report_to)
        _choice("mixed_precision", self.mixed_precision, ("auto", "no", "bf16"))
        for key in ("checkpoint_every", "checkpoint_keep"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key}={getattr(self, key)} is negative; use 0 or more")
        _choice("on_nonfinite", self.on_nonfinite, ("stop", "skip"))
        for key in ("dist_timeout_s", "max_nonfinite_skips"):
            _positive(key, getattr(self, key))
        if self.stop_after is not None and not 0 < self.stop_after <= self.max_steps:
            raise ValueError(f"stop_after={self.stop_after} must lie in 1..max_steps={self.max_steps}")
        self.spra.validate()


def _validate_data(data: DataConfig, task: str) -> None:
    if data.source is None:
        data.source = "datasets" if data.datasets else "synthetic"
    _choice("data.source", data.source, DATA_SOURCES)
    _positive("data.max_length", data.max_length)
    _positive("data.dataset_processes", data.dataset_processes)
    if not 0.0 < data.eval_fraction < 1.0:
        raise ValueError(f"data.eval_fraction={data.eval_fraction} must lie in (0, 1)")
    if data.source == "datasets" and not data.datasets:
        raise ValueError("data.source=datasets needs data.datasets: a list of {path, type} entries")
    if data.source != "datasets" and (data.datasets or data.eval_datasets):
        raise ValueError(f"data.source={data.source} and data.datasets are exclusive; drop data.source to "
                         "train on data.datasets")
    if data.val_set_size is not None and data.eval_datasets:
        raise ValueError("data.val_set_size and data.eval_datasets are exclusive; give one of them")
    if data.val_set_size is not None and not (0 < data.val_set_size < 1 or float(data.val_set_size).is_integer()
                                              and data.val_set_size >= 1):
        raise ValueError(f"data.val_set_size={data.val_set_size}: give a fraction in (0, 1) or a row count >= 1")
    if data.excess_length is not None:
        _choice("data.excess_length", data.excess_length, EXCESS_LENGTH)
    if task == "classification" and data.source == "text_file":
        raise ValueError("data.source=text_file gives causal-LM blocks; use model.task=causal_lm")
    if task == "causal_lm" and data.source == "rotten_tomatoes":
        raise ValueError("data.source=rotten_tomatoes is a classification set; use model.task=classification")
    if data.sample_packing and task != "causal_lm":
        raise ValueError("data.sample_packing=true packs causal-LM examples; use model.task=causal_lm or "
                         "sample_packing=false")
    for section in ("datasets", "eval_datasets"):
        for i, entry in enumerate(getattr(data, section)):
            where = f"data.{section}[{i}]"
            if not entry.path:
                raise ValueError(f"{where} has no path; give a file, glob or directory")
            _choice(f"{where}.type", entry.type, DATA_TYPES)
            if (entry.type == "classification") != (task == "classification"):
                fits = "classification" if task == "classification" else "text, completion, alpaca or chat"
                raise ValueError(f"{where}.type={entry.type} does not fit model.task={task}; use type {fits}")
            if entry.max_samples is not None:
                _positive(f"{where}.max_samples", entry.max_samples)
            for role in [*entry.roles, *entry.roles_to_train]:
                _choice(f"{where} role", role, ROLES)


def _choice(key: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ValueError(f"{key}={value!r} is not one of {', '.join(options)}")


def _positive(key: str, value: int) -> None:
    if value <= 0:
        raise ValueError(f"{key}={value} must be a positive integer")


# --------------------------------------------------------------------------- loading


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
    bare = {k.split(".")[-1] for k in keys}
    # Names from other tools, so that their spellings (and typos of them) find ours too.
    candidates = {k: k for k in keys} | {b: b for b in sorted(bare)} | _SYNONYMS
    near = difflib.get_close_matches(key.lower(), list(candidates), n=1, cutoff=0.6)
    if not near:  # a short name (lr) is far from its typos by ratio: compare the key's tail too
        near = difflib.get_close_matches(key.lower().rsplit(".", 1)[-1], list(candidates), n=1, cutoff=0.6)
    hint = f"did you mean {candidates[near[0]]!r}?" if near else "see the fields of spra_dist.train.config.TrainConfig"
    raise ValueError(f"unknown config key {key!r}; {hint}")


# Names other tools use for one of our keys, accepted as that key.
_ALIASES = {"sequence_len": "data.max_length", "data.sequence_len": "data.max_length",
            "val_set_size": "data.val_set_size", "sample_packing": "data.sample_packing"}

# Keys that users of the HF Trainer, PEFT, axolotl and torchtune write for our settings.
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
    "sequence_len": "data.max_length", "max_seq_length": "data.max_length", "bf16": "mixed_precision",
    "report": "report_to", "tracker": "report_to", "logger": "report_to",
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
    """Build the dataclasses from canonical dotted keys, checking every value's type."""
    sections = _sections()
    top: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {name: {} for name in sections}
    for key, value in flat.items():
        head, _, leaf = key.partition(".")
        if leaf:
            nested[head][leaf] = value
        else:
            top[head] = value
    kwargs = _typed_kwargs(TrainConfig, top, prefix="")
    for name, cls in sections.items():
        kwargs[name] = cls(**_typed_kwargs(cls, nested[name], prefix=f"{name}."))
    return TrainConfig(**kwargs)


def _typed_kwargs(cls: type, values: dict[str, Any], *, prefix: str) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {name: coerce(f"{prefix}{name}", value, hints[name]) for name, value in values.items()}


def coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the type hint ``tp`` (converting where lossless); ValueError otherwise."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return coerce(key, value, option)
            except ValueError as err:
                errors.append(err)
        raise errors[0] if len(errors) == 1 else _type_error(key, value, _type_name(tp))
    if origin is dict:
        key_tp, item_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise _type_error(key, value, _type_name(tp))
        return {coerce(key, k, key_tp): coerce(f"{key}.{k}", v, item_tp) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _type_error(key, value, f"a mapping of {tp.__name__} fields")
        names = [f.name for f in dataclasses.fields(tp)]
        for name in value:
            if name not in names:
                near = difflib.get_close_matches(str(name), names, n=1)
                hint = f"did you mean {near[0]!r}?" if near else f"use {', '.join(names)}"
                raise ValueError(f"unknown key {key}.{name}; {hint}")
        return tp(**_typed_kwargs(tp, value, prefix=f"{key}."))
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise _type_error(key, value, _type_name(tp))
        indexed = dataclasses.is_dataclass(item_tp)  # entries of data.datasets are named data.datasets[i]
        return [coerce(f"{key}[{i}]" if indexed else key, item, item_tp) for i, item in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, bool):  # YAML 1.1 reads a bare no / yes (mixed_precision=no) as a boolean
            return "yes" if value else "no"
    elif tp is Any:
        return value
    raise _type_error(key, value, _type_name(tp))


def _type_name(tp: Any) -> str:
    return str(tp).replace("typing.", "") if not isinstance(tp, type) else tp.__name__


def _type_error(key: str, value: Any, expected: str) -> ValueError:
    return ValueError(f"{key}={value!r} has the wrong type; expected {expected}")


def to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """Plain nested dict (for summary.json and the run's saved config)."""
    return dataclasses.asdict(cfg)
