"""Memory of TRL's GRPO and DPO on a SpaRA model: TRL's reference (a second copy of the model, reloaded from
``model.config._name_or_path``) against SpraGRPOTrainer / SpraDPOTrainer's (the policy, its adapter bypassed).

    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.rl_reference                  # all arms, interleaved, a table
    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.rl_reference --arm grpo_spra  # one arm in this process, a JSON line

SmolLM2-135M-Instruct (``spra_dist.demos.packaged.PACKAGED["smollm2"]()``) in fp32, no autocast, every linear but
the head adapted at the LoRA r=8 budget (``target_modules="all-linear"``, seed 1234), on the CPU. Four arms, each
in a fresh process per round (its peak RSS is its own), the rounds interleaved (A B C D A B C D):

- ``grpo_trl`` / ``grpo_spra``: TRL's ``GRPOTrainer`` / ``SpraGRPOTrainer``, beta 0.04, 4 completions of at most 16
  tokens for one prompt a step (questions of the dates task, as chat messages where the tokenizer has a chat
  template), reward 1 for a completion holding a digit;
- ``dpo_trl`` / ``dpo_spra``: TRL's ``DPOTrainer`` / ``SpraDPOTrainer``, 4 preference pairs a step (the ISO date
  chosen, the same date with day and month swapped rejected), the reference scored online
  (``precompute_ref_log_probs=False``).

Every other setting is TRL's default (gradient checkpointing on, in both trainers).

Per arm: the RSS (``VmRSS``) once the SpaRA model is built and once the trainer is (TRL's copy, if any, loaded),
the peak RSS of the training steps (``VmHWM``, reset through ``/proc/self/clear_refs`` after construction), the
process's peak (``ru_maxrss``), the parameters ``trainer.ref_model`` holds, and the median step time.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from transformers import TrainerCallback

from bench.proc_memory import reset_peak, rss, run_fresh

ARMS = {"grpo_trl": "GRPOTrainer", "grpo_spra": "SpraGRPOTrainer", "dpo_trl": "DPOTrainer",
        "dpo_spra": "SpraDPOTrainer"}
LORA_RANK = 8
BETA = 0.04
MIB = 2**20


def load(model_dir: str):
    """The SpaRA model in fp32, its tokenizer, and the parameter count of the plain model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from spra_dist import SpraConfig, apply_spra

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    base = sum(p.numel() for p in model.parameters())
    model = apply_spra(model, SpraConfig(target_modules="all-linear", lora_rank=LORA_RANK, seed=1234))
    return model, AutoTokenizer.from_pretrained(model_dir), base


def dates(count: int) -> list[tuple[str, str, str]]:
    """(question, ISO answer, a wrong answer: day and month swapped, or the next year where they are equal)."""
    from spra_dist.demos.dates import rows

    out = []
    for row in rows(count, seed=0):
        question, answer = (m["content"] for m in row["messages"])
        year, month, day = answer.split("-")
        wrong = f"{year}-{day}-{month}" if day != month else f"{int(year) + 1}-{month}-{day}"
        out.append((question, answer, wrong))
    return out


def has_digit(completions, **_) -> list[float]:
    """GRPO's reward: 1.0 for a completion that holds a digit (a chat completion is a list of messages)."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [float(any(ch.isdigit() for ch in t)) for t in texts]


class StepTimer(TrainerCallback):
    """Times each optimizer step (GRPO's: its rollouts included)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_step_begin(self, *_, **__) -> None:
        self._start = time.perf_counter()

    def on_step_end(self, *_, **__) -> None:
        self.times.append(time.perf_counter() - self._start)


def trainer(arm: str, model: nn.Module, tokenizer, out: str, *, steps: int, timer: StepTimer):
    """The arm's trainer over ``model``: TRL's own class, or its Spra subclass."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer

    from spra_dist.integrations.trl import SpraDPOTrainer, SpraGRPOTrainer

    common = dict(output_dir=out, use_cpu=True, bf16=False, report_to=[], save_strategy="no", disable_tqdm=True,
                  logging_steps=1, max_steps=steps, per_device_train_batch_size=4, seed=0)
    pairs = dates(16)
    if arm.startswith("grpo"):
        chat = bool(getattr(tokenizer, "chat_template", None))
        prompts = [[{"role": "user", "content": q}] if chat else q for q, _, _ in pairs]
        cls = SpraGRPOTrainer if arm == "grpo_spra" else GRPOTrainer
        return cls(model=model, reward_funcs=has_digit, train_dataset=Dataset.from_dict({"prompt": prompts}),
                   args=GRPOConfig(beta=BETA, num_generations=4, max_completion_length=16, **common),
                   processing_class=tokenizer, callbacks=[timer])
    data = Dataset.from_dict({"prompt": [q for q, _, _ in pairs], "chosen": [" " + a for _, a, _ in pairs],
                              "rejected": [" " + r for _, _, r in pairs]})
    cls = SpraDPOTrainer if arm == "dpo_spra" else DPOTrainer
    return cls(model=model, args=DPOConfig(precompute_ref_log_probs=False, **common), train_dataset=data,
               processing_class=tokenizer, callbacks=[timer])


def measure(arm: str, model_dir: str, *, steps: int) -> dict:
    """Build the SpaRA model and the arm's trainer in this process, then train ``steps`` steps."""
    start = time.perf_counter()
    model, tokenizer, base_params = load(model_dir)
    rss_model = rss("VmRSS")
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out:
        t = trainer(arm, model, tokenizer, out, steps=steps, timer=timer)
        build_s = time.perf_counter() - start
        ref = t.ref_model
        ref_params = sum(p.numel() for p in ref.parameters()) if ref is not None else 0
        rss_built = rss("VmRSS")
        reset = reset_peak()
        t.train()
    step_peak = rss("VmHWM") if reset else None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"arm": arm, "base_params": base_params, "ref_params": ref_params, "ref_type": type(ref).__name__,
            "build_s": build_s, "rss_model": rss_model, "rss_built": rss_built, "step_peak_rss": step_peak,
            "peak_rss": peak, "step_s": timer.times, "median_s": statistics.median(timer.times),
            "threads": torch.get_num_threads()}


def run_arm(arm: str, model_dir: str, *, steps: int) -> dict:
    """``measure`` in a fresh process (its own peak RSS); the machine's load average before it starts."""
    cmd = [sys.executable, "-m", "bench.rl_reference", "--arm", arm, "--model", model_dir, f"--steps={steps}"]
    return run_fresh(cmd)


def combine(outs: list[dict]) -> dict:
    """One arm's processes as one row: each memory figure as the list of its processes' values, every step pooled."""
    lists = {k: [o[k] for o in outs if o.get(k) is not None]
             for k in ("build_s", "rss_model", "rss_built", "step_peak_rss", "peak_rss")}
    steps = [t for o in outs for t in o["step_s"]]
    return {**{k: outs[0][k] for k in ("arm", "base_params", "ref_params", "ref_type", "threads")}, **lists,
            "step_s": steps, "median_s": statistics.median(steps)}


def _mib(values: list[int]) -> str:
    if not values:
        return "–"
    lo, hi = min(values) / MIB, max(values) / MIB
    return f"{hi:,.0f}" if round(lo) == round(hi) else f"{lo:,.0f}–{hi:,.0f}"


def table(rows: list[dict]) -> list[str]:
    """Per trainer, TRL's default reference against the bypassed one (``combine``d rows): each cell "TRL / Spra",
    memory in MiB (a range over the rounds), and the Spra arm's peaks as a multiple of TRL's (largest of each)."""
    by = {r["arm"]: r for r in rows}

    def ratio(a: dict, b: dict, key: str) -> str:
        return f"{max(b[key]) / max(a[key]):.2f}" if a[key] and b[key] else "–"

    lines = ["| trainer | parameters held by the reference | RSS, model built | RSS, trainer built | peak RSS, steps "
             "| Spra ÷ TRL | peak RSS, process | Spra ÷ TRL | median step (s) |", "|---|" + "---:|" * 8]
    for name in ("grpo", "dpo"):
        trl, spra = by.get(f"{name}_trl"), by.get(f"{name}_spra")
        if trl is None or spra is None:
            continue
        pair = [trl, spra]
        lines.append(f"| {name.upper()} | {trl['ref_params']:,} / {spra['ref_params']:,} | "
                     + " | ".join(" / ".join(_mib(r[k]) for r in pair) for k in ("rss_model", "rss_built")) + " | "
                     f"{' / '.join(_mib(r['step_peak_rss']) for r in pair)} | {ratio(trl, spra, 'step_peak_rss')} | "
                     f"{' / '.join(_mib(r['peak_rss']) for r in pair)} | {ratio(trl, spra, 'peak_rss')} | "
                     f"{trl['median_s']:.2f} / {spra['median_s']:.2f} |")
    return lines


def measure_all(model_dir: str, *, arms: tuple[str, ...] = tuple(ARMS), rounds: int = 2, steps: int = 3,
                log=print) -> dict:
    """Each arm in ``rounds`` fresh processes, interleaved (drift in the machine's load hits every arm alike)."""
    outs: dict[str, list[dict]] = {arm: [] for arm in arms}
    for i in range(rounds):
        for arm in arms:
            r = run_arm(arm, model_dir, steps=steps)
            log(f"  round {i + 1}/{rounds} {arm:<9} reference holds {r['ref_params']:,} parameters  trainer built "
                f"{r['rss_built'] / MIB:,.0f} MiB  peak {r['peak_rss'] / MIB:,.0f} MiB  median step "
                f"{r['median_s']:.2f} s  load {r['load_before']:.1f}")
            outs[arm].append(r)
    rows = [combine(o) for o in outs.values()]
    return {"rounds": rounds, "steps": steps, "threads": rows[0]["threads"], "arms": rows, "processes": outs}


def report(res: dict, *, label: str) -> list[str]:
    """The heading line and the table, as docs/rl.md shows them."""
    return [f"**{label}, fp32, CPU** (each cell TRL's default / Spra; a fresh process per arm and round, "
            f"{res['rounds']} rounds interleaved; {res['steps']} steps each; {res['threads']} "
            f"thread{'s' if res['threads'] != 1 else ''}; memory in MiB)", "", *table(res["arms"]), ""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arm", choices=ARMS, help="one arm in this process (prints one JSON line)")
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--model", help="a transformers checkpoint folder (default: the packaged SmolLM2-135M-Instruct)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2, help="fresh processes per arm, interleaved")
    ap.add_argument("--json", help="also write every process's figures to this file")
    a = ap.parse_args()
    label = "SmolLM2-135M-Instruct" if a.model is None else Path(a.model).name
    if a.model is None:
        from spra_dist.demos.packaged import PACKAGED

        a.model = str(PACKAGED["smollm2"]())
    if a.arm:
        print(json.dumps(measure(a.arm, a.model, steps=a.steps)))
        return
    res = measure_all(a.model, arms=tuple(a.arms.split(",")), rounds=a.rounds, steps=a.steps,
                      log=lambda m: print(m, file=sys.stderr))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1) + "\n")
    print("\n".join(report(res, label=label)))


if __name__ == "__main__":
    main()
