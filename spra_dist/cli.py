"""The ``spra`` command line (also ``python -m spra_dist``).

    spra train --config configs/train/debug_tiny_llama.yaml max_steps=5 spra.lora_rank=4
    spra inspect runs/debug_tiny_llama/adapter
    spra merge --adapter runs/debug_tiny_llama/adapter --out runs/debug_tiny_llama/merged

A mistake in the input (bad key, missing file, wrong value) ends with one ``error: ...`` line on stderr and
exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# Every model and data set here is local; fail instead of reaching for the hub. Set before transformers loads.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

EXIT_USAGE = 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code = _run(args)
    if args.command == "train":
        from spra_dist.distributed import exit_rank

        exit_rank(code)  # returns only in a single process (see exit_rank for why ranks leave this way)
    return code


def _run(args: argparse.Namespace) -> int:
    try:
        return args.run(args)
    except ValueError as err:
        message = " ".join(str(err).split())  # one line, whatever the message's own layout
        print(f"error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except RuntimeError as err:  # the run's documented endings (spra_dist.train.guard, spra_dist.faults)
        code = getattr(err, "exit_code", None)
        if code is None:
            raise
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spra", description="Sparse Random Parameter Adaptation (SpaRA).")
    # The deepspeed launcher puts --local_rank=N right after the module name (before the command) unless
    # given --no_local_rank; ranks come from the environment, so it is accepted and ignored.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="fine-tune a model with SpaRA from a YAML config")
    train.add_argument("--config", required=True, help="YAML file, e.g. configs/train/debug_tiny_llama.yaml")
    train.add_argument("overrides", nargs="*", metavar="key=value",
                       help="config overrides: dotted (spra.lora_rank=4) or a unique leaf name (lora_rank=4)")
    train.set_defaults(run=cmd_train)

    inspect = commands.add_parser("inspect", help="describe an adapter directory")
    inspect.add_argument("adapter", metavar="ADAPTER_DIR")
    inspect.set_defaults(run=cmd_inspect)

    merge = commands.add_parser("merge", help="fold an adapter into its base and save a plain HF model")
    merge.add_argument("--adapter", required=True, help="adapter directory")
    merge.add_argument("--out", required=True, help="output directory for the merged model")
    merge.add_argument("--base", help="base model directory (default: the one recorded in the adapter)")
    merge.set_defaults(run=cmd_merge)
    return parser


def cmd_train(args: argparse.Namespace) -> int:
    from spra_dist.train.config import load_config

    cfg = load_config(args.config, args.overrides)  # errors in the config surface before the slow imports
    import datasets

    from spra_dist.train.recipe import train

    datasets.disable_progress_bars()
    summary = train(cfg)
    metric = "accuracy" if cfg.model.task == "classification" else "perplexity"
    print(f"{metric}: {summary[f'{metric}_before']:.4f} -> {summary[f'{metric}_after']:.4f}  "
          f"({summary['steps']} steps, {summary['wall_time_s']:.1f} s)")
    print(f"adapter: {Path(cfg.output_dir) / 'adapter'}")
    return 0


def read_adapter_config(adapter_dir: str | Path) -> tuple[dict, Path]:
    """adapter_config.json as a dict, and the path of adapter.safetensors, both checked (format, checksum)."""
    from spra_dist.adapter import CONFIG_NAME, FORMAT, WEIGHTS_NAME
    from spra_dist.atomic import read_verified_json

    folder = Path(adapter_dir)
    weights = folder / WEIGHTS_NAME
    config = read_verified_json(folder / CONFIG_NAME, weights, fmt=FORMAT, checksum_key="adapter_sha256",
                                what="spra_dist adapter (spra train writes <output_dir>/adapter)")
    return config, weights


def cmd_inspect(args: argparse.Namespace) -> int:
    config, weights = read_adapter_config(args.adapter)
    base = config.get("base_model") or {}
    layers = config["layers"]
    print(f"adapter:      {Path(args.adapter)}")
    print(f"base model:   {base.get('name_or_path')} ({base.get('class')})")
    print(f"mask_version: {config.get('mask_version')}")
    print(f"seed:         {config.get('seed')}")
    print(f"dtype:        {config.get('dtype')}")
    print(f"layers:       {len(layers)}")
    width = max((len(n) for n in layers), default=0)
    numel_total = 0
    for name, layer in layers.items():
        rows, cols = layer["shape"]
        numel_total += rows * cols
        print(f"  {name:<{width}}  {rows:>5} x {cols:<5}  k={layer['k']:<7} "
              f"{100 * layer['k'] / (rows * cols):6.2f}%  {layer.get('layout', 'linear')}")
    dense = config.get("dense_parameters", {})
    dense_total = 0
    for name, shape in dense.items():
        count = 1
        for dim in shape:
            count *= dim
        dense_total += count
        print(f"  dense {name} {list(shape)}")
    k_total = sum(layer["k"] for layer in layers.values())
    share = 100 * k_total / numel_total if numel_total else 0.0
    print(f"total k:      {k_total:,} of {numel_total:,} adapted weights ({share:.2f}%)")
    print(f"dense params: {dense_total:,}")
    print(f"file size:    {weights.stat().st_size:,} bytes ({weights.name})")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    config, _ = read_adapter_config(args.adapter)
    base = args.base or (config.get("base_model") or {}).get("name_or_path")
    if not base:
        raise ValueError(f"adapter {args.adapter} records no base model path; pass --base <model directory>")
    out = merge_to_directory(args.adapter, base=base, out=args.out, adapter_config=config)
    print(f"merged model: {out}")
    return 0


def merge_to_directory(adapter_dir: str | Path, *, base: str, out: str | Path, adapter_config: dict) -> Path:
    """Load ``base`` as the class recorded in the adapter, load and merge the adapter, save_pretrained."""
    import transformers

    from spra_dist import load_adapter, merge_adapter
    from spra_dist.atomic import atomic_directory

    stored = (adapter_config.get("base_model") or {}).get("config")
    if not stored:
        raise ValueError(f"adapter {adapter_dir} records no base model config; it cannot name the class to load")
    # The stored config (not the base directory's) carries what training changed, e.g. num_labels of a head.
    hf_config = transformers.AutoConfig.for_model(**stored)
    architecture = (hf_config.architectures or [None])[0]
    model_class = getattr(transformers, architecture or "", None)
    if model_class is None:
        raise ValueError(f"adapter {adapter_dir} names model class {architecture!r}, which this transformers "
                         f"{transformers.__version__} does not have")
    try:
        model = model_class.from_pretrained(base, config=hf_config)
    except OSError as err:
        raise ValueError(f"cannot load base model {base!r} ({err}); pass --base <local model directory>") from None
    load_adapter(model, adapter_dir)
    merge_adapter(model)
    with atomic_directory(out) as tmp:
        model.save_pretrained(tmp)
        _copy_tokenizer(base, tmp)
    return Path(out)


def _copy_tokenizer(base: str, target: Path) -> None:
    """Save the base's tokenizer beside the merged weights when it has one (tiny byte-level models don't)."""
    import transformers

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    except (OSError, ValueError, TypeError):
        return
    tokenizer.save_pretrained(target)
