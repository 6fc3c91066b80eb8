"""Where a model a user names lives: a local directory, or a Hugging Face hub id (``org/model``).

    source = model_source("HuggingFaceTB/SmolLM2-135M", what="model.name_or_path")  # the id, or a local path
    config = read_model_config(source, what="model.name_or_path")                    # its config.json, as a dict
    folder = model_files(source, what="model.name_or_path")   # a local folder of its config and safetensors

A hub id is resolved by transformers and huggingface_hub: from the local cache (``HF_HOME``) when
``HF_HUB_OFFLINE=1``, which ``spra`` sets unless the environment says otherwise, else downloaded into it. The
id itself, never the cache path it resolves to, is what an adapter records as its base: a copy of the cache
elsewhere resolves it again.
"""

from __future__ import annotations

import json
from pathlib import Path

# What a model's loaders read: the configs, the safetensors weights and every tokenizer format.
MODEL_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja"]


def is_hub_id(name: str) -> bool:
    """``org/model`` or ``model`` as the hub spells it; a path (``/x``, ``./x``, ``a/b/c``, ``~/x``) is not one."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def model_source(name_or_path: str, *, what: str) -> str:
    """``name_or_path`` when it is a local model directory or a hub id; otherwise a ``ValueError`` that says which
    of the two was meant and what is wrong with it (``what``: the option that gave it, for the message)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{what}={name_or_path!r}: model directory {str(path)!r} has no config.json; point "
                             f"{what} at a directory written by save_pretrained, or at a hub id (org/model)")
        return str(path)
    if path.exists():
        raise ValueError(f"{what}={name_or_path!r} is a file; give a model directory written by save_pretrained, "
                         f"or a hub id (org/model)")
    if not is_hub_id(name_or_path):
        raise ValueError(f"{what}={name_or_path!r} does not exist; give a model directory written by "
                         f"save_pretrained, or a hub id (org/model)")
    return name_or_path


def read_model_config(source: str, *, what: str) -> dict:
    """The ``config.json`` of a model directory or hub id, as a dict."""
    from transformers.utils import cached_file

    try:
        found = cached_file(source, "config.json")
    except (OSError, ValueError) as err:
        raise not_found(source, err, what=what) from None
    return json.loads(Path(found).read_text())


def model_files(source: str, *, what: str) -> Path:
    """A local folder holding the model's configs, safetensors and tokenizer: the directory itself, or the hub
    id's snapshot in the cache (downloaded there first unless ``HF_HUB_OFFLINE=1``)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source, allow_patterns=MODEL_FILES))
    except (OSError, ValueError) as err:
        raise not_found(source, err, what=what) from None


def not_found(source: str, err: BaseException, *, what: str) -> ValueError:
    """The error for a hub id (or directory) transformers could not resolve, with the way to make it resolve."""
    from huggingface_hub import constants

    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if Path(source).expanduser().is_dir():
        return ValueError(f"{what}={source!r} cannot be read ({reason})")
    if constants.HF_HUB_OFFLINE:
        return ValueError(f"{what}={source!r} is not a local directory, and hub model {source} is not complete in "
                          f"the Hugging Face cache {constants.HF_HUB_CACHE} (HF_HUB_OFFLINE=1 forbids downloading it): "
                          f"download it with `hf download {source}`, set HF_HUB_OFFLINE=0 to let spra download it, "
                          f"or give a local model directory")
    return ValueError(f"{what}={source!r} is not a local directory, and the hub could not give model {source} "
                      f"({reason}): check the id (org/model), your access to it (`hf auth login` for a gated model) "
                      f"and the network, or give a local model directory")
