"""One cell of the quality study in this (fresh) process: prepare the model by one method, train it with the
study's shared loop, evaluate on validation and test; prints one JSON line.

    HF_HUB_OFFLINE=1 python -m bench.quality_cell --task cls --method spra --rank 8 --lr 0.01 --seed 0 \\
        --steps 125 --batch 32 --warmup 8 --max-length 64 --train 4000 --val 1000

Every method sees the same examples in the same order (the seed fixes the order, the head's init and the
method's own random mask or init), the same optimizer (AdamW, no weight decay), schedule (linear warmup, then
cosine decay to zero), clipping, steps and evaluation: the method only decides how the model is prepared and
which parameters train (``prepare``). ``bench.quality`` runs the cells and writes the report. The study's probes
vary one setting (``--weight-decay``, ``--warmup``, ``--alloc``) and never evaluate on test (``--no-test``).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from torch import nn

from spra_dist.core.config import SpraConfig
from spra_dist.core.masks import budget
from spra_dist.core.model import apply_spra, select_targets
from spra_dist.data.build import DataSplits, build_data
from spra_dist.data.config import DataConfig, DatasetEntry
from spra_dist.data.tokens import TokenSet, collate, global_batch
from spra_dist.demos.dates import write as write_dates
from spra_dist.train.config import ModelConfig
from spra_dist.train.eval import evaluate, generate_eval
from spra_dist.train.loop import lr_factor
from spra_dist.train.models import build_model

METHODS = ("spra", "lora", "shira", "full", "head")
HEAD = "classifier"  # the fresh 2-class head of the classification model
HEAD_LR = 1e-2  # the head's rate in every method but head-only (whose chosen rate is the head's)
MAX_GRAD_NORM = 1.0
# Attention value and output projections: where IBM's SpaRTA code puts its sparse deltas.
VO_TARGETS = {"cls": ["attention.self.value", "attention.output.dense"], "sft": ["v_proj", "o_proj"]}
DATES = Path(__file__).resolve().parent.parent / "runs" / "quality" / "iso_dates"


def train(model: nn.Module, groups: list[dict], data: TokenSet, *, steps: int, batch: int, warmup: int, seed: int,
          pad_id: int, weight_decay: float = 0.0) -> list[float]:
    """The study's one training loop; ``groups`` are AdamW parameter groups (each with its peak ``lr``)."""
    optimizer = torch.optim.AdamW(groups, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup_steps=warmup, max_steps=steps, schedule="cosine"))
    params = [p for g in groups for p in g["params"]]
    model.train()
    losses = []
    for step in range(steps):
        items = global_batch(len(data), batch_size=batch, step=step, seed=seed)
        loss = model(**collate(data, items, pad_id=pad_id)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def spra_config(model: nn.Module, *, task: str, rank: int, targets: str, seed: int, alloc: str = "rank"
                ) -> SpraConfig:
    """All linears at LoRA rank ``rank``'s budget per matrix (``alloc`` rank: k = r·(n_in + n_out)), or the same
    total k spread by one density over all linears (``alloc`` density) or over V/O only (``targets`` vo)."""
    head = [HEAD] if task == "cls" else []
    every = SpraConfig(target_modules="all-linear", lora_rank=rank, seed=seed, trainable_modules=head)
    if targets == "all" and alloc == "rank":
        return every
    total_k = sum(budget(tuple(model.get_submodule(n).weight.shape), lora_rank=rank, density=None)
                  for n in select_targets(model, every))
    where = VO_TARGETS[task] if targets == "vo" else "all-linear"
    spread = SpraConfig(target_modules=where, lora_rank=None, density=1.0, trainable_modules=head)
    numel = sum(model.get_submodule(n).weight.numel() for n in select_targets(model, spread))
    if total_k > numel:
        raise ValueError(f"--targets {targets} cannot hold rank {rank}'s total budget ({total_k:,} > {numel:,} "
                         "entries)")
    return SpraConfig(target_modules=where, lora_rank=None, density=total_k / numel, seed=seed,
                      trainable_modules=head)


def prepare(model: nn.Module, *, task: str, method: str, rank: int | None, targets: str, seed: int,
            alloc: str = "rank") -> nn.Module:
    """The model as ``method`` trains it: adapters injected, everything else frozen (full: nothing frozen)."""
    head = [HEAD] if task == "cls" else None
    match method:
        case "spra":
            return apply_spra(model, spra_config(model, task=task, rank=rank, targets=targets, seed=seed,
                                                 alloc=alloc))
        case "lora" | "shira":
            from peft import LoraConfig, ShiraConfig, get_peft_model

            cfg = (LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules="all-linear",
                              modules_to_save=head) if method == "lora"
                   else ShiraConfig(r=rank, target_modules="all-linear", random_seed=seed, modules_to_save=head))
            return get_peft_model(model, cfg)
        case "full" | "head":
            for name, p in model.named_parameters():
                p.requires_grad_(method == "full" or name.startswith(HEAD + "."))
            return model
        case _:
            raise ValueError(f"--method {method!r} is unknown; use one of {', '.join(METHODS)}")


def param_groups(model: nn.Module, *, method: str, lr: float) -> list[dict]:
    """The method's own parameters at ``lr``; a classification head at HEAD_LR (at ``lr`` for head-only)."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    head = [p for n, p in trainable if HEAD in n.split(".")]
    own = [p for n, p in trainable if HEAD not in n.split(".")]
    groups = [{"params": own, "lr": lr}, {"params": head, "lr": lr if method == "head" else HEAD_LR}]
    return [g for g in groups if g["params"]]


def carve(splits: DataSplits, *, train: int, val: int, test: int | None) -> tuple[TokenSet, TokenSet, TokenSet]:
    """Train and validation from the train split (first ``train`` rows, then the next ``val``: disjoint), test
    from the held-out split (its first ``test`` rows, or all of it)."""
    pool = splits.train.ds
    if train + val > len(pool):
        raise ValueError(f"--train {train} + --val {val} exceed the {len(pool)} training examples")
    test_ds = splits.eval.ds if test is None else splits.eval.ds.select(range(min(test, len(splits.eval.ds))))
    return (TokenSet(pool.select(range(train))), TokenSet(pool.select(range(train, train + val))),
            TokenSet(test_ds))


def load_data(a: argparse.Namespace, codec) -> DataSplits:
    if a.task == "cls":  # fixed hash split: the eval part (~1,230 reviews) is the test set
        return build_data(DataConfig(source="rotten_tomatoes", max_length=a.max_length), task="classification",
                          codec=codec)
    folder = write_dates(a.data_dir)  # the same bytes on every run, so the token cache is reused
    cfg = DataConfig(datasets=[DatasetEntry(path=str(folder / "train.jsonl"), type="chat")],
                     eval_datasets=[DatasetEntry(path=str(folder / "eval.jsonl"), type="chat")],
                     max_length=a.max_length)
    return build_data(cfg, task="causal_lm", codec=codec)


def run(a: argparse.Namespace) -> dict:
    source, task = ("minilm", "classification") if a.task == "cls" else ("smollm2", "causal_lm")
    built = build_model(ModelConfig(source=source, task=task, num_labels=2), seed=a.seed)  # seeds the head
    splits = load_data(a, built.codec)
    train_set, val_set, test_set = carve(splits, train=a.train, val=a.val, test=a.test)
    model = prepare(built.model, task=a.task, method=a.method, rank=a.rank, targets=a.targets, seed=a.seed,
                    alloc=a.alloc)
    groups = param_groups(model, method=a.method, lr=a.lr)
    head_ids = {id(p) for n, p in model.named_parameters() if HEAD in n.split(".")}
    trainable = sum(p.numel() for g in groups for p in g["params"])
    head_lr = next((g["lr"] for g in groups if any(id(p) in head_ids for p in g["params"])), None)  # peak rate
    start = time.perf_counter()
    losses = train(model, groups, train_set, steps=a.steps, batch=a.batch, warmup=a.warmup, seed=a.seed,
                   pad_id=built.codec.pad_id, weight_decay=a.weight_decay)
    train_s = time.perf_counter() - start
    pad, size = built.codec.pad_id, 128 if a.task == "cls" else 16
    val = evaluate(model, val_set, task=task, pad_id=pad, batch_size=size)
    test = None if a.no_test else evaluate(model, test_set, task=task, pad_id=pad, batch_size=size)
    if test is not None and a.task == "sft" and a.generate:
        scores, _ = generate_eval(model, test_set, codec=built.codec, n=a.generate, max_new_tokens=16,
                                  end_of_turn=splits.end_of_turn)
        test.update(scores, generated=min(a.generate, len(test_set)))
    return {"task": a.task, "method": a.method, "rank": a.rank, "targets": a.targets, "lr": a.lr, "seed": a.seed,
            "head_lr": head_lr, "warmup": a.warmup, "weight_decay": a.weight_decay, "alloc": a.alloc,
            "trainable": trainable,
            "adapted": sum(p.numel() for g in groups for p in g["params"] if id(p) not in head_ids),
            "sizes": {"train": len(train_set), "val": len(val_set), "test": 0 if test is None else len(test_set)},
            "val": val, "test": test, "train_s": train_s, "eval_s": time.perf_counter() - start - train_s,
            "first_loss": losses[0], "last_loss": sum(losses[-5:]) / len(losses[-5:]),
            "threads": torch.get_num_threads(), "pid": os.getpid()}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", choices=("cls", "sft"), required=True,
                    help="cls: MiniLM-L6 on Rotten Tomatoes; sft: SmolLM2-135M on the date-writing chats")
    ap.add_argument("--method", choices=METHODS, required=True)
    ap.add_argument("--rank", type=int, help="LoRA-equivalent budget (spra, lora, shira)")
    ap.add_argument("--targets", choices=("all", "vo"), default="all",
                    help="all linears, or attention V and O only (spra: the same total k as all linears)")
    ap.add_argument("--alloc", choices=("rank", "density"), default="rank",
                    help="spra: k = r·(n_in + n_out) per matrix, or the same total k at one density over all")
    ap.add_argument("--lr", type=float, required=True, help="peak learning rate of the method's parameters")
    ap.add_argument("--weight-decay", type=float, default=0.0, help="AdamW's decoupled weight decay")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--warmup", type=int, required=True)
    ap.add_argument("--max-length", type=int, required=True)
    ap.add_argument("--train", type=int, required=True, help="training examples (the first of the train split)")
    ap.add_argument("--val", type=int, required=True, help="validation examples (the next ones)")
    ap.add_argument("--test", type=int, help="test examples (default: the whole held-out split)")
    ap.add_argument("--no-test", action="store_true", help="never evaluate on test (the study's probes)")
    ap.add_argument("--generate", type=int, default=0, help="sft: greedy answers scored on this many test prompts")
    ap.add_argument("--data-dir", type=Path, default=DATES, help="sft: where the date chats are written")
    a = ap.parse_args(argv)
    if a.method in ("spra", "lora", "shira") and a.rank is None:
        ap.error(f"--method {a.method} needs --rank")
    if a.alloc != "rank" and a.method != "spra":
        ap.error("--alloc density spreads SpaRA's total k; it needs --method spra")
    if a.targets == "vo" and a.method != "spra":
        ap.error("--targets vo is the placement arm of --method spra (the total k of all linears on V/O)")
    if a.task == "sft" and a.method == "head":
        ap.error("--method head needs --task cls (the causal LM has no separate head)")
    return a


def main() -> None:
    print(json.dumps(run(parse())))


if __name__ == "__main__":
    main()
