"""Tables, target checks and the chart for docs/benchmarks.md, from the results ``bench.run_all`` gathers."""

from __future__ import annotations

import re
from pathlib import Path

BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
LABELS = {"spra": "spra_dist", "lora": "PEFT LoRA r=8", "shira": "PEFT SHiRA r=8",
          "dense_grad": "dense-gradient SpaRA", "full": "full fine-tuning", "floor": "floor (all frozen)"}
GIB = 2**30


def step_table(res: dict) -> list[str]:
    m = res["methods"]
    lora, floor = m.get("lora"), m.get("floor")
    lines = [f"**{res['model']}, {res['layers']} layers, batch {res['batch']} × {res['seq']}** "
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
    def mark(ok: bool) -> str:
        return "holds" if ok else "**does not hold**"

    out = []
    for res in steps:
        m, tag = res["methods"], f"{res['model']} L{res['layers']}"
        if {"spra", "lora", "floor"} <= m.keys():
            s, lo, fl = m["spra"], m["lora"], m["floor"]
            rss_ok = s["peak_rss"] <= 0.9 * lo["peak_rss"]
            out.append(f"- {tag}: step {s['median_s'] / lo['median_s']:.2f} × LoRA (≤ 0.90: "
                       f"{mark(s['median_s'] <= 0.9 * lo['median_s'])}), {s['median_s'] / fl['median_s']:.2f} × "
                       f"floor (≤ 1.05: {mark(s['median_s'] <= 1.05 * fl['median_s'])}); peak RSS "
                       f"{s['peak_rss'] / lo['peak_rss']:.2f} × LoRA (≤ 0.90: {mark(rss_ok)})")
    limits = {("llama3-8b", "r8"): 2.0, ("llama3-70b", "r8"): 15.0}
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
    methods = list(steps[0]["methods"])
    width = 0.8 / len(steps)
    for i, res in enumerate(steps):
        xs = [j + i * width for j in range(len(methods))]
        label = f"{res['model']} L{res['layers']}"
        axes[0].bar(xs, [res["methods"][m]["median_s"] for m in methods], width, label=label)
        axes[1].bar(xs, [res["methods"][m]["peak_rss"] / GIB for m in methods], width, label=label)
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
