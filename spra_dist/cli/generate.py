"""``spra generate``: the greedy completion of a prompt by the base plus an adapter (and, with ``compare``, by
the base alone). What a user runs first after an SFT run.

    spra generate --adapter runs/smollm2_sft/adapter "Reverse the word: spark" --chat --compare

Decoding is the evaluation's own ``greedy`` (``spra_dist.train.eval``), text goes through the data pipeline's
``Codec``: the base's tokenizer, or bytes for the tiny random models.
"""

from __future__ import annotations

from pathlib import Path

import torch

from spra_dist.adapters.base import rebuild_quantized_base, resolve_base
from spra_dist.adapters.export import load_base
from spra_dist.adapters.files import load_adapter, read_adapter_config
from spra_dist.data.codec import BYTE_VOCAB, ByteCodec, Codec, HFCodec
from spra_dist.train.eval import greedy


def _codec(base: str, model) -> Codec:
    import transformers

    try:
        return HFCodec(transformers.AutoTokenizer.from_pretrained(base))
    except (OSError, ValueError, TypeError):
        if getattr(model.config, "vocab_size", None) == BYTE_VOCAB:
            return ByteCodec()
        raise ValueError(f"base {base!r} has no tokenizer; pass --base <a model directory with its tokenizer>") \
            from None


def _encode(codec: Codec, prompt: str, *, chat: bool) -> list[int]:
    if not chat:
        return codec.encode_pair(prompt, None, None)  # the prompt with the model's special tokens, uncut
    if not isinstance(codec, HFCodec):
        raise ValueError("--chat needs a tokenizer with a chat template; this base is byte-level")
    if not codec.chat_template:
        raise ValueError("--chat: this base's tokenizer has no chat template; drop --chat to give a plain prompt")
    ids = codec.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                              tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


@torch.no_grad()
def complete(model, codec: Codec, ids: list[int], *, max_new_tokens: int) -> str:
    """Greedy decoding of ``max_new_tokens`` (or up to EOS); the new text only."""
    model.eval()
    new = greedy(model, ids, max_new_tokens=max_new_tokens, stop_ids={codec.eos_id}, codec=codec, end_of_turn=None)
    return codec.decode(new)


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
    codec = _codec(base_dir, model)
    ids = _encode(codec, prompt, chat=chat)
    results = {}
    if compare:
        results["base"] = complete(model, codec, ids, max_new_tokens=max_new_tokens)
    load_adapter(model, adapter_dir)
    rebuild_quantized_base(model, config.get("base_quantization"))  # the base it was trained on, dequantized
    results["adapter"] = complete(model, codec, ids, max_new_tokens=max_new_tokens)
    return results
