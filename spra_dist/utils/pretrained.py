"""``save_pretrained`` for a plain transformers model, without importing DeepSpeed.

    save_pretrained(model, directory)

transformers' ``save_pretrained`` asks accelerate to unwrap the model, and accelerate imports ``deepspeed`` when
it is installed only to test ``isinstance(model, DeepSpeedEngine)`` (accelerate.utils.other
``extract_model_from_parallel``). That import takes seconds and, without a GPU, prints DeepSpeed's "Setting
accelerator to CPU" warning into runs that never use DeepSpeed. The models saved here are never wrapped, so the
probe is switched off for the call.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from torch import nn


def save_pretrained(model: nn.Module, directory: str | Path) -> None:
    """``model.save_pretrained(directory)`` for a model no engine wraps, leaving ``deepspeed`` unimported."""
    with no_deepspeed_probe():
        model.save_pretrained(directory)


@contextlib.contextmanager
def no_deepspeed_probe() -> Iterator[None]:
    """Within the block, accelerate's unwrapping treats DeepSpeed as absent (it then never imports it)."""
    try:
        import accelerate.utils.other as other
    except ImportError:
        yield
        return
    saved = getattr(other, "is_deepspeed_available", None)
    if saved is None:
        yield
        return
    other.is_deepspeed_available = lambda: False
    try:
        yield
    finally:
        other.is_deepspeed_available = saved
