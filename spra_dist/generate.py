"""``spra generate``: the greedy completion of a prompt by the base plus an adapter (and, with ``compare``, by
the base alone). What a user runs first after an SFT run.

    spra generate --adapter runs/smollm2_sft/adapter "Reverse the word: spark" --chat --compare
"""

from __future__ import annotations

from pathlib import Path

import torch

from spra_dist.adapter import load_adapter, read_adapter_config
from spra_dist.base_model import resolve_base
from spra_dist.merge import load_base

# The byte-level vocabulary of the recipe's tiny models (spra_dist.train.models): 256 bytes, pad, bos, eos.
_BYTE_VOCAB, _BYTE_BOS = 259, 257


class _Bytes:
    """Text as UTF-8 bytes, for the tiny models that have no tokenizer."""

    eos_token_id = 258
    pad_token_id = 256

    def encode(self, text: str) -> list[int]:
        return [_BYTE_BOS, *text.encode("utf-8")]

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def _tokenizer(base: str, model):
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(base)
    except (OSError, ValueError, TypeError):
        if getattr(model.config, "vocab_size", None) == _BYTE_VOCAB:
            return _Bytes()
        raise ValueError(f"base {base!r} has no tokenizer; pass --base <a model directory with its tokenizer>") \
            from None


def _encode(tokenizer, prompt: str, *, chat: bool) -> list[int]:
    if isinstance(tokenizer, _Bytes):
        if chat:
            raise ValueError("--chat needs a tokenizer with a chat template; this base is byte-level")
        return tokenizer.encode(prompt)
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("--chat: this base's tokenizer has no chat template; drop --chat to give a plain prompt")
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    return tokenizer(prompt).input_ids


@torch.no_grad()
def complete(model, tokenizer, ids: list[int], *, max_new_tokens: int) -> str:
    """Greedy decoding of ``max_new_tokens`` (or up to EOS); the new text only."""
    model.eval()
    prompt = torch.tensor([ids])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, len(ids):].tolist(), skip_special_tokens=True) \
        if not isinstance(tokenizer, _Bytes) else tokenizer.decode(out[0, len(ids):].tolist())


def generate(adapter_dir: str | Path, prompt: str, *, base: str | None = None, max_new_tokens: int = 64,
             chat: bool = False, compare: bool = False) -> dict[str, str]:
    """``{"adapter": completion}`` (and ``"base"`` first, with ``compare``) for ``prompt``."""
    if max_new_tokens <= 0:
        raise ValueError(f"--max-new-tokens {max_new_tokens}: give a positive number of tokens")
    adapter_dir = Path(adapter_dir)
    config, _ = read_adapter_config(adapter_dir)
    recorded = (config.get("base_model") or {}).get("name_or_path")
    if not (base or recorded):
        raise ValueError(f"adapter {adapter_dir} records no base model; pass --base <model directory>")
    base_dir = resolve_base(base or recorded, adapter=adapter_dir)
    model = load_base(config, base_dir, adapter=adapter_dir)
    tokenizer = _tokenizer(base_dir, model)
    ids = _encode(tokenizer, prompt, chat=chat)
    results = {}
    if compare:
        results["base"] = complete(model, tokenizer, ids, max_new_tokens=max_new_tokens)
    load_adapter(model, adapter_dir)
    results["adapter"] = complete(model, tokenizer, ids, max_new_tokens=max_new_tokens)
    return results
