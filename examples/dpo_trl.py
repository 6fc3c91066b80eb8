"""SpaRA under TRL's DPOTrainer: SmolLM2-135M-Instruct learns to prefer the right ISO 8601 date, all offline.

    HF_HUB_OFFLINE=1 python examples/dpo_trl.py --out runs/dpo_trl [--steps 40] [--model smollm2|DIR]

Preference pairs from the dates task (``spra_dist.demos.dates``), where the better answer is known: the prompt asks
for a date in YYYY-MM-DD; ``chosen`` is the right ISO date; ``rejected`` is, in turn, the date restated in words
(the prose SmolLM2 tends to answer with), the ISO date with month and day swapped, or with the month one off.

``SpraDPOTrainer`` is TRL's DPOTrainer whose reference is the policy itself with its adapter bypassed, so no
second model is loaded. Before and after training the script scores held-out pairs: the share where the model
finds the chosen answer more likely than the rejected one (summed log-probabilities of the answer given the
prompt); ``SpraAdapterCallback`` writes the adapter to ``<out>/adapter``. It computes in fp32 (``--bf16`` for
bf16 autocast: on a CPU without native bf16 matrix units it runs many times slower).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from datetime import date
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig

from spra_dist import SpraConfig, apply_spra, merge_adapter
from spra_dist.demos.dates import rows, spoken
from spra_dist.demos.packaged import PACKAGED
from spra_dist.integrations.hf import SpraAdapterCallback
from spra_dist.integrations.trl import SpraDPOTrainer


def worse(answer: str, kind: int) -> str:
    """A wrong answer to a question whose right answer is ``answer``: prose, day and month swapped, a month off."""
    day = date.fromisoformat(answer)
    if kind == 0:
        return spoken(day, 0)
    if kind == 1 and day.day <= 12 and day.day != day.month:
        return f"{day.year:04d}-{day.day:02d}-{day.month:02d}"
    return f"{day.year:04d}-{day.month % 12 + 1:02d}-{day.day:02d}"


def pairs(count: int, *, seed: int) -> Dataset:
    picked = rows(count, seed=seed)
    answers = [r["messages"][1]["content"] for r in picked]
    return Dataset.from_dict({"prompt": [[r["messages"][0]] for r in picked],
                              "chosen": [[{"role": "assistant", "content": a}] for a in answers],
                              "rejected": [[{"role": "assistant", "content": worse(a, i % 3)}]
                                           for i, a in enumerate(answers)]})


@torch.no_grad()
def answer_logps(model, tokenizer, prompts: list[list[dict]], answers: list[str], *, bf16: bool) -> torch.Tensor:
    """log p(answer | prompt) under the chat template, summed over each answer's tokens, 16 sequences at a time."""
    out = []
    for start in range(0, len(prompts), 16):
        contexts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
                    for p in prompts[start:start + 16]]
        firsts = [len(tokenizer(c, add_special_tokens=False).input_ids) for c in contexts]
        enc = tokenizer([c + a for c, a in zip(contexts, answers[start:start + 16], strict=True)],
                        return_tensors="pt", padding=True, add_special_tokens=False)  # right-padded
        with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(**enc).logits[:, :-1].float()
        token_logp = logits.log_softmax(-1).gather(-1, enc.input_ids[:, 1:, None])[..., 0]
        position = torch.arange(1, enc.input_ids.shape[1])
        scored = (position[None] >= torch.tensor(firsts)[:, None]) & enc.attention_mask[:, 1:].bool()
        out.append((token_logp * scored).sum(-1))
    return torch.cat(out)


def preference_accuracy(model, tokenizer, held_out: Dataset, *, bf16: bool) -> float:
    """The share of held-out pairs where the merged model (a plain transformers model, as deployed) finds the
    chosen answer more likely than the rejected one."""
    model = merge_adapter(copy.deepcopy(model)).eval()
    tokenizer.padding_side = "right"
    chosen, rejected = ([r[0]["content"] for r in held_out[key]] for key in ("chosen", "rejected"))
    wins = (answer_logps(model, tokenizer, held_out["prompt"], chosen, bf16=bf16)
            > answer_logps(model, tokenizer, held_out["prompt"], rejected, bf16=bf16))
    return float(wins.float().mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/dpo_trl")
    p.add_argument("--model", default="smollm2", help="packaged model (smollm2) or a model directory with a tokenizer")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=8, help="preference pairs per step")
    p.add_argument("--eval", type=int, default=150, help="held-out pairs scored before and after")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=False, help="bf16 autocast")
    args = p.parse_args()

    started = time.perf_counter()
    base = PACKAGED[args.model]() if args.model in PACKAGED else Path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = apply_spra(model, SpraConfig(target_modules="all-linear", lora_rank=8, seed=1234))
    held_out = pairs(args.eval, seed=1)  # the dates task's eval seed: disjoint from training
    before = preference_accuracy(model, tokenizer, held_out, bf16=args.bf16)

    config = DPOConfig(output_dir=args.out, use_cpu=True, bf16=args.bf16, max_steps=args.steps,
                       per_device_train_batch_size=args.batch, learning_rate=args.lr, lr_scheduler_type="cosine",
                       warmup_steps=4, beta=0.1, gradient_checkpointing=False, logging_steps=min(5, args.steps),
                       save_strategy="no", report_to=[], seed=0)
    trainer = SpraDPOTrainer(model=model, args=config, train_dataset=pairs(args.steps * args.batch, seed=0),
                             processing_class=tokenizer, callbacks=[SpraAdapterCallback()])
    trainer.train()
    model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    after = preference_accuracy(model, tokenizer, held_out, bf16=args.bf16)
    logged = [h for h in trainer.state.log_history if "rewards/accuracies" in h]
    result = {"held_out_preference_accuracy_before": before, "held_out_preference_accuracy_after": after,
              "train_loss_first": logged[0]["loss"], "train_loss_last": logged[-1]["loss"],
              "train_reward_accuracy_last": logged[-1]["rewards/accuracies"], "steps": args.steps,
              "pairs_per_step": args.batch, "bf16": args.bf16, "wall_s": round(time.perf_counter() - started, 1)}
    Path(args.out, "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
