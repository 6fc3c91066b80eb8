"""Text to token ids, the ways the data pipeline needs: the ``Codec`` interface and its two implementations.

    codec = HFCodec(AutoTokenizer.from_pretrained(path))   # a transformers tokenizer
    codec = ByteCodec()                                      # UTF-8 bytes, for the tiny random models

The tiny models (``tiny_llama``, ``tiny_gpt2``, ``tiny_bert``) have a byte-level vocabulary of 256 bytes plus pad,
bos and eos, so they need no tokenizer file.
"""

from __future__ import annotations

import hashlib
from typing import Protocol

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
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        text = backend.to_str() if backend is not None else repr(sorted(self.tokenizer.get_vocab().items()))
        extra = f"{type(self.tokenizer).__name__}|{self.tokenizer.eos_token}|{self.tokenizer.pad_token}"
        return hashlib.sha256((text + extra).encode()).hexdigest()
