"""Tables, target checks and the chart for docs/benchmarks.md, from the results ``bench.run_all`` gathers."""

from __future__ import annotations

import re
from pathlib import Path

BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
LABELS = {"spra": "spra_dist (sampled_addmm)", "spra_cpp": "spra_dist (C++ kernel)",
          "lora": "PEFT LoRA r=8", "shira": "PEFT SHiRA r=8",
          "dense_grad": "dense-gradient SpaRA", "full": "full fine-tuning", "floor": "floor (all frozen)"}
GIB = 2**30


def step_table(res: dict) -> list[str]:
    m = res["methods"]
    lora, floor = m.get("lora"), m.get("floor")
    cast = f", {res['autocast']} autocast" if res.get("autocast") else ", fp32"
    lines = [f"**{res['model']}, {res['layers']} layers, batch {res['batch']} × {res['seq']}{cast}** "
             f"({res['rounds']} fresh processes per method, interleaved; {res['warmup']} warm-up + {res['steps']} "
             f"timed steps each; load average before each run: "
             f"{min(min(r['load']) for r in m.values()):.1f}–{max(max(r['load']) for r in m.values()):.1f})", "",
             "| method | trainable | median step (s) | × LoRA | × floor | tokens/s | peak RSS (GiB) | RSS × LoRA "
             "| per-process medians (s) |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, r in m.items():
        x_lora = f"{r['median_s'] / lora['median_s']:.2f}" if lora else "–"
        x_floor = f"{r['median_s'] / floor['median_s']:.2f}" if floor else "–"
        rss_lora = f"{r['peak_rss'] / lora['peak_rss']:.2f}" if lora else "–"
        rounds = ", ".join(f"{t:.3f}" for t in r["round_medians"])
        lines.append(f"| {LABELS[name]} | {r['trainable']:,} | {r['median_s']:.3f} | {x_lora} | {x_floor} | "
                     f"{r['tokens_s']:.0f} | {r['peak_rss'] / GIB:.2f} | {rss_lora} | {rounds} |")
    return lines + [""]


def mask_table(rows: list[dict]) -> list[str]:
    lines = ["| shapes | budget | matrices | indices | rebuild (s, one core) | peak RSS growth (MiB) "
             "| of which kept indices (MiB) |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['budget']} | {r['matrices']} | {r['total_k']:,} | {r['seconds']:.2f} | "
                     f"{r['peak_rss_growth'] / 2**20:.0f} | {r['kept_bytes'] / 2**20:.0f} |")
    return lines + [""]


def adapter_table(rows: list[dict], layers: int) -> list[str]:
    lines = [f"SmolLM2-135M shapes ({layers} layers), every attention and MLP linear, fp32 values.", "",
             "| method | trainable values k | weights file (B) | config file (B) | weights − 4k (B) |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {LABELS[r['method']]} | {r['k']:,} | {r['weights_bytes']:,} | {r['config_bytes']:,} | "
                     f"{r['weights_bytes'] - r['k'] * r['bytes_per_value']:,} |")
    return lines + [""]


def target_lines(steps: list[dict], masks: list[dict], adapters: list[dict]) -> list[str]:
    """Each target of the performance issue, per config and per CPU path of spra_dist, with its figure."""
    def mark(ok: bool) -> str:
        return "holds" if ok else "**does not hold**"

    out = []
    for res in steps:
        m = res["methods"]
        tag = f"{res['model']} L{res['layers']}" + (f" {res['autocast']}" if res.get("autocast") else "")
        for name in ("spra", "spra_cpp"):
            if name not in m:
                continue
            s, parts = m[name], []
            if "lora" in m:
                x = s["median_s"] / m["lora"]["median_s"]
                parts.append(f"step {x:.2f} × LoRA (≤ 0.95: {mark(x <= 0.95)})")
            if "floor" in m:
                x, rss = s["median_s"] / m["floor"]["median_s"], s["peak_rss"] / m["floor"]["peak_rss"]
                parts.append(f"{x:.2f} × floor (≤ 1.05: {mark(x <= 1.05)})")
                if not res.get("autocast"):
                    parts.append(f"peak RSS {rss:.3f} × floor (≤ 1.03: {mark(rss <= 1.03)})")
            out.append(f"- {tag}, {LABELS[name]}: " + ", ".join(parts))
    limits = {("llama3-8b", "r8"): 2.0, ("llama3-70b", "r8"): 5.0}
    for r in masks:
        if (r["model"], r["budget"]) in limits:
            lim = limits[(r["model"], r["budget"])]
            out.append(f"- mask rebuild {r['model']} {r['budget']}: {r['seconds']:.2f} s (≤ {lim:.0f} s: "
                       f"{mark(r['seconds'] <= lim)})")
    for r in adapters:
        if r["method"] == "spra":
            lim = r["k"] * r["bytes_per_value"] + 16 * 1024
            both = r["weights_bytes"] + r["config_bytes"]
            out.append(f"- adapter weights file {r['weights_bytes']:,} B vs k × {r['bytes_per_value']} + 16 KiB = "
                       f"{lim:,} B: {mark(r['weights_bytes'] <= lim)}; with its config file "
                       f"{both:,} B: {mark(both <= lim)}")
    return out + [""]


def chart(steps: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    steps = [res for res in steps if not res.get("autocast")]  # bf16 steps on CPU are on another scale
    methods = [m for m in LABELS if any(m in res["methods"] for res in steps)]
    width = 0.8 / len(steps)
    for i, res in enumerate(steps):
        shown = [j for j, m in enumerate(methods) if m in res["methods"]]
        xs = [j + i * width for j in shown]
        label = f"{res['model']} L{res['layers']}"
        axes[0].bar(xs, [res["methods"][methods[j]]["median_s"] for j in shown], width, label=label)
        axes[1].bar(xs, [res["methods"][methods[j]]["peak_rss"] / GIB for j in shown], width, label=label)
    for ax, title in zip(axes, ("median step time (s)", "peak RSS (GiB)"), strict=True):
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(methods))], [LABELS[m] for m in methods],
                      rotation=25, ha="right", fontsize=8)
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write(doc: Path, generated: list[str]) -> None:
    """Replace the text between the markers; the hand-written notes around it stay."""
    body = "\n".join([BEGIN, *generated, END])
    text = doc.read_text() if doc.exists() else f"# Benchmarks\n\n{BEGIN}\n{END}\n"
    doc.write_text(re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: body, text, flags=re.S))
