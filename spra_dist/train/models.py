"""Base models for training: packaged checkpoints, a saved model (local or a hub id), or tiny random ones.

    built = build_model(cfg.model, seed=cfg.seed)   # built.model, built.codec, built.from_config

A saved model under an engine that shards the base (``meta=True``: FSDP2, ZeRO-3) is built on the meta device
from its config alone; ``built.base`` names its files, which each rank reads after sharding
(spra_dist.distributed.loading). Without sharding every rank loads the whole base with ``from_pretrained``.

``model.name_or_path`` (source hf) is a local directory or a hub id, resolved by transformers: from the local
cache when ``HF_HUB_OFFLINE=1``, downloaded otherwise (spra_dist.utils.hub). Adapters record the id as the base.

Tiny models (tiny_llama, tiny_gpt2, tiny_bert) use a byte-level vocabulary (256 bytes + pad/bos/eos), so
they need no tokenizer file; their random init is seeded by the training seed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from spra_dist.data.codec import BYTE_BOS, BYTE_EOS, BYTE_PAD, BYTE_VOCAB, ByteCodec, Codec, HFCodec
from spra_dist.demos.packaged import minilm_dir, smollm2_dir
from spra_dist.distributed.loading import BaseCheckpoint, initial_values
from spra_dist.train.load_report import from_pretrained, say_new_head, split_missing
from spra_dist.train.schema import MODEL_SOURCES, ModelConfig
from spra_dist.utils.hub import model_files, model_source, not_found, read_model_config


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

    base: BaseCheckpoint | None = None
    """The saved weights still to load, when the model was built on the meta device; None when they are loaded."""

    initial: dict[str, torch.Tensor] = field(default_factory=dict)
    """With ``base``: the values ``from_pretrained`` would give the parameters the base lacks (a new task head),
    drawn at the same point of the random stream."""


def build_model(cfg: ModelConfig, *, seed: int, meta: bool = False) -> BuiltModel:
    """Build the base model named by ``cfg.source``; ``seed`` fixes any random init (heads, tiny models).

    ``meta``: build a saved model on the meta device and leave its weights in ``built.base``, for an engine that
    shards the base and loads each rank's part (tiny models are random inits, built whole as always)."""
    torch.manual_seed(seed)
    dtype = getattr(torch, cfg.dtype)
    match cfg.source:
        case "tiny_llama" | "tiny_gpt2" | "tiny_bert":
            built = BuiltModel(_tiny_model(cfg), ByteCodec(), from_config=True)
            built.model.to(dtype)
        case "minilm":
            built = _pretrained(minilm_dir(), cfg, dtype, meta=meta)
        case "smollm2":
            built = _pretrained(smollm2_dir(), cfg, dtype, meta=meta)
        case "hf":
            built = _pretrained(cfg.name_or_path, cfg, dtype, meta=meta)
        case _:
            raise ValueError(f"model.source={cfg.source!r} is not one of {', '.join(MODEL_SOURCES)}")
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

            if cfg.source == "hf":
                path = model_source(cfg.name_or_path, what="model.name_or_path")
            else:
                path = {"minilm": minilm_dir, "smollm2": smollm2_dir}[cfg.source]()
            try:
                return HFCodec(tf.AutoTokenizer.from_pretrained(path))
            except OSError as err:
                raise not_found(str(path), err, what="model.name_or_path") from None
        case _:
            raise ValueError(f"model.source={cfg.source!r} is not one of {', '.join(MODEL_SOURCES)}")


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


def _pretrained(name_or_path: str | Path, cfg: ModelConfig, dtype: torch.dtype, *, meta: bool) -> BuiltModel:
    """A saved model: a local directory or a hub id (resolved by transformers; see spra_dist.utils.hub)."""
    import transformers as tf

    what = "model.name_or_path"
    source = model_source(str(name_or_path), what=what)
    _check_prequantized(source, read_model_config(source, what=what), cfg, meta=meta)
    auto = tf.AutoModelForSequenceClassification if cfg.task == "classification" else tf.AutoModelForCausalLM
    labels = {"num_labels": cfg.num_labels} if cfg.task == "classification" else {}
    base, initial = None, {}
    try:
        if meta:
            files = model_files(source, what=what)  # each rank reads its own slices of these safetensors
            model = _on_meta(auto, files, dtype, labels)
            model.config._name_or_path = source  # the adapter records the hub id, not the cache path
            base = BaseCheckpoint.open(files)
            initial = initial_values(model, base)  # here, where from_pretrained draws them: the random stream matches
            say_new_head(model, split_missing(model, initial)[0])
        else:
            model = from_pretrained(auto, source, dtype=dtype, **labels)  # a new head: one line, not a report
        tokenizer = tf.AutoTokenizer.from_pretrained(source)
    except OSError as err:  # a hub model only partly in the cache, a directory without weights or tokenizer
        raise not_found(source, err, what=what) from None
    if model.config.pad_token_id is None:
        # Decoder classifiers find the last real token through pad_token_id; LMs only need it for batching.
        model.config.pad_token_id = tokenizer.pad_token_id or tokenizer.eos_token_id
    return BuiltModel(model, HFCodec(tokenizer), from_config=False, tokenizer=tokenizer, base=base, initial=initial)


def _check_prequantized(source: str, config: dict, cfg: ModelConfig, *, meta: bool) -> None:
    """A checkpoint saved quantized (its config.json has a quantization_config, e.g. bitsandbytes 4-bit) cannot be
    packed again, nor built on meta and sharded: say so before anything is loaded."""
    method = (config.get("quantization_config") or {}).get("quant_method")
    if not method:
        return
    if cfg.quantize_base != "none":
        raise ValueError(f"quantize_base={cfg.quantize_base} on a base that is already quantized ({source} was saved "
                         f"with {method}); point model.name_or_path at the unquantized model, or set "
                         f"quantize_base=none")
    if meta:
        raise ValueError(f"{source} was saved quantized ({method}), which FSDP2 and ZeRO-3 cannot shard; point "
                         f"model.name_or_path at the unquantized model and set quantize_base=nf4, or use engine none, "
                         f"ddp or DeepSpeed ZeRO-1/2")


def _on_meta(auto, path: Path, dtype: torch.dtype, labels: dict) -> nn.Module:
    """The model ``auto.from_pretrained`` builds, on the meta device and without its weights: the same config,
    generation config and eval mode."""
    import transformers as tf

    config = tf.AutoConfig.from_pretrained(path, **labels)
    with torch.device("meta"):
        model = auto.from_config(config, dtype=dtype)
    if model.can_generate() and (path / "generation_config.json").is_file():
        model.generation_config = tf.GenerationConfig.from_pretrained(path)
    return model.eval()
