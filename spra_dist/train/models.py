"""Base models for training, all built offline: packaged checkpoints, a local directory, or tiny random ones.

    built = build_model(cfg.model, seed=cfg.seed)   # built.model, built.codec, built.from_config

Tiny models (tiny_llama, tiny_gpt2, tiny_bert) use a byte-level vocabulary (256 bytes + pad/bos/eos), so
they need no tokenizer file; their random init is seeded by the training seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from spra_dist.packaged import minilm_dir, smollm2_dir
from spra_dist.train.config import ModelConfig

BYTE_PAD, BYTE_BOS, BYTE_EOS = 256, 257, 258
BYTE_VOCAB = 259


class Codec(Protocol):
    """Text to token ids, the ways the data pipeline needs (spra_dist.data)."""

    pad_id: int
    eos_id: int
    eos_token: str
    bos_token: str
    chat_template: str | None
    """The tokenizer's own chat template (None when it has none)."""

    def encode_example(self, text: str, max_length: int) -> list[int]:
        """One example with the model's special tokens, truncated to max_length."""
        ...

    def encode_stream(self, text: str) -> list[int]:
        """A long text without special tokens (to be cut into causal-LM blocks)."""
        ...

    def encode_offsets(self, texts: list[str], *, special: bool) -> list[tuple[list[int], list[tuple[int, int]]]]:
        """Per text, token ids and each token's character span (special tokens added by the tokenizer get an
        empty span); ``special``: add the model's BOS / CLS tokens. One call for a batch (fast tokenizers
        encode it in parallel)."""
        ...

    def encode_pair(self, text: str, pair: str | None, max_length: int | None) -> list[int]:
        """A classification input: one text, or a pair, with the model's special tokens, truncated to
        max_length (None: not truncated)."""
        ...

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``, special tokens left out."""
        ...

    def piece(self, token_id: int) -> str:
        """The token as the vocabulary writes it (for spra preprocess --show)."""
        ...

    def fingerprint(self) -> str:
        """A string that changes whenever the tokenizer would tokenise differently (cache keys)."""
        ...


class ByteCodec:
    """UTF-8 bytes as ids 0..255; BOS opens an example, PAD fills batches, EOS ends a trained answer."""

    pad_id = BYTE_PAD
    eos_id = BYTE_EOS
    eos_token = "</s>"  # the EOS id has no text in a byte vocabulary; this is its name in messages
    bos_token = ""
    chat_template = None

    def encode_example(self, text: str, max_length: int) -> list[int]:
        return ([BYTE_BOS] + list(text.encode("utf-8")))[:max_length]

    def encode_stream(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_offsets(self, texts: list[str], *, special: bool) -> list[tuple[list[int], list[tuple[int, int]]]]:
        out = []
        for text in texts:
            ids, spans = ([BYTE_BOS], [(0, 0)]) if special else ([], [])
            for i, char in enumerate(text):
                data = char.encode("utf-8")
                ids += data
                spans += [(i, i + 1)] * len(data)
            out.append((ids, spans))
        return out

    def encode_pair(self, text: str, pair: str | None, max_length: int | None) -> list[int]:
        ids = [BYTE_BOS, *text.encode("utf-8")]
        ids = ids if pair is None else [*ids, BYTE_EOS, *pair.encode("utf-8")]
        return ids[:max_length]

    def piece(self, token_id: int) -> str:
        return {BYTE_PAD: "<pad>", BYTE_BOS: "<s>", BYTE_EOS: "</s>"}.get(token_id) or chr(token_id)

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def fingerprint(self) -> str:
        return "bytes-v1"


class HFCodec:
    """A transformers tokenizer behind the Codec interface."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else tokenizer.eos_token_id
        self.eos_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else self.pad_id
        self.eos_token = tokenizer.eos_token or ""
        self.bos_token = tokenizer.bos_token or ""
        self.chat_template = getattr(tokenizer, "chat_template", None) or None

    def encode_example(self, text: str, max_length: int) -> list[int]:
        return self.tokenizer(text, truncation=True, max_length=max_length)["input_ids"]

    def encode_stream(self, text: str) -> list[int]:
        # verbose=False: the "longer than model_max_length" warning does not apply to text cut into blocks.
        return self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]

    def encode_offsets(self, texts: list[str], *, special: bool) -> list[tuple[list[int], list[tuple[int, int]]]]:
        if not getattr(self.tokenizer, "is_fast", False):
            raise ValueError(f"{type(self.tokenizer).__name__} is a slow tokenizer: masks need character "
                             "offsets; save the model with a fast tokenizer (tokenizer.json)")
        out = self.tokenizer(texts, add_special_tokens=special, return_offsets_mapping=True, verbose=False)
        # Tokens the tokenizer added (BOS) come with an empty span, so no trained range selects them.
        return [(ids, [tuple(s) for s in spans]) for ids, spans in zip(out["input_ids"], out["offset_mapping"],
                                                                       strict=True)]

    def encode_pair(self, text: str, pair: str | None, max_length: int | None) -> list[int]:
        if max_length is None:
            return self.tokenizer(text, pair, verbose=False)["input_ids"]
        return self.tokenizer(text, pair, truncation=True, max_length=max_length)["input_ids"]

    def piece(self, token_id: int) -> str:
        return self.tokenizer.convert_ids_to_tokens(token_id)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def fingerprint(self) -> str:
        import hashlib

        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        text = backend.to_str() if backend is not None else repr(sorted(self.tokenizer.get_vocab().items()))
        extra = f"{type(self.tokenizer).__name__}|{self.tokenizer.eos_token}|{self.tokenizer.pad_token}"
        return hashlib.sha256((text + extra).encode()).hexdigest()


@dataclass
class BuiltModel:
    model: nn.Module
    """The base model (SpaRA not yet applied)."""

    codec: Codec
    """Tokenizer for the data pipeline."""

    from_config: bool
    """True when the weights are a random init: the recipe then saves them so merges are reproducible."""

    tokenizer: object | None = None
    """The transformers tokenizer, if any (saved next to merged models)."""


def build_model(cfg: ModelConfig, *, seed: int) -> BuiltModel:
    """Build the base model named by ``cfg.source``; ``seed`` fixes any random init (heads, tiny models)."""
    torch.manual_seed(seed)
    dtype = getattr(torch, cfg.dtype)
    match cfg.source:
        case "tiny_llama" | "tiny_gpt2" | "tiny_bert":
            built = BuiltModel(_tiny_model(cfg), ByteCodec(), from_config=True)
            built.model.to(dtype)
        case "minilm":
            built = _pretrained(minilm_dir(), cfg, dtype)
        case "smollm2":
            built = _pretrained(smollm2_dir(), cfg, dtype)
        case "hf":
            built = _pretrained(Path(cfg.name_or_path), cfg, dtype)
        case _:
            raise ValueError(f"model.source={cfg.source!r} is unknown; use minilm, smollm2, tiny_llama, "
                             "tiny_gpt2, tiny_bert or hf")
    model = built.model
    # save_pretrained writes this too, but adapters are saved before any save_pretrained: set it now so the
    # adapter's stored config names the class that merge must rebuild (e.g. BertForSequenceClassification).
    model.config.architectures = [type(model).__name__]
    if cfg.gradient_checkpointing:
        # Non-reentrant checkpointing: with frozen embeddings the reentrant variant would see no input
        # requiring grad and silently drop the gradients of everything inside the checkpointed blocks.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return built


def build_codec(cfg: ModelConfig) -> Codec:
    """The model's tokenizer alone (spra preprocess), without loading any weights."""
    match cfg.source:
        case "tiny_llama" | "tiny_gpt2" | "tiny_bert":
            return ByteCodec()
        case "minilm" | "smollm2" | "hf":
            import transformers as tf

            path = {"minilm": minilm_dir, "smollm2": smollm2_dir}.get(cfg.source, lambda: Path(cfg.name_or_path))()
            return HFCodec(tf.AutoTokenizer.from_pretrained(path))
        case _:
            raise ValueError(f"model.source={cfg.source!r} is unknown")


def _tiny_model(cfg: ModelConfig) -> nn.Module:
    import transformers as tf

    if cfg.hidden_size % cfg.num_heads:
        raise ValueError(f"model.hidden_size={cfg.hidden_size} is not divisible by model.num_heads="
                         f"{cfg.num_heads}; pick sizes where it is")
    ids = dict(vocab_size=BYTE_VOCAB, pad_token_id=BYTE_PAD, bos_token_id=BYTE_BOS, eos_token_id=BYTE_EOS)
    classify = cfg.task == "classification"
    match cfg.source:
        case "tiny_llama":
            config = tf.LlamaConfig(
                hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                num_key_value_heads=cfg.num_heads, max_position_embeddings=cfg.max_position_embeddings,
                tie_word_embeddings=False, num_labels=cfg.num_labels, **ids,
            )
            cls = tf.LlamaForSequenceClassification if classify else tf.LlamaForCausalLM
        case "tiny_gpt2":
            config = tf.GPT2Config(
                n_embd=cfg.hidden_size, n_inner=cfg.intermediate_size, n_layer=cfg.num_layers,
                n_head=cfg.num_heads, n_positions=cfg.max_position_embeddings, num_labels=cfg.num_labels,
                **ids,
            )
            cls = tf.GPT2ForSequenceClassification if classify else tf.GPT2LMHeadModel
        case _:  # tiny_bert; validate() allows it for classification only
            config = tf.BertConfig(
                hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                max_position_embeddings=cfg.max_position_embeddings, num_labels=cfg.num_labels, **ids,
            )
            cls = tf.BertForSequenceClassification
    return cls(config)


def _pretrained(path: Path, cfg: ModelConfig, dtype: torch.dtype) -> BuiltModel:
    import transformers as tf

    if not (path / "config.json").is_file():
        raise ValueError(f"model directory {str(path)!r} has no config.json; point model.name_or_path at a "
                         "directory written by save_pretrained")
    if cfg.task == "classification":
        model = tf.AutoModelForSequenceClassification.from_pretrained(path, num_labels=cfg.num_labels, dtype=dtype)
    else:
        model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    tokenizer = tf.AutoTokenizer.from_pretrained(path)
    if model.config.pad_token_id is None:
        # Decoder classifiers find the last real token through pad_token_id; LMs only need it for batching.
        model.config.pad_token_id = tokenizer.pad_token_id or tokenizer.eos_token_id
    return BuiltModel(model, HFCodec(tokenizer), from_config=False, tokenizer=tokenizer)
