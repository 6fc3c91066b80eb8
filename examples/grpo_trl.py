"""SpaRA under TRL's GRPOTrainer: SmolLM2-135M-Instruct learns to answer dates in ISO 8601, rewarded by checks.

    HF_HUB_OFFLINE=1 python examples/grpo_trl.py --out runs/grpo_trl [--steps 30] [--model smollm2|DIR]

The questions come from the dates task (``spra_dist.demos.dates``: "Convert to YYYY-MM-DD: March 12, 2015"); the
base answers in prose most of the time and, sampled, with a bare date now and then: enough for GRPO to learn
from. Two verifiable rewards, summed by TRL: ``iso_format`` (1 when the answer's first line is a YYYY-MM-DD date)
and ``iso_correct`` (the share of year, month and day that are right, for an answer in that format).

``SpraGRPOTrainer`` is TRL's GRPOTrainer whose KL reference is the policy itself with its adapter bypassed, so no
second model is loaded. Before and after training the script answers held-out questions greedily and reports the
mean reward and the exact-match rate; ``SpraAdapterCallback`` writes the adapter to ``<out>/adapter``. It computes
in fp32 (``--bf16`` for bf16 autocast: on a CPU without native bf16 matrix units it runs many times slower).
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import time
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import GRPOConfig

from spra_dist import SpraConfig, apply_spra, merge_adapter
from spra_dist.demos.dates import rows
from spra_dist.demos.packaged import PACKAGED
from spra_dist.integrations.hf import SpraAdapterCallback
from spra_dist.integrations.trl import SpraGRPOTrainer

ISO = re.compile(r"\d{4}-\d{2}-\d{2}")


def text_of(completion) -> str:
    """A completion as text: TRL passes chat completions as a list of messages."""
    return completion[-1]["content"] if isinstance(completion, list) else completion


def first_line(completion) -> str:
    return text_of(completion).strip().split("\n")[0].strip()


def iso_format(completions, **_) -> list[float]:
    return [float(ISO.fullmatch(first_line(c)) is not None) for c in completions]


def iso_correct(completions, answer, **_) -> list[float]:
    scores = []
    for c, truth in zip(completions, answer, strict=True):
        line = first_line(c)
        fields = zip(line.split("-"), truth.split("-"), strict=True) if ISO.fullmatch(line) else ()
        scores.append(sum(a == b for a, b in fields) / 3)
    return scores


def questions(count: int, *, seed: int) -> Dataset:
    picked = rows(count, seed=seed)
    return Dataset.from_dict({"prompt": [[m["messages"][0]] for m in picked],
                              "answer": [m["messages"][1]["content"] for m in picked]})


@torch.no_grad()
def score(model, tokenizer, held_out: Dataset, *, max_new_tokens: int, bf16: bool) -> dict[str, float]:
    """Greedy answers of the merged model (a plain transformers model, as deployed) to the held-out questions: the
    mean total reward, the share in the format, and the share answered exactly."""
    model = merge_adapter(copy.deepcopy(model)).eval()
    tokenizer.padding_side = "left"
    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in held_out["prompt"]]
    answers = []
    for start in range(0, len(texts), 16):
        enc = tokenizer(texts[start:start + 16], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        answers += tokenizer.batch_decode(out[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
    fmt, correct = iso_format(answers), iso_correct(answers, held_out["answer"])
    exact = [first_line(a) == t for a, t in zip(answers, held_out["answer"], strict=True)]
    return {"reward": sum(map(sum, zip(fmt, correct, strict=True))) / len(answers), "format": sum(fmt) / len(fmt),
            "exact_match": sum(exact) / len(exact), "example": answers[0]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/grpo_trl")
    p.add_argument("--model", default="smollm2", help="packaged model (smollm2) or a model directory with a tokenizer")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--prompts", type=int, default=4, help="questions per step, each sampled --generations times")
    p.add_argument("--generations", type=int, default=4)
    p.add_argument("--eval", type=int, default=64, help="held-out questions answered before and after")
    p.add_argument("--max-new-tokens", type=int, default=14)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=False, help="bf16 autocast")
    args = p.parse_args()

    started = time.perf_counter()
    base = PACKAGED[args.model]() if args.model in PACKAGED else Path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = apply_spra(model, SpraConfig(target_modules="all-linear", lora_rank=8, seed=1234))
    held_out = questions(args.eval, seed=1)  # the dates task's eval seed: disjoint from training
    before = score(model, tokenizer, held_out, max_new_tokens=args.max_new_tokens, bf16=args.bf16)

    config = GRPOConfig(output_dir=args.out, use_cpu=True, bf16=args.bf16, max_steps=args.steps,
                        per_device_train_batch_size=args.prompts * args.generations,
                        num_generations=args.generations, max_completion_length=args.max_new_tokens,
                        learning_rate=args.lr, lr_scheduler_type="constant", beta=0.04, temperature=1.0,
                        gradient_checkpointing=False, logging_steps=min(5, args.steps), save_strategy="no", report_to=[], seed=0)
    trainer = SpraGRPOTrainer(model=model, reward_funcs=[iso_format, iso_correct], args=config,
                              train_dataset=questions(args.steps * args.prompts, seed=0),
                              processing_class=tokenizer, callbacks=[SpraAdapterCallback()])
    trainer.train()
    model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    after = score(model, tokenizer, held_out, max_new_tokens=args.max_new_tokens, bf16=args.bf16)
    logged = [h for h in trainer.state.log_history if "reward" in h]
    result = {"held_out_before": before, "held_out_after": after,
              "train_reward_first": logged[0]["reward"], "train_reward_last": logged[-1]["reward"],
              "steps": args.steps, "completions_per_step": args.prompts * args.generations, "bf16": args.bf16,
              "wall_s": round(time.perf_counter() - started, 1)}
    Path(args.out, "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
