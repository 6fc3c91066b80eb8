"""The ``spra`` command line (also ``python -m spra_dist``).

    spra train --config configs/train/debug_tiny_llama.yaml max_steps=5 spra.lora_rank=4
    spra train --config configs/train/llama3_8b_sft_fsdp2.yaml --dry-run --world-size 8
    spra config
    spra preprocess --config configs/train/smollm2_sft.yaml --show 2
    spra inspect runs/debug_tiny_llama/adapter
    spra merge --adapter runs/debug_tiny_llama/adapter --out merged/debug_tiny_llama
    spra generate --adapter runs/debug_tiny_llama/adapter "To be, or not" --compare

A mistake in the input (bad key, missing file, wrong value) ends with one ``error: ...`` line on stderr and
exit status 2; a write that fails (full disk, file-size limit, no permission) with one line and status 74; a
preemption signal with ``stopped at step N (SIGTERM); checkpoint ...; rerun with resume=auto`` and status 75.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# Every model and data set here is local; fail instead of reaching for the hub. Set before transformers loads.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

EXIT_USAGE = 2  # bad input: a config key or value, a path, an adapter or base that doesn't fit
EXIT_STORAGE = 74  # a write failed (sysexits' EX_IOERR): full disk, file-size limit, no permission


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code = _run(args)
    if args.command == "train":
        from spra_dist.distributed.group import exit_rank

        exit_rank(code)  # returns only in a single process (see exit_rank for why ranks leave this way)
    return code


def _run(args: argparse.Namespace) -> int:
    try:
        return args.run(args)
    except ValueError as err:
        return _fail(str(err), EXIT_USAGE)
    except BrokenPipeError:  # the reader left (spra inspect ... | head): not a failure, nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush raises no second one
        return 0
    except OSError as err:  # a full disk, a file-size limit, a read-only directory
        from spra_dist.utils.atomic import describe_os_error

        return _fail(describe_os_error(err), EXIT_STORAGE)
    except RuntimeError as err:  # the run's documented endings (spra_dist.train.guard, spra_dist.distributed.faults)
        code = getattr(err, "exit_code", None)
        if code is None:
            raise
        from spra_dist.train.guard import Preempted

        if isinstance(err, Preempted):  # not a failure: the run is saved, and a rerun continues it
            print(str(err), file=sys.stderr)
            return code
        return _fail(str(err), code)


def _fail(message: str, code: int) -> int:
    print(f"error: {' '.join(message.split())}", file=sys.stderr)  # one line, whatever the message's layout
    return code


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's one-line errors (argparse's own add a usage block); ``more_help`` adds text that
    is built only when the help is shown (the config keys, which need the config dataclasses)."""

    def __init__(self, *args, more_help=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.more_help = more_help

    def format_help(self) -> str:
        return super().format_help() + ("\n" + self.more_help() if self.more_help else "")

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"error: {message}; see {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    from spra_dist import __version__

    parser = _Parser(prog="spra", description="Sparse Random Parameter Adaptation (SpaRA).")
    # The deepspeed launcher puts --local_rank=N right after the module name (before the command) unless
    # given --no_local_rank; ranks come from the environment, so it is accepted and ignored.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="fine-tune a model with SpaRA from a YAML config",
                                more_help=_config_keys)
    train.add_argument("--config", required=True, help="YAML file, e.g. configs/train/debug_tiny_llama.yaml")
    train.add_argument("--dry-run", action="store_true",
                       help="print the plan (k per matrix, trainable share, engine, batch, steps) from the model "
                            "built on the meta device; reads only the model's config.json and writes nothing")
    train.add_argument("--world-size", type=int, default=None, metavar="N",
                       help="with --dry-run: plan for N processes (default: the launcher's WORLD_SIZE, else 1)")
    train.add_argument("overrides", nargs="*", metavar="key=value",
                       help="config overrides: dotted (spra.lora_rank=4) or a unique leaf name (lora_rank=4)")
    train.set_defaults(run=cmd_train)

    prep = commands.add_parser("preprocess", help="tokenise and cache a config's data; show what is trained")
    prep.add_argument("--config", required=True, help="YAML file, e.g. configs/train/smollm2_sft.yaml")
    prep.add_argument("--show", type=int, default=0, metavar="N",
                      help="print N training examples token by token, '+' marking the trained ones")
    prep.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, as for train")
    prep.set_defaults(run=cmd_preprocess)

    config = commands.add_parser("config", help="list every config key with its default and what it does")
    config.add_argument("--markdown", action="store_true", help="the full reference as markdown (docs/config.md)")
    config.set_defaults(run=cmd_config)

    inspect = commands.add_parser("inspect", help="describe an adapter directory")
    inspect.add_argument("adapter", metavar="ADAPTER_DIR",
                         help="an adapter directory, or a run directory (spra train's output_dir) that holds adapter/")
    inspect.set_defaults(run=cmd_inspect)

    merge = commands.add_parser("merge", help="fold an adapter (or a weighted sum of several) into its base and "
                                              "save a plain HF model")
    merge.add_argument("--adapter", required=True, action="append",
                       help="adapter directory; repeat it to merge several adapters of the same base")
    merge.add_argument("--weights", nargs="+", type=float, metavar="W",
                       help="one weight per --adapter: the merged weight is W + Σ wᵢΔᵢ (default: 1 each)")
    merge.add_argument("--out", required=True,
                       help="output directory for the merged model (other files in it are kept; not inside the run)")
    merge.add_argument("--base", help="base model directory (default: the one recorded in the adapter)")
    merge.add_argument("--overwrite", action="store_true",
                       help="replace model and tokenizer files that --out already holds (default: refuse)")
    merge.set_defaults(run=cmd_merge)

    gen = commands.add_parser("generate", help="complete a prompt with the base plus an adapter (greedy)")
    gen.add_argument("prompt")
    gen.add_argument("--adapter", required=True, help="adapter directory")
    gen.add_argument("--base", help="base model directory (default: the one recorded in the adapter)")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    gen.add_argument("--compare", action="store_true", help="print the base model's completion too")
    gen.set_defaults(run=cmd_generate)
    return parser


def cmd_train(args: argparse.Namespace) -> int:
    from spra_dist.train.config import load_config

    if args.world_size is not None and not args.dry_run:
        raise ValueError("--world-size plans a --dry-run; a run takes its world size from the launcher")
    cfg = load_config(args.config, args.overrides)  # errors in the config surface before the slow imports
    if args.dry_run:
        from spra_dist.distributed.group import launched_world_size
        from spra_dist.train.plan import format_plan, plan_run

        print(format_plan(plan_run(cfg, world_size=args.world_size or launched_world_size()), cfg))
        return 0
    import datasets

    from spra_dist.distributed.group import launched_rank
    from spra_dist.train.progress import quiet_library_bars
    from spra_dist.train.recipe import train

    datasets.disable_progress_bars()
    quiet_library_bars()
    summary = train(cfg)
    if launched_rank() != 0:  # every rank holds the same summary: one prints it
        return 0
    if summary.get("already_finished"):
        print(f"{cfg.output_dir}: the run finished at step {summary['steps']}; nothing changed (raise max_steps "
              f"to train further, or pass overwrite=true to start over)")
        return 0
    metric = "accuracy" if cfg.model.task == "classification" else "perplexity"
    print(f"{metric}: {summary[f'{metric}_before']:.4f} -> {summary[f'{metric}_after']:.4f}  "
          f"({summary['steps']} steps, {summary['wall_time_s']:.1f} s)")
    print(f"adapter: {Path(cfg.output_dir) / 'adapter'}")
    return 0


def _config_keys() -> str:
    from spra_dist.train.reference import text

    return text()


def cmd_config(args: argparse.Namespace) -> int:
    from spra_dist.train.reference import markdown, text

    print(markdown() if args.markdown else text(), end="")
    return 0


def cmd_preprocess(args: argparse.Namespace) -> int:
    from spra_dist.train.config import load_config

    cfg = load_config(args.config, args.overrides)
    import datasets

    from spra_dist.data.build import build_data
    from spra_dist.train.models import build_codec

    datasets.disable_progress_bars()
    codec = build_codec(cfg.model)
    splits = build_data(cfg.data, task=cfg.model.task, codec=codec, num_labels=cfg.model.num_labels,
                        timeout_s=cfg.dist_timeout_s)
    stats = splits.stats
    for split in ("train", "eval"):
        part = stats.get(split, {})
        print(f"{split}: {stats[f'{split}_examples']} examples kept of {part.get('examples', '?')}; dropped "
              f"{part.get('dropped_over_length', 0)} over max_length={cfg.data.max_length}, "
              f"{part.get('dropped_untrained', 0)} with no trained token")
    if stats.get("packs") is not None:
        print(f"packed: {stats['train_examples']} examples in {stats['packs']} rows of <= {cfg.data.max_length}")
    if splits.label_names:
        print(f"labels: {', '.join(f'{i}={n}' for i, n in enumerate(splits.label_names))}")
    if stats.get("cache"):
        print(f"cache: {stats['cache']}")
    for i in range(min(args.show, len(splits.train.ds))):
        show_example(splits.train.example(i), codec, index=i)
    return 0


def show_example(example: dict, codec, *, index: int) -> None:
    """One example, a token per line: '+' when it is a trained target, then its id and text."""
    ids = example["input_ids"]
    if "label" in example:
        print(f"--- example {index}: label {example['label']}, {len(ids)} tokens")
        print("  " + " ".join(repr(codec.piece(t)) for t in ids))
        return
    labels = example["labels"]
    trained = sum(1 for p in range(1, len(ids)) if labels[p] != -100)
    print(f"--- example {index}: {len(ids)} tokens, {trained} trained ('+')")
    for p, token in enumerate(ids):
        print(f"  {'+' if p and labels[p] != -100 else ' '} {token:>6} {codec.piece(token)!r}")


def cmd_inspect(args: argparse.Namespace) -> int:
    from spra_dist.adapters.files import adapter_in, read_adapter_config

    adapter = adapter_in(args.adapter)
    config, weights = read_adapter_config(adapter)
    base = config.get("base_model") or {}
    layers = config["layers"]
    print(f"adapter:      {adapter}")
    print(f"base model:   {base.get('name_or_path')} ({base.get('class')})")
    print(f"mask_version: {config.get('mask_version')}")
    print(f"seed:         {config.get('seed')}")
    if config.get("combination"):
        mix = ", ".join(f"{name}: {w:g}" for name, w in config["combination"].items())
        seeds = sorted({part[0] for layer in layers.values() for part in layer.get("mask", [])})
        print(f"combination:  {mix} (mask seeds {seeds or [config.get('seed')]})")
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
    from spra_dist.adapters.export import merge_to_directory

    out = merge_to_directory(args.adapter, out=args.out, base=args.base, weights=args.weights,
                             overwrite=args.overwrite)
    print(f"merged model: {out}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from spra_dist.cli.generate import generate

    results = generate(args.adapter, args.prompt, base=args.base, max_new_tokens=args.max_new_tokens,
                       chat=args.chat, compare=args.compare)
    if not args.compare:
        print(results["adapter"])
        return 0
    for name, text in results.items():
        print(f"--- {name}\n{text}")
    return 0
