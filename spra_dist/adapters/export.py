"""``spra merge``: an adapter folded into its base, saved as a plain Hugging Face model directory.

    merge_to_directory("runs/x/adapter", out="merged/x")              # the base the adapter recorded
    merge_to_directory("runs/x/adapter", out="merged/x", base="DIR")  # or a copy of it elsewhere
    merge_to_directory(["runs/a/adapter", "runs/b/adapter"], weights=[0.7, 0.3], out="merged/ab")  # W + Σ wᵢΔᵢ

Nothing a user saved is lost: the output directory may hold other files, which stay; files the merged model
would replace (a model or tokenizer from an earlier merge) are refused unless ``overwrite=True``; an output
that is, holds, or lies inside the adapter's run directory is refused outright. Every refusal comes before the
first byte is written, and all but a base that is not the adapter's before the base is even loaded.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import json
import math
import os
import re
from pathlib import Path

from spra_dist.adapters.base import check_base_config, expected_base, rebuild_quantized_base, resolve_base
from spra_dist.adapters.files import load_adapter, read_adapter_config
from spra_dist.adapters.merge import merge_adapter
from spra_dist.adapters.named import combine_adapters, set_adapter
from spra_dist.utils.atomic import atomic_files
from spra_dist.utils.hub import not_found
from spra_dist.utils.pretrained import no_deepspeed_probe

# What save_pretrained writes for a model and its tokenizer: an output holding any of them holds a model.
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
               "model-*-of-*.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
               "added_tokens.json", "chat_template.jinja", "chat_template.json", "vocab.json", "vocab.txt",
               "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model")
# Files that ``spra train`` or the HF Trainer callback write beside an adapter: their folder is a run.
RUN_MARKERS = ("config.yaml", "summary.json", "metrics.jsonl", "trainer_state.json", "checkpoints")


def merge_to_directory(adapter_dir: str | Path | list[str | Path], *, out: str | Path, base: str | None = None,
                       weights: list[float] | None = None, overwrite: bool = False) -> Path:
    """Load the base, check it is the adapters', merge W + Σ wᵢΔᵢ (one adapter, weight 1, by default), write
    ``out`` (see module doc). Every adapter must have been trained on the same base."""
    dirs = [Path(d) for d in (adapter_dir if isinstance(adapter_dir, list | tuple) else [adapter_dir])]
    out = Path(out)
    weights = _check_weights(weights, len(dirs))
    configs = [read_adapter_config(d)[0] for d in dirs]
    for d in dirs:
        check_output(out, d)
    check_clashes(out, overwrite=overwrite)
    check_writable(out)
    config, first = configs[0], dirs[0]
    recorded = (config.get("base_model") or {}).get("name_or_path")
    if not (base or recorded):
        raise ValueError(f"adapter {first} records no base model; pass --base <model directory>")
    base_dir = resolve_base(base or recorded, adapter=first)
    model = load_base(config, base_dir, adapter=first)
    if len(dirs) == 1 and weights == [1.0]:
        load_adapter(model, first)
    else:  # each adapter by name (checked against the base), then their weighted sum
        names = [f"adapter{i}" for i in range(len(dirs))]
        for name, d in zip(names, dirs, strict=True):
            load_adapter(model, d, adapter_name=name)
        combine_adapters(model, dict(zip(names, weights, strict=True)), name="merged")
        set_adapter(model, "merged")
    rebuild_quantized_base(model, config.get("base_quantization"))
    merge_adapter(model)
    with atomic_files(out) as tmp:
        with no_deepspeed_probe(), _write_errors_as_os_errors(out):
            model.save_pretrained(tmp)
        _copy_tokenizer(base_dir, tmp)
        # The names were checked before anything was loaded; this catches a file name of an unusual tokenizer.
        _refuse_clashes(out, sorted(f.name for f in tmp.iterdir() if (out / f.name).exists()), overwrite=overwrite)
    return out


def _check_weights(weights: list[float] | None, n: int) -> list[float]:
    if weights is None:
        return [1.0] * n
    if len(weights) != n:
        raise ValueError(f"--weights gives {len(weights)} numbers for {n} --adapter directories: give one weight per "
                         f"adapter, in the same order (e.g. --weights {' '.join(['0.5'] * n)})")
    bad = [w for w in weights if not math.isfinite(w)]
    if bad:
        raise ValueError(f"--weights {bad[0]} is not a finite number: give one real weight per adapter")
    return [float(w) for w in weights]


def check_output(out: Path, adapter_dir: Path) -> None:
    """Refuse an output that is a file, or that is, holds, or lies inside the adapter's run (or the adapter
    directory itself): before the base is loaded, so nothing is computed for an output that cannot take it."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory; choose another output path")
    adapter = adapter_dir.resolve()
    run = adapter.parent if any((adapter.parent / m).exists() for m in RUN_MARKERS) else adapter
    target = out.resolve()
    if target == run or run in target.parents or target in run.parents:
        what = "the run directory" if run != adapter else "the adapter directory"
        suggestion = run.parent / f"{run.name}-merged"
        raise ValueError(f"--out {out} would put the merged model over or inside {what} {run} that holds adapter "
                         f"{adapter_dir}; choose a directory outside it, e.g. --out {suggestion}")


def check_clashes(out: Path, *, overwrite: bool) -> None:
    """Refuse, unless ``overwrite``, an output that holds files of a saved model or tokenizer (an earlier merge):
    the merged model would replace them. Checked before the base is loaded, so a refusal costs no time and writes
    nothing."""
    if not out.is_dir():
        return
    clashes = sorted(f.name for f in out.iterdir() if any(fnmatch.fnmatch(f.name, p) for p in MODEL_FILES))
    _refuse_clashes(out, clashes, overwrite=overwrite)


def _refuse_clashes(out: Path, clashes: list[str], *, overwrite: bool) -> None:
    if clashes and not overwrite:
        raise ValueError(f"--out {out} already holds {', '.join(clashes[:4])}, which the merged model would "
                         f"replace; pass --overwrite to replace them, or choose an empty directory")


def check_writable(out: Path) -> None:
    """A ``PermissionError`` when ``out`` (or, while it does not exist, the folder it would be made in) cannot be
    written: before the base is loaded."""
    existing = next(p for p in (out.absolute(), *out.absolute().parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(existing))


def load_base(adapter_config: dict, base: str, *, adapter: Path):
    """The base as the class the adapter recorded, after checking its config; every weight must load."""
    import transformers

    recorded = adapter_config.get("base_model") or {}
    stored = recorded.get("config")
    if not stored:
        raise ValueError(f"adapter {adapter} records no base model config; it cannot name the class to load")
    try:
        found = transformers.AutoConfig.from_pretrained(base)
    except (OSError, ValueError) as err:
        if not Path(base).expanduser().is_dir():  # a hub id that is not in the cache, offline
            raise not_found(base, err, what="base") from None
        raise ValueError(f"cannot read a model config from base {base!r} ({_first_line(err)}); the adapter expects "
                         f"{expected_base(adapter_config)}: pass --base <local directory of that model>") from None
    check_base_config(adapter_config, json.loads(json.dumps(found.to_dict(), default=str)), adapter=adapter,
                      base=base)
    # The stored config (not the base directory's) carries what training changed, e.g. num_labels of a head; not
    # the quantization a base trained in bitsandbytes 4-bit was loaded with: the merge loads it unquantized and
    # rebuilds dequant(quant(W)) from base_quantization, never writing packed weights.
    hf_config = transformers.AutoConfig.for_model(**{k: v for k, v in stored.items() if k != "quantization_config"})
    # The class the adapter was trained on (config.architectures may still name the base's own class).
    architecture = recorded.get("class") or (hf_config.architectures or [None])[0]
    hf_config.architectures = [architecture]
    model_class = getattr(transformers, architecture or "", None)
    if model_class is None:
        raise ValueError(f"adapter {adapter} names model class {architecture!r}, which this transformers "
                         f"{transformers.__version__} does not have")
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # its load report would call the head "newly initialized"
    try:
        model, info = model_class.from_pretrained(base, config=hf_config, output_loading_info=True)
    except (OSError, RuntimeError) as err:  # RuntimeError: a weight of another shape
        raise ValueError(f"cannot load the weights of base {base!r} ({_first_line(err)}); the adapter expects "
                         f"{expected_base(adapter_config)}") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
    trained = set(adapter_config.get("dense_parameters", {}))  # a head the adapter itself supplies
    problems = {"missing": sorted(set(info["missing_keys"]) - trained), "unexpected": sorted(info["unexpected_keys"]),
                "of another shape": sorted(str(k) for k in info["mismatched_keys"])}
    for what, keys in problems.items():
        if keys:
            raise ValueError(f"base {base!r} is not the adapter's base: {len(keys)} weights {what} when loading it "
                             f"as {architecture} ({', '.join(keys[:3])}); the adapter expects "
                             f"{expected_base(adapter_config)}: pass --base <directory of that model>")
    return model


@contextlib.contextmanager
def _write_errors_as_os_errors(out: Path):
    """safetensors reports a failed write (a full disk) with its own error type; make it the OSError it is."""
    try:
        yield
    except Exception as err:
        found = re.search(r"os error (\d+)", str(err))
        if found is None or isinstance(err, OSError):
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code), str(out)) from None


def _copy_tokenizer(base: str, target: Path) -> None:
    """Save the base's tokenizer beside the merged weights when it has one (tiny byte-level models don't)."""
    import transformers

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    except (OSError, ValueError, TypeError):
        return
    tokenizer.save_pretrained(target)


def _first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
