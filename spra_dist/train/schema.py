"""The training schema: dataclasses with a docstring per field, typed and checked by pydantic.

    cfg = TrainConfig(max_steps=5, model=ModelConfig(source="tiny_gpt2"))
    cfg.validate()                                             # ValueError naming the bad value and the fix
    cfg = from_dict({"max_steps": 5, "spra": {"lora_rank": 4}})  # a nested mapping, as a YAML file gives it

Each field's type says what it takes: a ``Literal`` for a choice, ``PositiveInt`` / ``NonNegativeInt`` /
``Field(gt=..)`` for a bound. pydantic checks and converts the values (``from_dict``, through
``spra_dist.train.typed``); ``validate`` adds the rules that tie fields together. YAML files and ``key=value``
overrides are read by ``spra_dist.train.config``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, get_args

from pydantic import BeforeValidator, ConfigDict, NonNegativeInt, PositiveInt

from spra_dist.core.config import SpraConfig
from spra_dist.core.quantized import QuantizeBase
from spra_dist.data.config import DATA_TYPES, DataConfig
from spra_dist.distributed.devices import Device
from spra_dist.distributed.engines import EngineName, MixedPrecision
from spra_dist.train.trackers import TrackerName, check_tracker
from spra_dist.train.typed import typed

ModelSource = Literal["minilm", "smollm2", "tiny_llama", "tiny_gpt2", "tiny_bert", "hf"]
Task = Literal["classification", "causal_lm"]
Dtype = Literal["float32", "bfloat16", "float16"]
Schedule = Literal["cosine", "linear", "constant"]
OnNonfinite = Literal["stop", "skip"]
MODEL_SOURCES: tuple[str, ...] = get_args(ModelSource)
SCHEDULES: tuple[str, ...] = get_args(Schedule)


def _yaml_word(value: Any) -> Any:
    # YAML 1.1 reads a bare no / off as False and yes / on as True: mixed_precision=no means the word.
    return ("yes" if value else "no") if isinstance(value, bool) else value


@dataclass
class ModelConfig:
    source: ModelSource = "tiny_llama"
    """Where the base model comes from: minilm | smollm2 (offline packages), tiny_llama | tiny_gpt2 |
    tiny_bert (random init from a config, byte-level vocabulary) or hf (``name_or_path``: a local directory or
    a hub id)."""

    name_or_path: str | None = None
    """A local model directory, or a hub id (``org/model``: from the local Hugging Face cache under
    ``HF_HUB_OFFLINE=1``, downloaded otherwise); for source hf only (an error with any other source)."""

    task: Task = "causal_lm"
    """classification (sequence classification head) or causal_lm."""

    num_labels: int = 2
    """Number of classes for classification."""

    dtype: Dtype = "float32"
    """Parameter dtype of the base model: float32 | bfloat16 | float16."""

    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory (transformers' gradient checkpointing)."""

    quantize_base: QuantizeBase = "none"
    """none, or nf4: hold the adapted linears' frozen weights in 4-bit NormalFloat (torchao's NF4, as QLoRA),
    about 0.27x the bytes of bf16; the trained values stay in spra.value_dtype and embeddings, norms and the output
    head stay in dtype. Runs under none, ddp and fsdp2 (which all-gathers the packed weights); a merge writes
    dequant(W) + delta in dtype, never requantized."""

    hidden_size: PositiveInt = 64
    """Tiny models only: width of the residual stream."""

    num_layers: PositiveInt = 2
    """Tiny models only: number of transformer blocks."""

    num_heads: PositiveInt = 4
    """Tiny models only: attention heads (must divide hidden_size)."""

    intermediate_size: PositiveInt = 128
    """Tiny models only: width of the MLP."""

    max_position_embeddings: PositiveInt = 512
    """Tiny models only: longest sequence the position embeddings cover."""


@dataclass
class TrainConfig:
    __pydantic_config__ = ConfigDict(extra="forbid")  # also for the sections and entries inside: a typo is an error

    output_dir: str | None = None
    """Where the adapter, metrics and plots go; default runs/<config file stem>/."""

    max_steps: PositiveInt = 100
    """Number of optimizer steps."""

    seed: int = 0
    """Training seed: random init of tiny models, data order. The mask seed is spra.seed."""

    lr: float = 3e-3
    """Peak learning rate of the sparse values (default 3e-3)."""

    head_lr: float | None = None
    """Peak learning rate of spra.trainable_modules (the densely trained head); None: lr."""

    batch_size: PositiveInt = 32
    """Global batch: examples per optimizer step over all ranks and accumulation steps."""

    grad_accum: PositiveInt = 1
    """Micro batches per optimizer step on each rank; the micro batch is batch_size / (ranks * grad_accum)."""

    warmup_steps: NonNegativeInt = 0
    """Steps of linear warmup from 0 to the peak learning rate."""

    schedule: Schedule = "cosine"
    """Decay after warmup: cosine | linear (both to 0 at max_steps) | constant."""

    weight_decay: float = 0.0
    """AdamW weight decay of the dense modules (and of the sparse values if decay_spra_values)."""

    decay_spra_values: bool = False
    """Apply weight_decay to the sparse values too; off because decay pulls the deltas to zero."""

    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this value; None: no clipping."""

    eval_every: NonNegativeInt = 0
    """Evaluate every this many steps (0: only before and after training)."""

    log_every: PositiveInt = 10
    """Write a metrics line every this many steps."""

    eval_batch_size: PositiveInt = 64
    """Examples per forward pass in evaluation."""

    eval_generate: NonNegativeInt = 0
    """Causal LM with prompts (completion, alpaca, chat): greedily generate the answer of this many eval
    examples at each evaluation and report exact_match and contains; a few go to output_dir/samples.jsonl."""

    eval_generate_max_tokens: PositiveInt = 64
    """Most new tokens per generated answer."""

    engine: EngineName = "auto"
    """none | ddp | fsdp2 | deepspeed, or auto: what the launcher says (accelerate's config, a DeepSpeed
    preset given in deepspeed_config), else ddp for several processes and none for one."""

    deepspeed_config: str | None = None
    """DeepSpeed preset for engine deepspeed: a preset shipped with spra_dist (zero1, zero2, zero3,
    zero3_offload) or a JSON path; its "auto" values are filled from this config."""

    device: Device = "auto"
    """auto (each rank on its GPU, cuda:LOCAL_RANK, over nccl, when torch sees CUDA; else the CPU over gloo) |
    cuda | cpu."""

    mixed_precision: Annotated[MixedPrecision, BeforeValidator(_yaml_word)] = "auto"
    """no | bf16 (bf16 compute, fp32 master values: torch.autocast under none and ddp, the engine's own bf16
    under fsdp2 and deepspeed), or auto: accelerate's setting."""

    checkpoint_every: NonNegativeInt = 0
    """Write a resume checkpoint (O(k): values, AdamW moments, step, RNG) every this many steps; 0, the default,
    writes none, so a run that stops early has nothing to resume from."""

    checkpoint_keep: NonNegativeInt = 2
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

    report_to: TrackerName = "none"
    """none | tensorboard (event files in output_dir/tensorboard) | wandb (an offline run in output_dir/wandb):
    the scalars of metrics.jsonl and the config, from rank 0."""

    comm_stats: bool = False
    """Count the bytes handed to collectives per step (metrics.jsonl, summary.json)."""

    dist_timeout_s: PositiveInt = 300
    """Seconds any collective may wait for the other ranks before the job fails with an error naming the
    rank that did not arrive (a hung or stopped rank). Raise it if one step, or a checkpoint write, can
    take longer; the library defaults (10-30 min) leave a hung job waiting far longer."""

    on_nonfinite: OnNonfinite = "stop"
    """A non-finite loss or gradient norm on any rank: stop (save the last good state, exit with status 3)
    or skip (drop that step's update on every rank and count it in metrics.jsonl and summary.json)."""

    max_nonfinite_skips: PositiveInt = 10
    """With on_nonfinite=skip: this many dropped steps in a row end the run as stop does."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The base model."""

    data: DataConfig = field(default_factory=DataConfig)
    """The data set."""

    spra: SpraConfig = field(default_factory=SpraConfig)
    """Which matrices are adapted and how many entries each trains (spra_dist.SpraConfig)."""

    def validate(self) -> None:
        """Raise ValueError naming the bad value and the fix: each field's type, choice and bound, then the
        rules between fields."""
        from_dict(dataclasses.asdict(self))
        _check_data(self.data, self.model.task)
        if self.seed < 0:
            raise ValueError(f"seed={self.seed} must be a non-negative integer")
        if self.lr <= 0 or (self.head_lr is not None and self.head_lr <= 0):
            raise ValueError(f"lr={self.lr}, head_lr={self.head_lr}: learning rates must be > 0")
        if self.batch_size % self.grad_accum:
            raise ValueError(
                f"batch_size={self.batch_size} is not divisible by grad_accum={self.grad_accum}; "
                "pick a batch_size that is a multiple of grad_accum"
            )
        if self.model.task == "classification" and self.model.num_labels < 2:
            raise ValueError(f"model.num_labels={self.model.num_labels}: classification needs 2 or more classes")
        if self.model.source == "hf" and not self.model.name_or_path:
            raise ValueError("model.source=hf needs model.name_or_path=<local model directory or hub id, e.g. "
                             "HuggingFaceTB/SmolLM2-135M>")
        if self.model.name_or_path and self.model.source != "hf":
            raise ValueError(f"model.name_or_path={self.model.name_or_path!r} is read with model.source=hf only, and "
                             f"model.source is {self.model.source}: add model.source=hf to train on it")
        if self.model.source in ("minilm", "tiny_bert") and self.model.task != "classification":
            raise ValueError(f"model.source={self.model.source} is an encoder; set model.task=classification")
        if self.model.source == "smollm2" and self.model.task != "causal_lm":
            raise ValueError("model.source=smollm2 supports model.task=causal_lm only")
        if self.eval_generate and self.model.task != "causal_lm":
            raise ValueError("eval_generate needs model.task=causal_lm; classification reports accuracy and "
                             "macro_f1 already")
        check_tracker(self.report_to)  # its package is installed
        if self.stop_after is not None and not 0 < self.stop_after <= self.max_steps:
            raise ValueError(f"stop_after={self.stop_after} must lie in 1..max_steps={self.max_steps}")
        self.spra.validate()


def _check_data(data: DataConfig, task: str) -> None:
    if data.source is None:
        data.source = "datasets" if data.datasets else "synthetic"
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
            if (entry.type == "classification") != (task == "classification"):
                fits = "type classification" if task == "classification" else "one of the types " + ", ".join(
                    t for t in DATA_TYPES if t != "classification")
                raise ValueError(f"{where}.type={entry.type} does not fit model.task={task}; use {fits}")


def to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """Plain nested dict (for summary.json and the run's saved config)."""
    return dataclasses.asdict(cfg)


def from_dict(raw: dict[str, Any]) -> TrainConfig:
    """A TrainConfig from a nested mapping (``to_dict``'s shape, or a YAML file's), each value checked against
    its field's type and bounds; ValueError naming the first bad key, its value and what the field takes.
    Keys left out keep their defaults. The rules between fields are ``TrainConfig.validate``'s."""
    return typed(TrainConfig, raw)

