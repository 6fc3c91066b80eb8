"""SpaRA under the Hugging Face ``Trainer``: adapter-only checkpoints, and DeepSpeed presets it accepts.

    from spra_dist.distributed.group import init_distributed
    from spra_dist.integrations.hf import SpraAdapterCallback, hf_deepspeed_config

    init_distributed()                     # join the launcher's group first, so ranks agree on the mask seed
    model = apply_spra(model, SpraConfig(lora_rank=8, seed=1234))
    args = TrainingArguments(output_dir="runs/hf", save_steps=50, deepspeed=hf_deepspeed_config("zero2"), ...)
    Trainer(model=model, args=args, train_dataset=data, callbacks=[SpraAdapterCallback()]).train()
    # runs/hf/checkpoint-50/adapter/, runs/hf/checkpoint-100/adapter/, ..., runs/hf/adapter/

Launch it like any Trainer script (``torchrun --nproc_per_node 8 train.py``, ``accelerate launch``,
``deepspeed``). On CPU, ``TrainingArguments(use_cpu=True, ddp_backend="gloo")``: without them the
processes train unsynchronised.

Why a callback and which hook: the Trainer saves a checkpoint when ``control.should_save`` is true after a
step (or an epoch), writing the whole model (``save_pretrained``), its optimizer state and, under DeepSpeed, a
full engine checkpoint. For a SpaRA model all that is the frozen base again, for every checkpoint. Callbacks
are the Trainer's documented way to steer its loop through ``TrainerControl``: ``SpraAdapterCallback`` runs
after the Trainer's own flow callback has raised ``should_save``, writes ``checkpoint-<step>/adapter/`` itself
and lowers the flag, so the Trainer writes no weights at all. The price: those checkpoints hold no optimizer
state, so ``resume_from_checkpoint`` cannot use them; pass ``adapter_only=False`` to keep the Trainer's full
checkpoints (needed for ``load_best_model_at_end``) with an ``adapter/`` added to each.
"""

from __future__ import annotations

import re
from pathlib import Path

from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from spra_dist.adapters.files import CONFIG_NAME, WEIGHTS_NAME, save_adapter
from spra_dist.core.model import spra_modules
from spra_dist.core.quantized import compute_dtype
from spra_dist.core.registry import spra_config
from spra_dist.distributed.deepspeed import load_deepspeed_config
from spra_dist.distributed.tensors import is_sharded, unwrap
from spra_dist.utils.atomic import remove_files

ADAPTER_DIR = "adapter"
# "auto" keys under zero_optimization that the Trainer fills from the model's hidden size; DeepSpeed would
# reject any other "auto" string there, so those are dropped to DeepSpeed's defaults.
_HF_FILLED_ZERO_KEYS = ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold")
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def hf_deepspeed_config(preset: str = "zero2") -> dict:
    """A spra_dist DeepSpeed preset (name or path) as a dict for ``TrainingArguments(deepspeed=...)``.

    The top-level ``"auto"`` values (batch sizes, accumulation, clipping, bf16) stay for the Trainer to fill
    from its arguments; ``"auto"`` bucket sizes the Trainer does not know are removed. The preset has no
    optimizer or scheduler block, so the Trainer builds AdamW over the trainable (sparse) values.
    """
    config = load_deepspeed_config(preset)
    zero = config.get("zero_optimization", {})
    for key in [k for k, v in zero.items() if v == "auto" and k not in _HF_FILLED_ZERO_KEYS]:
        del zero[key]
    return config


class SpraAdapterCallback(TrainerCallback):
    """Saves ``adapter/`` (``save_adapter``: the k values per matrix + config) at each Trainer save and at the end.

    ``adapter_only=True`` (default): checkpoints are ``<output_dir>/checkpoint-<step>/adapter/`` plus
    ``trainer_state.json``, and the Trainer writes no model weights; ``save_total_limit`` still applies.
    ``adapter_only=False``: the Trainer's full checkpoints, each with an ``adapter/`` inside.
    At the end of training the adapter also goes to ``<output_dir>/adapter/``.
    Every rank runs the callbacks, which the gather under FSDP / ZeRO-3 needs; rank 0 writes.

    Under TRL with ``use_vllm=True`` it refuses to start unless the trainer sends vLLM the merged weights
    (``spra_dist.integrations.trl.SpraGRPOTrainer`` does, and sets ``vllm_gets_merged_weights``): TRL's own sync
    would push the frozen base weights, and the adapter would never reach the rollouts.
    """

    def __init__(self, *, adapter_only: bool = True) -> None:
        self.adapter_only = adapter_only
        self.vllm_gets_merged_weights = False

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self.adapter_only and args.load_best_model_at_end:
            raise ValueError("load_best_model_at_end=True reloads a full Trainer checkpoint, which adapter-only "
                             "saving does not write; use SpraAdapterCallback(adapter_only=False)")
        model = kwargs.get("model")
        if model is None or not _has_spra(model):
            raise ValueError("SpraAdapterCallback needs a model passed through apply_spra (or load_adapter) "
                             "before Trainer(model=...)")
        if getattr(args, "use_vllm", False) and not self.vllm_gets_merged_weights:
            raise ValueError("use_vllm=True with a SpaRA model: TRL's trainer pushes model.named_parameters() to "
                             "vLLM, the frozen base weights (and the k values under names vLLM has no parameter "
                             "for), so the adapter never reaches the rollouts. Use "
                             "spra_dist.integrations.trl.SpraGRPOTrainer, which sends W + delta, or use_vllm=False")
        _restore_value_dtype(model)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self._save_instead_of_trainer(args, state, control, kwargs["model"])

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self._save_instead_of_trainer(args, state, control, kwargs["model"])

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        # Reached only when the Trainer did save: adapter_only=False, or a save it decided after evaluating
        # (save_strategy="best"), which comes after the hooks above.
        save_adapter(kwargs["model"], _checkpoint_dir(args, state) / ADAPTER_DIR)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        save_adapter(kwargs["model"], Path(args.output_dir) / ADAPTER_DIR)

    def _save_instead_of_trainer(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                                 model) -> None:
        if not (self.adapter_only and control.should_save):
            return
        control.should_save = False
        folder = _checkpoint_dir(args, state)
        save_adapter(model, folder / ADAPTER_DIR)  # every rank: a collective under FSDP / ZeRO-3
        if args.should_save:  # the process that writes files (rank 0, or each node's rank 0 if save_on_each_node)
            state.save_to_json(str(folder / "trainer_state.json"))
            _rotate(Path(args.output_dir), keep=args.save_total_limit)


def _restore_value_dtype(model: nn.Module) -> None:
    """Give the values back the dtype the adapter's config sets (fp32 by default): TRL casts every trainable
    parameter of a 4-bit model to bf16 (QLoRA's recipe for LoRA), and Adam's small updates then vanish in the values'
    rounding. The optimizer holds the same parameter objects, and its state is created at the first step."""
    model = unwrap(model)
    cfg = spra_config(model)
    for _, m in spra_modules(model):
        want = cfg.values_dtype_for(compute_dtype(m.weight))
        p = m.spra_values
        if p.dtype != want and not is_sharded(p):
            p.data = p.data.to(want)


def _has_spra(model) -> bool:
    return spra_config(unwrap(model)) is not None


def _checkpoint_dir(args: TrainingArguments, state: TrainerState) -> Path:
    # The Trainer's own naming (PREFIX_CHECKPOINT_DIR), so its tools and habits find these folders.
    return Path(args.output_dir) / f"checkpoint-{state.global_step}"


def _rotate(output_dir: Path, *, keep: int | None) -> None:
    """Delete the oldest ``checkpoint-<step>`` folders beyond ``keep``, as the Trainer's save_total_limit does."""
    if not keep or keep <= 0:
        return
    found = sorted((int(m.group(1)), p) for p in output_dir.iterdir() if (m := _CHECKPOINT.match(p.name)))
    for _, path in found[:-keep]:  # our own files only: anything else in the folder stays, and so does it
        remove_files(path / ADAPTER_DIR, (WEIGHTS_NAME, CONFIG_NAME))
        remove_files(path, ("trainer_state.json",))
