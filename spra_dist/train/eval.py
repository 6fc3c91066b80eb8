"""Evaluation: loss and accuracy or perplexity over an eval set, and greedy answers scored against references.

    metrics = evaluate(model, splits.eval, task="causal_lm", pad_id=codec.pad_id, batch_size=64)
    scores, samples = generate_eval(model, splits.eval, codec=codec, n=32, max_new_tokens=64, end_of_turn=eot)

For ``generate_eval`` an eval example's prompt is its tokens before the first trained token; the reference is the
first trained span (the answer), read as text without its EOS / end-of-turn. Decoding is ``greedy``, with the
model's KV cache, through the same forward every engine runs (under FSDP2 and ZeRO-3 every rank takes part, same
inputs); ``spra generate`` decodes with it too.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from spra_dist.data.codec import Codec
from spra_dist.data.tokens import IGNORE, TokenSet, collate
from spra_dist.distributed.devices import model_device, to_device


@torch.no_grad()
def evaluate(model: nn.Module, tokens: TokenSet, *, task: str, pad_id: int, batch_size: int) -> dict[str, float]:
    """classification: accuracy, macro_f1 and eval_loss; causal_lm: eval_loss and perplexity over the
    supervised tokens (labels != -100), summed over the whole set, so the mean is per token, not per batch."""
    was_training = model.training
    model.eval()
    loss_sum, count = 0.0, 0
    predicted, gold = [], []
    order = np.argsort(tokens.lengths(), kind="stable").tolist()  # similar lengths pad less
    device = model_device(model)
    for start in range(0, len(tokens), batch_size):
        batch = to_device(collate(tokens, order[start: start + batch_size], pad_id=pad_id), device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        labels = batch["labels"]
        if task == "classification":
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
            predicted += logits.argmax(-1).tolist()
            gold += labels.tolist()
            count += len(labels)
        else:
            shifted = labels[:, 1:]
            loss_sum += F.cross_entropy(logits[:, :-1].flatten(0, 1), shifted.flatten(), ignore_index=-100,
                                        reduction="sum").item()
            count += int((shifted != -100).sum())
    model.train(was_training)
    mean = loss_sum / max(1, count)
    if task == "classification":
        right = sum(p == g for p, g in zip(predicted, gold, strict=True))
        return {"eval_loss": mean, "accuracy": right / max(1, count), "macro_f1": macro_f1(predicted, gold)}
    return {"eval_loss": mean, "perplexity": math.exp(min(mean, 50.0))}


def macro_f1(predicted: list[int], gold: list[int]) -> float:
    """Mean over the classes present in gold or predictions of F1 = 2TP / (2TP + FP + FN)."""
    scores = []
    for c in sorted(set(gold) | set(predicted)):
        tp = sum(p == c and g == c for p, g in zip(predicted, gold, strict=True))
        fp = sum(p == c and g != c for p, g in zip(predicted, gold, strict=True))
        fn = sum(p != c and g == c for p, g in zip(predicted, gold, strict=True))
        scores.append(2 * tp / max(1, 2 * tp + fp + fn))
    return sum(scores) / max(1, len(scores))


def prompts_and_answers(tokens: TokenSet, n: int) -> list[tuple[list[int], list[int]]]:
    """Up to ``n`` (prompt ids, answer ids) from the first eval examples that have a prompt."""
    out = []
    for i in range(len(tokens)):
        if len(out) == n:
            break
        ex = tokens.example(i)
        labels = ex["labels"]
        first = next((p for p in range(1, len(labels)) if labels[p] != IGNORE), None)
        if first is None:
            continue
        end = next((p for p in range(first, len(labels)) if labels[p] == IGNORE), len(labels))
        out.append((ex["input_ids"][:first], labels[first:end]))
    return out


def _clean(text: str, end_of_turn: str | None) -> str:
    if end_of_turn and end_of_turn in text:
        text = text[: text.index(end_of_turn)]
    return text.strip()


@torch.no_grad()
def greedy(model: nn.Module, prompt: list[int], *, max_new_tokens: int, stop_ids: set[int], codec: Codec,
           end_of_turn: str | None) -> list[int]:
    new: list[int] = []
    device = model_device(model)
    out = model(input_ids=torch.tensor([prompt], device=device), use_cache=True)
    for _ in range(max_new_tokens):
        token = int(out.logits[0, -1].argmax())
        if token in stop_ids:
            break
        new.append(token)
        out = model(input_ids=torch.tensor([[token]], device=device), cache=out.cache, use_cache=True)
        if end_of_turn and end_of_turn in codec.decode(new[-8:]):  # a multi-token end-of-turn (byte vocab)
            break
    return new


def generate_eval(model: nn.Module, tokens: TokenSet, *, codec: Codec, n: int, max_new_tokens: int,
                  end_of_turn: str | None = None) -> tuple[dict[str, float], list[dict]]:
    """exact_match and contains over ``n`` eval prompts, and the samples (prompt, reference, prediction)."""
    was_training = model.training
    model.eval()
    stop = {codec.eos_id}
    if end_of_turn:
        eot_ids = codec.encode_offsets([end_of_turn], special=False)[0][0]
        if len(eot_ids) == 1:
            stop.add(eot_ids[0])
    samples = []
    for prompt, answer in prompts_and_answers(tokens, n):
        reference = _clean(codec.decode([t for t in answer if t not in stop]), end_of_turn)
        out = greedy(model, prompt, max_new_tokens=max_new_tokens, stop_ids=stop, codec=codec,
                     end_of_turn=end_of_turn)
        prediction = _clean(codec.decode(out), end_of_turn)
        samples.append({"prompt": codec.decode(prompt), "reference": reference, "prediction": prediction,
                        "exact": prediction == reference, "contains": bool(reference) and reference in prediction})
    model.train(was_training)
    count = max(1, len(samples))
    return ({"exact_match": sum(s["exact"] for s in samples) / count,
             "contains": sum(s["contains"] for s in samples) / count}, samples)
