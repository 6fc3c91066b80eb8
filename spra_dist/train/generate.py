"""eval_generate: greedy answers to eval prompts, scored by exact match and by containment.

    scores, samples = generate_eval(model, splits.eval, codec=codec, n=32, max_new_tokens=64, end_of_turn=eot)

An eval example's prompt is its tokens before the first trained token; the reference is the first trained
span (the answer), read as text without its EOS / end-of-turn. Decoding is greedy with the model's KV cache,
through the same forward every engine runs (under FSDP2 and ZeRO-3 every rank takes part, same inputs).
"""

from __future__ import annotations

import torch
from torch import nn

from spra_dist.data.tokens import IGNORE, TokenSet
from spra_dist.devices import model_device
from spra_dist.train.models import Codec


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
