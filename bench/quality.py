"""The quality study: SpaRA against PEFT LoRA, PEFT SHiRA, full fine-tuning and head-only training (MiniLM-L6,
Rotten Tomatoes), SpaRA on attention V/O only against all linears at equal k, and SpaRA against LoRA for SFT
(SmolLM2-135M, dates to YYYY-MM-DD). Writes docs/quality.md and docs/quality.png.

    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.quality                      # make quality: the whole study, resumable
    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.quality --only 'cls/spra_r8,cls/lora_r8'
    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.quality --list               # every cell: done, to run, waiting
    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.quality --report             # rewrite the report from the JSONL

A cell is one arm (a method at one budget) at one learning rate and seed, named ``cls/spra_r8/lr=0.01/seed=0``;
it trains in a fresh process (``bench.quality_cell``) and its result is appended to docs/quality.jsonl as one
line, so a rerun skips every finished cell. Protocol: an arm's learning rate is the best on validation with
seed 0 over its grid (accuracy for classification, loss for SFT; the test split is never used to choose), and
its other seeds run at that rate only. When the best rate sits at an end of the grid, the grid grows by the next
rate on the 1-3-10 ladder beyond that end and that cell runs too (at most ``EXTEND`` times per arm), so a choice at an
edge is never taken for an optimum without a look past it.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import fnmatch
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench import quality_report

ROOT = Path(__file__).resolve().parent.parent
# Grids as validation placed them: at r=4 SpaRA fell from 3e-3 upwards and LoRA rose up to 3e-3.
SPRA, LORA, HEAD = (1e-3, 3e-3, 1e-2), (1e-3, 3e-3, 1e-2), (3e-3, 1e-2, 3e-2)
# r=4, where the verdict failed on the 1-3-10 grid: the probes found 5e-3 worth +0.9 points to SpaRA on validation
# (the only setting that moved it), so both methods' r=4 grids gain 5e-3 and choose again on validation.
R4 = (1e-3, 3e-3, 5e-3, 1e-2)
EXTEND = 2  # at most this many rates added past the ends of an arm's grid


@dataclass(frozen=True)
class Arm:
    """One method at one budget: a row of the report."""

    name: str
    task: str  # cls | sft
    method: str  # spra | lora | shira | full | head (bench.quality_cell.METHODS)
    lrs: tuple[float, ...]
    rank: int | None = None
    targets: str = "all"  # all | vo
    part: str = "methods"  # the report's section: methods | placement | sft | probe
    change: tuple[str, ...] = ()  # a probe's flags, after the scale's (so ``--warmup 0`` wins); never the test split

    def flags(self) -> list[str]:
        out = ["--task", self.task, "--method", self.method]
        out += ["--rank", str(self.rank)] if self.rank is not None else []
        return out + (["--targets", self.targets] if self.targets != "all" else [])

    def probe_flags(self) -> list[str]:
        return [*self.change, "--no-test"] if self.part == "probe" else []


ARMS = [
    *[a for r in (4, 8, 16) for a in (Arm(f"spra_r{r}", "cls", "spra", R4 if r == 4 else SPRA, rank=r),
                                      Arm(f"lora_r{r}", "cls", "lora", R4 if r == 4 else LORA, rank=r))],
    Arm("shira_r8", "cls", "shira", SPRA, rank=8),  # the same delta parameterisation as SpaRA
    Arm("full", "cls", "full", (1e-5, 3e-5, 1e-4)),
    Arm("head", "cls", "head", HEAD),
    Arm("spra_vo_r8", "cls", "spra", SPRA, rank=8, targets="vo", part="placement"),
    Arm("spra_r8", "sft", "spra", (1e-3, 3e-3, 1e-2), rank=8, part="sft"),
    Arm("lora_r8", "sft", "lora", LORA, rank=8, part="sft"),
]
# Why SpaRA r=4 trails LoRA r=4: one setting changed at a time from SpaRA r=4 at its rate chosen on validation,
# scored on validation only (the probes never see test), three seeds each. The rate probe sits between the grid's
# 3e-3 (chosen) and 1e-2 (lower accuracy, lower loss on validation): the one gap the 1-3-10 grid leaves.
PROBE_LR = 3e-3
PROBES = {"spra_r4_warmup0": (PROBE_LR, ("--warmup", "0")), "spra_r4_warmup25": (PROBE_LR, ("--warmup", "25")),
          "spra_r4_wd0.1": (PROBE_LR, ("--weight-decay", "0.1")), "spra_r4_density": (PROBE_LR, ("--alloc", "density")),
          "spra_r4_lr5e-3": (5e-3, ())}
ARMS += [Arm(name, "cls", "spra", (lr,), rank=4, part="probe", change=change) for name, (lr, change) in PROBES.items()]
# What the probes are measured against: SpaRA r=4's own cells at the rate the probes changed from (no cells of its own).
PROBE_BASE = Arm("spra_r4", "cls", "spra", (PROBE_LR,), rank=4, part="probe_base")


@dataclass(frozen=True)
class Scale:
    """Sizes of every cell of one task: the cell's flags. A result counts only under the settings it ran with."""

    steps: int
    batch: int
    warmup: int
    max_length: int
    train: int
    val: int
    test: int | None  # None: the whole held-out split
    seeds: int
    generate: int = 0
    grid: int | None = None  # use only the first n rates of each grid (None: all)

    def settings(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("seeds", "grid")}

    def flags(self) -> list[str]:
        out = []
        for key, value in self.settings().items():
            if value is not None and not (key == "generate" and not value):
                out += [f"--{key.replace('_', '-')}", str(value)]
        return out


# 125 x 32 = 4,000 reviews: one epoch. 40 x 8 = 320 conversations (the SFT demo reaches 0.98 exact match in 60);
# evaluation costs an SFT cell as much as its training (greedy decoding above all), hence 100 / 200 / 64.
FULL = {"cls": Scale(steps=125, batch=32, warmup=8, max_length=64, train=4000, val=1000, test=None, seeds=3),
        "sft": Scale(steps=40, batch=8, warmup=4, max_length=96, train=1800, val=100, test=200, seeds=2,
                     generate=64)}
SMOKE = {"cls": Scale(steps=2, batch=8, warmup=1, max_length=32, train=48, val=16, test=16, seeds=1, grid=1),
         "sft": Scale(steps=2, batch=4, warmup=1, max_length=96, train=16, val=8, test=8, seeds=1, generate=2,
                      grid=1)}


def cell_id(arm: Arm, lr: float, seed: int) -> str:
    return f"{arm.task}/{arm.name}/lr={lr:g}/seed={seed}"


def selected(cid: str, only: list[str] | None) -> bool:
    """``--only`` patterns match a cell id, or its start up to a ``/`` (``cls``, ``cls/spra_r8``)."""
    return only is None or any(fnmatch.fnmatch(cid, p) or fnmatch.fnmatch(cid, p.rstrip("/") + "/*") for p in only)


def check_only(only: list[str] | None, arms: list[Arm], scales: dict[str, Scale], records: list[dict]) -> None:
    """Refuse a pattern that matches no cell the study could run (a typo would otherwise run nothing); rates a
    grid has grown to count."""
    ids = [cell_id(a, lr, s) for a in arms for lr in grid(a, scales[a.task], records)
           for s in range(scales[a.task].seeds)]
    for pattern in only or []:
        if not any(selected(cid, [pattern]) for cid in ids):
            arm_names = sorted({f"{a.task}/{a.name}" for a in arms})
            raise ValueError(f"--only {pattern!r} matches no cell; cells are named like cls/spra_r8/lr=0.01/seed=0, "
                             f"arms are {', '.join(arm_names)}")


def read_records(path: Path) -> list[dict]:
    """The JSONL's records; a line cut short by a kill mid-write is skipped (its cell runs again)."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            print(f"warning: skipped an unreadable line of {path}: {line[:80]!r}", file=sys.stderr)
    return out


def current(records: list[dict], scales: dict[str, Scale]) -> list[dict]:
    """Records made under the present settings of their task."""
    return [r for r in records if r.get("task") in scales and r.get("settings") == scales[r["task"]].settings()]


def beyond(lr: float, up: bool) -> float:
    """The next rate past ``lr`` on the 1-3-10 ladder (3e-3 -> 1e-2 up, 1e-3 down), exactly as a flag would parse."""
    mantissa, exponent = (int(part) for part in f"{lr:.0e}".split("e"))
    if mantissa not in (1, 3) or float(f"{mantissa}e{exponent}") != lr:
        raise ValueError(f"learning rate {lr:g} is not on the 1-3-10 ladder; grids use 1e-3, 3e-3, 1e-2, ...")
    if up:
        return float(f"3e{exponent}") if mantissa == 1 else float(f"1e{exponent + 1}")
    return float(f"1e{exponent}") if mantissa == 3 else float(f"3e{exponent - 1}")


def grid(arm: Arm, scale: Scale, records: list[dict]) -> tuple[float, ...]:
    """The arm's rates: its grid, grown past an end while the best of seed 0 on validation sits at that end."""
    rates = list(arm.lrs[: scale.grid] if scale.grid else arm.lrs)
    if scale.grid:  # a cut grid (the smoke study) never grows
        return tuple(rates)
    seed0 = seed0_records(arm, records)
    for _ in range(EXTEND):
        if len(rates) < 2 or any(lr not in seed0 for lr in rates):
            break
        best = min(rates, key=lambda lr: val_key(seed0[lr]))
        if best not in (rates[0], rates[-1]):
            break
        if best == rates[0]:
            rates.insert(0, beyond(best, up=False))
        else:
            rates.append(beyond(best, up=True))
    return tuple(rates)


def val_key(record: dict) -> tuple[float, ...]:
    """Smaller is better on validation: classification by accuracy (then loss), SFT by loss."""
    val = record["val"]
    return (-val["accuracy"], val["eval_loss"]) if record["task"] == "cls" else (val["eval_loss"],)


def choose_lr(arm: Arm, scale: Scale, records: list[dict]) -> float | None:
    """The grid's best rate on validation with seed 0; None until every rate of the (grown) grid has run."""
    seed0, rates = seed0_records(arm, records), grid(arm, scale, records)
    if any(lr not in seed0 for lr in rates):
        return None
    return min(rates, key=lambda lr: val_key(seed0[lr]))


def seed0_records(arm: Arm, records: list[dict]) -> dict[float, dict]:
    return {r["lr"]: r for r in records if r["task"] == arm.task and r["arm"] == arm.name and r["seed"] == 0}


def later_seeds(arm: Arm, scale: Scale, records: list[dict]) -> list[tuple[float, int]]:
    """(lr, seed) of the seeds after 0, at the chosen rate; none until it is chosen."""
    lr = choose_lr(arm, scale, records)
    return [(lr, s) for s in range(1, scale.seeds)] if lr is not None else []


def rows(arms: list[Arm], scales: dict[str, Scale], records: list[dict]) -> list[dict]:
    """Per arm, what the report shows: its grid on validation (seed 0) and its results at the chosen rate."""
    out = []
    for arm in arms:
        scale = scales[arm.task]
        lr = choose_lr(arm, scale, records)
        final = sorted((r for r in records if r["task"] == arm.task and r["arm"] == arm.name and r["lr"] == lr),
                       key=lambda r: r["seed"]) if lr is not None else []
        out.append({"arm": arm, "grid": grid(arm, scale, records), "extend": EXTEND,
                    "seed0": seed0_records(arm, records), "chosen": lr,
                    "final": final, "seeds": scale.seeds})
    return out


def headline(record: dict) -> str:
    val, test = record["val"], record["test"]
    if record["task"] == "cls":
        return f"val accuracy {val['accuracy']:.3f}" + (f", test accuracy {test['accuracy']:.3f}" if test else "")
    if test is None:
        return f"val loss {val['eval_loss']:.4f}"
    extra = f", exact match {test['exact_match']:.2f}" if "exact_match" in test else ""
    return f"val loss {val['eval_loss']:.4f}, test loss {test['eval_loss']:.4f}{extra}"


def command(arm: Arm, scale: Scale, lr: float, seed: int) -> list[str]:
    python = Path(sys.executable)
    shown = os.path.relpath(python, ROOT) if python.is_relative_to(ROOT) else str(python)
    return [shown, "-m", "bench.quality_cell", *arm.flags(), "--lr", repr(lr), "--seed", str(seed),
            *scale.flags(), *arm.probe_flags()]


def run_cell(arm: Arm, scale: Scale, lr: float, seed: int, *, out: Path) -> bool:
    """Run one cell in a fresh process and append its record to the JSONL; False when it failed."""
    cid, cmd = cell_id(arm, lr, seed), command(arm, scale, lr, seed)
    print(f"run  {cid}", flush=True)
    load = os.getloadavg()[0]  # other work on the machine slows a cell: the report shows the range
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True)
    wall = time.perf_counter() - start
    lines = proc.stdout.strip().splitlines()
    if proc.returncode or not lines:
        print(f"FAILED {cid} (exit status {proc.returncode}) after {wall:.0f} s:\n{proc.stderr[-3000:]}", flush=True)
        return False
    record = {"id": cid, "arm": arm.name, "part": arm.part, **json.loads(lines[-1]), "wall_s": round(wall, 1),
              "load_before": load, "cpus": os.cpu_count(),
              "settings": scale.settings(), "command": "HF_HUB_OFFLINE=1 " + shlex.join(cmd),
              "when": datetime.datetime.now().isoformat(timespec="seconds")}
    path = out / "quality.jsonl"
    # A line cut short by a kill mid-write must not swallow this record: start a fresh line after it.
    cut_short = path.is_file() and path.stat().st_size and not path.read_bytes().endswith(b"\n")
    with open(path, "a", encoding="utf-8") as f:  # one line per cell, written at once
        f.write("\n" * bool(cut_short) + json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())
    print(f"done {cid}: {headline(record)}, {wall:.0f} s", flush=True)
    return True


def run_study(arms: list[Arm], scales: dict[str, Scale], *, out: Path, only: list[str] | None) -> int:
    """Every selected cell not yet in the JSONL, arm by arm; returns the number of failed cells."""
    failed, path = 0, out / "quality.jsonl"
    for arm in arms:
        scale = scales[arm.task]
        seen: set[str] = set()
        while True:  # the grid's cells, then the seeds after 0 once it has stopped growing and a rate is chosen
            records = current(read_records(path), scales)
            done = {r["id"] for r in records}
            cells = [(lr, 0) for lr in grid(arm, scale, records)] + later_seeds(arm, scale, records)
            todo = [(lr, seed) for lr, seed in cells if selected(cell_id(arm, lr, seed), only)
                    and cell_id(arm, lr, seed) not in seen]
            if not todo:
                break
            for lr, seed in todo:
                cid = cell_id(arm, lr, seed)
                seen.add(cid)  # tried once per run: a failed cell is not retried in a loop
                if cid in done:
                    print(f"skip {cid} (in {path.name})", flush=True)
                elif not run_cell(arm, scale, lr, seed, out=out):
                    failed += 1
    return failed


def list_cells(arms: list[Arm], scales: dict[str, Scale], records: list[dict], only: list[str] | None) -> None:
    done = {r["id"] for r in records}
    for arm in arms:
        scale = scales[arm.task]
        for lr, seed in [(lr, 0) for lr in grid(arm, scale, records)] + later_seeds(arm, scale, records):
            cid = cell_id(arm, lr, seed)
            state = "done" if cid in done else "to run" if selected(cid, only) else "not selected"
            print(f"{cid:40s} {state}")
        if choose_lr(arm, scale, records) is None and scale.seeds > 1:
            later = f"{arm.task}/{arm.name}/seed=1..{scale.seeds - 1}"
            print(f"{later:40s} waits for the rate chosen on validation")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="comma-separated cell ids or patterns: cls, sft, cls/spra_r8, 'cls/*/seed=0'")
    ap.add_argument("--out", type=Path, default=ROOT / "docs", help="folder of quality.jsonl, .md and .png")
    ap.add_argument("--list", action="store_true", help="print every cell and its state; run nothing")
    ap.add_argument("--report", action="store_true", help="only rewrite the report from the JSONL")
    ap.add_argument("--smoke", action="store_true", help="tiny splits, 2 steps, one rate and one seed per arm")
    a = ap.parse_args()
    only = [p.strip() for p in a.only.split(",") if p.strip()] if a.only else None
    scales = SMOKE if a.smoke else FULL
    try:
        check_only(only, ARMS, scales, current(read_records(a.out / "quality.jsonl"), scales))
    except ValueError as err:
        ap.error(str(err))
    a.out.mkdir(parents=True, exist_ok=True)
    if a.list:
        list_cells(ARMS, scales, current(read_records(a.out / "quality.jsonl"), scales), only)
        return
    failed = 0 if a.report else run_study(ARMS, scales, out=a.out, only=only)
    records = current(read_records(a.out / "quality.jsonl"), scales)
    quality_report.write(rows([*ARMS, PROBE_BASE], scales, records), scales, out=a.out)
    print(f"wrote {a.out / 'quality.md'} and {a.out / 'quality.png'}")
    if failed:
        sys.exit(f"{failed} cell(s) failed; rerun the same command to retry them")


if __name__ == "__main__":
    main()
