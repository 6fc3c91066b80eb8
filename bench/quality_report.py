"""docs/quality.md and docs/quality.png from the study's records (``bench.quality`` groups them per arm).

Every number on the page is computed here from quality.jsonl: rerunning ``python -m bench.quality --report``
rewrites both files from the same lines.
"""

from __future__ import annotations

import platform
import statistics
from pathlib import Path

LABELS = {"spra": "SpaRA", "lora": "PEFT LoRA", "shira": "PEFT SHiRA", "full": "full fine-tuning",
          "head": "head only"}
TARGET_POINTS = 1.0  # SpaRA may trail LoRA by at most this many accuracy points
TARGET_PPL = 0.02  # SFT: by at most this relative perplexity


def label(arm) -> str:
    name = LABELS[arm.method] + (f" r={arm.rank}" if arm.rank is not None else "")
    return name + (", attention V/O only (k of all linears)" if arm.targets == "vo" else "")


def mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def pm(values: list[float], *, scale: float = 1.0, digits: int = 1) -> str:
    """``mean ± std (n=…)``, the std over seeds (sample std); ``–`` without values."""
    if not values:
        return "–"
    mean, std = mean_std([v * scale for v in values])
    spread = f" ± {std:.{digits}f}" if std is not None else ""
    return f"{mean:.{digits}f}{spread} (n={len(values)})"


def metric(row: dict, split: str, key: str) -> list[float]:
    return [r[split][key] for r in row["final"] if r[split] and key in r[split]]  # a probe has no test


def wall(rows: list[dict]) -> str:
    cells = [r for row in rows for r in list(row["seed0"].values()) + row["final"][1:]]
    if not cells:
        return "no cell has run yet"
    median = statistics.median(r["wall_s"] for r in cells)
    return (f"{sum(r['wall_s'] for r in cells):,.0f} s over {len(cells)} cells (median cell {median:.0f} s, "
            f"training alone {statistics.median(r['train_s'] for r in cells):.0f} s)")


def state(row: dict) -> str:
    if row["chosen"] is None:
        return f"grid {len(row['seed0'])} of {len(row['grid'])} rates"
    return f"{row['chosen']:g}"


def example_command(rows: list[dict]) -> str:
    cells = [r for row in rows for r in row["final"][:1]]
    return f"One cell, exactly as run: `{cells[0]['command']}`." if cells else ""


def trainable(row: dict) -> str:
    return f"{row['final'][0]['trainable']:,}" if row["final"] else "–"


# (header, value of a row) per column; every figure is a mean ± std over the seeds at the chosen rate.
CLS_COLUMNS = [
    ("test accuracy %", lambda row: pm(metric(row, "test", "accuracy"), scale=100)),
    ("val accuracy %", lambda row: pm(metric(row, "val", "accuracy"), scale=100)),
    ("test loss", lambda row: pm(metric(row, "test", "eval_loss"), digits=3)),
]
SFT_COLUMNS = [
    ("test exact match %", lambda row: pm(metric(row, "test", "exact_match"), scale=100)),
    ("test loss", lambda row: pm(metric(row, "test", "eval_loss"), digits=4)),
    ("test perplexity", lambda row: pm(metric(row, "test", "perplexity"), digits=4)),
    ("val loss", lambda row: pm(metric(row, "val", "eval_loss"), digits=4)),
]


def table(rows: list[dict], columns: list) -> list[str]:
    """One line per arm: method, trainable parameters, chosen rate, ``columns``, wall time per cell."""
    heads = ["method", "trainable", "lr (chosen on val)", *[h for h, _ in columns], "wall s / cell"]
    lines = ["| " + " | ".join(heads) + " |", "|---|" + "---:|" * (len(heads) - 1)]
    for row in rows:
        values = [label(row["arm"]), trainable(row), state(row), *[fn(row) for _, fn in columns],
                  pm([r["wall_s"] for r in row["final"]], digits=0)]
        lines.append("| " + " | ".join(values) + " |")
    return lines + [""]


def lr_table(rows: list[dict]) -> list[str]:
    lines = ["| task | method | rate → validation (seed 0) | chosen | note |", "|---|---|---|---:|---|"]
    for row in rows:
        arm, cells = row["arm"], []
        for lr in row["grid"]:
            rec = row["seed0"].get(lr)
            text = "not run" if rec is None else (f"{100 * rec['val']['accuracy']:.1f}% / {rec['val']['eval_loss']:.3f}"
                                                  if arm.task == "cls" else f"loss {rec['val']['eval_loss']:.4f}")
            cells.append(f"**{lr:g} → {text}**" if lr == row["chosen"] else f"{lr:g} → {text}")
        edge = row["chosen"] is not None and len(row["grid"]) > 1 and row["chosen"] in (min(row["grid"]),
                                                                                        max(row["grid"]))
        grown = len(row["grid"]) - len(arm.lrs)
        note = [f"grid grown by {grown}" if grown > 0 else "",
                f"still at an edge after {row['extend']} extensions" if edge else ""]
        lines.append(f"| {arm.task} | {label(arm)} | {' · '.join(cells)} | {state(row)} | "
                     f"{'; '.join(n for n in note if n)} |")
    return lines + [""]


def points(a: dict, b: dict, key: str = "accuracy") -> tuple[float, float, float] | None:
    """(mean of a, mean of b, a − b) in points of test ``key``; None until both have results."""
    va, vb = metric(a, "test", key), metric(b, "test", key)
    if not va or not vb:
        return None
    ma, mb = 100 * statistics.fmean(va), 100 * statistics.fmean(vb)
    return ma, mb, ma - mb


def verdict_points(name: str, a: dict, b: dict, a_name: str, b_name: str, *, target: bool = True) -> str:
    """One line: the difference in test accuracy points, said plainly when ``a`` loses; with ``target``, whether
    ``a`` stays within TARGET_POINTS of ``b``."""
    got = points(a, b)
    if got is None:
        return f"- {name}: not measured yet."
    ma, mb, diff = got
    seeds = f"{len(a['final'])} and {len(b['final'])} seeds"
    if diff >= 0:
        plain = f"{a_name} is ahead by {diff:.2f} points" if diff > 0 else "level"
    else:
        plain = f"**{a_name} loses to {b_name} by {-diff:.2f} points**"
    met = "target met" if diff >= -TARGET_POINTS else "**target missed**"
    goal = f" ({met}: within {TARGET_POINTS:g} point)" if target else ""
    return (f"- {name}: {a_name} {ma:.1f}% vs {b_name} {mb:.1f}% test accuracy ({seeds}): {a_name} − {b_name} = "
            f"{diff:+.2f} points; {plain}{goal}.")


def verdict_ppl(a: dict, b: dict) -> str:
    pa, pb = metric(a, "test", "perplexity"), metric(b, "test", "perplexity")
    if not pa or not pb:
        return "- SFT: not measured yet."
    ma, mb = statistics.fmean(pa), statistics.fmean(pb)
    rel = ma / mb - 1
    plain = ("SpaRA is lower (better)" if rel <= 0
             else f"**SpaRA's perplexity is higher than LoRA's by {100 * rel:.2f}%**")
    met = "target met" if rel <= TARGET_PPL else "**target missed**"
    em = points(a, b, "exact_match")
    em_text = f"; exact match SpaRA − LoRA = {em[2]:+.1f} points" if em else ""
    return (f"- SFT: test perplexity SpaRA {ma:.4f} vs LoRA {mb:.4f}: {100 * rel:+.2f}% relative; {plain} ({met}: "
            f"within {100 * TARGET_PPL:g}%){em_text}.")


PROBE_TEXT = {"--warmup": "warmup {} steps (study: {})", "--weight-decay": "AdamW weight decay {} (study: 0)",
              "--alloc": "budget: the same total k at one {} over all linears (study: r·(n_in + n_out) per matrix)"}


def probe_change(arm, *, warmup: int, lr: float) -> str:
    """What a probe changes from the studied run (``warmup``, ``lr``: the study's)."""
    if not arm.change:
        return f"peak learning rate {arm.lrs[0]:g} (study: {lr:g})"
    flag, value = arm.change
    return PROBE_TEXT[flag].format(value, warmup)


def probe_table(probes: list[dict], base: dict, lora: dict, warmup: int) -> list[str]:
    """Validation accuracy per probe against SpaRA r=4 as studied and LoRA r=4 (their seeds at the chosen rate)."""
    ref = metric(base, "val", "accuracy")
    lines = ["| run | change | val accuracy % | val loss | − SpaRA r=4 (points) | wall s / cell |",
             "|---|---|---:|---:|---:|---:|"]
    lr = base["chosen"]
    for name, row, change in [(f"SpaRA r=4 at {lr:g}", base, "–"), ("LoRA r=4 at its chosen rate", lora, "–"),
                              *[(r["arm"].name, r, probe_change(r["arm"], warmup=warmup, lr=lr)) for r in probes]]:
        acc = metric(row, "val", "accuracy")
        diff = f"{100 * (statistics.fmean(acc) - statistics.fmean(ref)):+.2f}" if acc and ref else "–"
        lines.append(f"| {name} | {change} | {pm(acc, scale=100)} | {pm(metric(row, 'val', 'eval_loss'), digits=3)}"
                     f" | {diff} | {pm([r['wall_s'] for r in row['final']], digits=0)} |")
    return lines + [""]


def protocol(scales: dict, records: list[dict], extend: int) -> list[str]:
    c, s = scales["cls"], scales["sft"]
    head = sorted({r["head_lr"] for r in records if r["task"] == "cls" and r["method"] != "head"})
    head_lr = " / ".join(f"{h:g}" for h in head) if head else "a fixed rate (`HEAD_LR`)"
    return [
        "## Protocol", "",
        f"- **Classification**: all-MiniLM-L6-v2 with a fresh 2-class head on the bundled Rotten Tomatoes reviews "
        f"(deduplicated, fixed hash split): train on the first {c.train:,} reviews of the train split, validation "
        f"on the next {c.val:,} (disjoint from test), test on "
        f"{'the whole held-out split' if c.test is None else f'{c.test:,} held-out reviews'}; at most "
        f"{c.max_length} tokens a review. {c.steps} steps of {c.batch} ({c.steps * c.batch:,} reviews).",
        f"- **SFT**: SmolLM2-135M-Instruct on the date-writing chats (`python -m spra_dist.demos.dates`): train on "
        f"the first {s.train:,} conversations of train.jsonl, validation on the next {s.val:,}, test on "
        f"{s.test} conversations of eval.jsonl (loss, perplexity) and greedy exact match on its first "
        f"{s.generate} prompts. {s.steps} steps of {s.batch}; loss on the assistant turns.",
        "- **One loop for every method** (`bench/quality_cell.py`, `train`): AdamW without weight decay, linear "
        f"warmup ({c.warmup} steps; SFT {s.warmup}) then cosine decay to zero, gradient clipping at 1.0, the same "
        "examples in the same order for a given seed. A method only decides how the model is prepared and which "
        f"parameters train. The classification head trains at {head_lr} in every method; head-only trains it alone at "
        "its chosen rate.",
        "- **Budgets**: SpaRA r trains k = r·(n_in + n_out) entries of each adapted matrix, PEFT LoRA rank r "
        "(alpha = 2r, no dropout) and PEFT SHiRA r the same count; all-linear targets, the head trained densely "
        "(PEFT: `modules_to_save`). The V/O arm spreads the all-linear r=8 total k over the attention value and "
        "output projections with one density.",
        f"- **Learning rate**: each arm's grid runs with seed 0; the best on validation (accuracy, then loss; SFT: "
        f"loss) is chosen and the other seeds ({c.seeds} for classification, {s.seeds} for SFT in all) run at that "
        "rate only. When the best rate sits at an end of the grid, the next rate on the 1-3-10 ladder past that end "
        f"runs as well (at most {extend} times per arm). The test split never takes part in the choice. A seed fixes "
        "data order, head init and the method's random mask or init.",
        "- **r=4's grid** holds 5e-3 as well, for both SpaRA and LoRA: on the 1-3-10 grid SpaRA r=4 missed the target, "
        "and of the validation-only probes at the end of this page the rate was the one setting that moved it.", ""]


def write(rows: list[dict], scales: dict, *, out: Path) -> None:
    """quality.md and quality.png in ``out``."""
    cls = [r for r in rows if r["arm"].part == "methods"]
    probes = [r for r in rows if r["arm"].part == "probe"]
    by = {(r["arm"].task, r["arm"].name): r for r in rows if r["arm"].part != "probe_base"}
    base = next((r for r in rows if r["arm"].part == "probe_base"), None)
    placement = [r for r in rows if r["arm"].part == "placement"] + [by[("cls", "spra_r8")]]
    sft = [r for r in rows if r["arm"].part == "sft"]
    grids = [row for row in rows if row["arm"].part not in ("probe", "probe_base")]
    seed0_rows = [{"seed0": row["seed0"], "final": []} for row in grids]
    cells = [r for row in rows for r in row["seed0"].values()] + [r for row in rows for r in row["final"][1:]]
    records = list({r["id"]: r for r in cells}.values())  # the probes' base shares its cells with SpaRA r=4
    last = max((r["when"] for r in records), default="never")
    loads = [r["load_before"] for r in records]
    machine = (f"{records[0]['cpus']} CPUs, {records[0]['threads']} torch threads, load average "
               f"{min(loads):.1f}–{max(loads):.1f} before the cells" if records else "no cells yet")
    lines = ["# Quality: SpaRA against LoRA, SHiRA, full fine-tuning and head-only training", "",
             f"_Generated by `make quality` (`python -m bench.quality`) from [quality.jsonl](quality.jsonl) "
             f"({len(records)} cells; last cell {last}; {platform.machine()}, {machine}). Rerun the command to resume; "
             "`--report` rewrites this page from the JSONL alone._", "",
             *protocol(scales, records, rows[0]["extend"] if rows else 0),
             "## Classification: MiniLM-L6 on Rotten Tomatoes", "",
             "Command: `make quality` (this table alone: `python -m bench.quality --only cls`). "
             f"Wall time: {wall(cls)}.",
             "", *table(cls, CLS_COLUMNS), "Verdicts (test accuracy, mean over seeds):", ""]
    for rank in (4, 8, 16):
        if ("cls", f"spra_r{rank}") in by and ("cls", f"lora_r{rank}") in by:
            lines.append(verdict_points(f"r={rank}", by[("cls", f"spra_r{rank}")], by[("cls", f"lora_r{rank}")],
                                        "SpaRA", "LoRA"))
    if ("cls", "shira_r8") in by:
        lines.append(verdict_points("r=8, against SHiRA", by[("cls", "spra_r8")], by[("cls", "shira_r8")], "SpaRA",
                                    "SHiRA", target=False))
    lines += ["", example_command(cls), "", "![test accuracy against trainable parameters](quality.png)", "",
              "## Learning-rate selection (validation, seed 0)", "",
              "Each cell shows the rate → validation accuracy / loss; the chosen rate is bold. Command: `make quality` "
              f"(the seed-0 cells of every arm). Wall time: {wall(seed0_rows)}.", "",
              *lr_table(grids),
              "## Placement: attention V/O only against all linears, equal k", "",
              "Command: `python -m bench.quality --only cls/spra_vo_r8,cls/spra_r8`. "
              f"Wall time: {wall(placement[:1])} (all linears: in the table above).",
              "", *table(placement, CLS_COLUMNS),
              verdict_points("placement", placement[0], placement[-1], "V/O only", "all linears", target=False), "",
              "## SFT: SmolLM2-135M, dates to YYYY-MM-DD", "",
              f"Command: `python -m bench.quality --only sft`. Wall time: {wall(sft)}.", "", *table(sft, SFT_COLUMNS)]
    if len(sft) == 2:
        lines.append(verdict_ppl(sft[0], sft[1]))
    lines += ["", example_command(sft), ""]
    if probes and base and base["chosen"] is not None and ("cls", "lora_r4") in by:
        lines += ["## Probes: why SpaRA r=4 trailed LoRA r=4 (validation only)", "",
                  f"One setting changed at a time from SpaRA r=4 at rate {base['chosen']:g} (its rate chosen on "
                  "validation from the 1-3-10 grid), each with the same seeds as the study; scored on validation "
                  "alone, the test split is never evaluated (`--no-test`). Command: `python -m bench.quality --only "
                  f"'cls/spra_r4_*'`. Wall time: {wall(probes)}.", "",
                  *probe_table(probes, base, by[("cls", "lora_r4")], scales["cls"].warmup),
                  verdict_points(f"r=4 at {base['chosen']:g}, the 1-3-10 grid's choice (what the probes started from)",
                                 base, by[("cls", "lora_r4")], "SpaRA", "LoRA"), ""]
    (out / "quality.md").write_text("\n".join(lines), encoding="utf-8")
    chart([r for r in rows if r["arm"].task == "cls" and r["arm"].part in ("methods", "placement")], sft,
          out / "quality.png")


def chart(cls: list[dict], sft: list[dict], path: Path) -> None:
    """Test accuracy against trainable parameters per method (error bars: std over seeds); SFT perplexity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [2, 1]})
    series: dict[str, list[tuple[int, float, float]]] = {}
    for row in cls:
        acc = metric(row, "test", "accuracy")
        if acc:
            mean, std = mean_std([100 * a for a in acc])
            name = LABELS[row["arm"].method] + (" V/O" if row["arm"].targets == "vo" else "")
            series.setdefault(name, []).append((row["final"][0]["trainable"], mean, std or 0.0))
    for name, points_ in series.items():
        points_.sort()
        xs, ys, es = zip(*points_, strict=True)
        left.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=name)
    left.set_xscale("log")
    left.set(xlabel="trainable parameters", ylabel="test accuracy (%)", title="MiniLM-L6, Rotten Tomatoes")
    if series:
        left.legend(fontsize=8)
    for i, row in enumerate(sft):
        ppl = metric(row, "test", "perplexity")
        if ppl:
            mean, std = mean_std(ppl)
            right.errorbar([i], [mean], yerr=[std or 0.0], fmt="o", capsize=4, color=f"C{i}")
    right.set_xticks(range(len(sft)), [label(row["arm"]) for row in sft], fontsize=8)
    right.set_xlim(-0.5, len(sft) - 0.5)
    right.set(ylabel="test perplexity", title="SmolLM2-135M SFT")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
