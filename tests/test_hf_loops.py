"""SpaRA in the training loops users already have, one process on CPU: the HF Trainer with bf16 autocast, and
TRL's SFTTrainer on prompt/completion data, each with and without gradient checkpointing.

Each run must lower the loss, change nothing but the adapter's values, and leave an adapter (written by
SpraAdapterCallback) that reloads onto a fresh base to the trained model's logits, bit for bit.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import batch, tiny_llama, tiny_tokenizer

from spra_dist import SpraConfig, apply_spra, load_adapter
from spra_dist.integrations.hf import SpraAdapterCallback

pytestmark = pytest.mark.slow  # each test trains end to end with the HF Trainer or TRL

STEPS = 8


class FewMotifs(torch.utils.data.Dataset):
    """64 blocks drawn from 4 repeating motifs: a loss that falls visibly within a few steps."""

    def __init__(self) -> None:
        motifs = torch.randint(3, 128, (4, 4), generator=torch.Generator().manual_seed(0)).repeat(1, 4)
        self.blocks = motifs.repeat(16, 1)

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def check_trained(trainer, before: dict[str, torch.Tensor], adapter_dir, *, vocab: int = 128):
    model, accelerator = trainer.model, trainer.accelerator
    assert accelerator.mixed_precision == "bf16"
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == STEPS and sum(losses[-2:]) < sum(losses[:2]), losses
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    values = {n for n in before if n.endswith("spra_values")}
    assert changed == values, f"changed outside the adapter: {sorted(changed - values)[:3]}"
    assert all(model.get_parameter(n).dtype == torch.float32 for n in values)  # fp32 master values under bf16

    # Compared in fp32: the accelerate wrapper that runs the trained model's forward under autocast comes off.
    model = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    fresh = load_adapter(tiny_llama(vocab=vocab), adapter_dir)
    ids = batch(seed=7) % vocab
    model.eval()
    with torch.no_grad():
        trained, reloaded = model(input_ids=ids).logits, fresh(input_ids=ids).logits
    assert torch.equal(trained, reloaded)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "grad_ckpt"])
def test_trainer_bf16(checkpointing, tmp_path):
    from transformers import Trainer, TrainingArguments

    model = apply_spra(tiny_llama(), SpraConfig(lora_rank=2, seed=1234))
    before = snapshot(model)
    args = TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, bf16=True, gradient_checkpointing=checkpointing,
        per_device_train_batch_size=8, max_steps=STEPS, learning_rate=5e-2, warmup_steps=0, logging_steps=1,
        save_strategy="no", report_to=[], disable_tqdm=True, seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=FewMotifs(), callbacks=[SpraAdapterCallback()])
    trainer.train()
    assert model.is_gradient_checkpointing == checkpointing
    check_trained(trainer, before, tmp_path / "adapter")


FACTS = [("the colour of snow is", "white"), ("the colour of grass is", "green"), ("the colour of sky is", "blue"),
         ("the colour of coal is", "black"), ("the colour of blood is", "red"), ("the colour of sun is", "yellow"),
         ("the colour of night is", "dark"), ("the colour of day is", "bright"), ("two plus two makes", "four"),
         ("three plus three makes", "six"), ("five plus five makes", "ten"), ("one plus one makes", "two")]


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "grad_ckpt"])
def test_trl_sft_prompt_completion(checkpointing, tmp_path):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    tokenizer = tiny_tokenizer()
    model = apply_spra(tiny_llama(vocab=len(tokenizer)), SpraConfig(lora_rank=2, seed=1234))
    before = snapshot(model)
    # TRL joins prompt and completion as strings: the completion brings its own leading space.
    data = Dataset.from_dict({"prompt": [p for p, _ in FACTS] * 4, "completion": [" " + c for _, c in FACTS] * 4})
    # SFTConfig's own defaults: bf16 autocast on, loss on the completion only.
    args = SFTConfig(
        output_dir=str(tmp_path), use_cpu=True, gradient_checkpointing=checkpointing, per_device_train_batch_size=8,
        max_steps=STEPS, learning_rate=3e-2, warmup_steps=0, logging_steps=1, save_strategy="no", report_to=[],
        disable_tqdm=True, seed=0, dataset_num_proc=None,
    )
    assert args.bf16 and args.completion_only_loss is not False
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                         callbacks=[SpraAdapterCallback()])
    row = trainer.train_dataset[0]  # TRL's own prompt/completion processing: the loss sees the completion only
    assert row["labels"] == [-100] * 5 + row["input_ids"][5:] and row["input_ids"][-1] == tokenizer.eos_token_id
    assert tokenizer.unk_token_id not in row["input_ids"]
    trainer.train()
    assert model.is_gradient_checkpointing == checkpointing
    check_trained(trainer, before, tmp_path / "adapter", vocab=len(tokenizer))
