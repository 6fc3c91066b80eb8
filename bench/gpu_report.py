"""docs/benchmarks-gpu.md from the parts of ``make gpu-check`` (bench/gpu_check.py): plain markdown tables."""

from __future__ import annotations

import re
import statistics

LABELS = {"spra_triton": "spra_dist, Triton SDDMM", "spra_mask_on_gpu": "spra_dist, Triton, masks kept on the GPU",
          "spra_sampled_addmm": "spra_dist, sampled_addmm",
          "lora": "PEFT LoRA r=8", "shira": "PEFT SHiRA r=8", "floor": "floor (all frozen)"}
TAIL_LINES = 40


def render(info: dict, parts: list, *, batch: int, seq: int, layers: int, limits: dict) -> str:
    """The whole page. ``parts``: objects with name, ok, timed_out, returncode, seconds, limit_s, output, records."""
    by_name = {p.name: p for p in parts}
    lines = ["# GPU path: checks and benchmarks", "",
             f"_Written by `make gpu-check` (bench/gpu_check.py) on {info.get('when', '?')}: {info.get('gpu', '?')}, "
             f"CUDA {info.get('cuda')}, torch {info.get('torch')}, triton {info.get('triton')}, transformers "
             f"{info.get('transformers')}, peft {info.get('peft')}, Python {info.get('python')}. Rerun it to "
             "refresh this page; the kernel and the tests are described in [benchmarks.md](benchmarks.md#gpu-path)._",
             ""]
    if "watchdog" in info:
        lines += [f"**The watchdog {info['watchdog']}**: parts not listed did not run.", ""]
    lines += ["| part | result | time (s) | limit (s) |", "|---|---|---:|---:|"]
    for name, limit in limits.items():
        p = by_name.get(name)
        result = "not run" if p is None else "ok" if p.ok else ("out of time" if p.timed_out else
                                                                f"failed (exit {p.returncode})")
        lines.append(f"| {name} | {result} | {'' if p is None else f'{p.seconds:.0f}'} | {limit} |")
    lines.append("")
    lines += tests_section(by_name.get("tests"))
    lines += bench_section(by_name.get("bench"), batch=batch, seq=seq, layers=layers)
    lines += fsdp2_section(by_name.get("fsdp2"))
    return "\n".join(lines).rstrip() + "\n"


def _tail(part) -> list[str]:
    return ["```", *part.output.rstrip().splitlines()[-TAIL_LINES:], "```", ""]


def tests_section(part) -> list[str]:
    lines = ["## Tests on CUDA", "", "`pytest tests/test_cuda.py tests/test_triton.py` (the layer against float64 "
             "references in fp32 and bf16 autocast, the Triton SDDMM compiled and against sampled_addmm, a tiny "
             "Llama's training steps):", ""]
    if part is None:
        return lines + ["Not run.", ""]
    summary = [ln for ln in part.output.splitlines() if re.search(r"\d+ (passed|failed|error)", ln)]
    lines += [f"`{summary[-1].strip('= ')}`" if summary else "No pytest summary line.", ""]
    return lines if part.ok else lines + _tail(part)


def sddmm_rows(records: list[dict]) -> list[str]:
    rows = [r["sddmm"] for r in records if "sddmm" in r]
    if not rows:
        return []
    lines = [f"### The values' gradient alone: bf16 activations, {rows[0]['tokens']:,} tokens, median ms", "",
             "| shape (out × in), k | Triton | sampled_addmm (with its fp32 transposed copies) | dense dYᵀX + gather |",
             "|---|---:|---:|---:|"]
    for r in rows:
        cells = [f"{r[b]:.3f}" if r.get(b) is not None else "" for b in ("triton", "sampled_addmm", "dense")]
        lines.append(f"| {r['shape'][0]} × {r['shape'][1]}, {r['k']:,} | " + " | ".join(cells) + " |")
    return lines + [""]


def step_rows(records: list[dict]) -> list[str]:
    runs: dict[str, list[dict]] = {}
    for r in records:
        if "step" in r:
            runs.setdefault(r["step"]["method"], []).append(r["step"])
    if not runs:
        return []
    med = {m: statistics.median(t for run in rs for t in run["step_s"]) for m, rs in runs.items()}
    peak = {m: max(run["peak_bytes"] or 0 for run in rs) for m, rs in runs.items()}

    def ratio(value, ref):
        return f"{value / ref:.2f}" if ref else ""

    lines = ["| method | trainable | median step (ms) | × LoRA | × floor | tokens/s | peak memory (GiB) "
             "| memory × LoRA | per-run medians (ms) |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for m, rs in runs.items():
        tokens_s = rs[0]["tokens_per_s"] * rs[0]["median_s"] / med[m]
        per_run = ", ".join(f"{1e3 * run['median_s']:.1f}" for run in rs)
        lines.append(f"| {LABELS.get(m, m)} | {rs[0]['trainable']:,} | {1e3 * med[m]:.1f} | "
                     f"{ratio(med[m], med.get('lora'))} | {ratio(med[m], med.get('floor'))} | {tokens_s:,.0f} | "
                     f"{peak[m] / 2**30:.2f} | {ratio(peak[m], peak.get('lora'))} | {per_run} |")
    return lines + [""]


def bench_section(part, *, batch: int, seq: int, layers: int) -> list[str]:
    lines = ["## Benchmarks", ""]
    if part is None:
        return lines + ["Not run.", ""]
    lines += sddmm_rows(part.records)
    steps = step_rows(part.records)
    if steps:
        lines += [f"### Training steps: SmolLM2-135M shapes, {layers} layers, bf16 weights, batch {batch} × {seq}",
                  "", "Forward + backward + AdamW; random init, the same token ids for every method; all seven "
                  "projections of every layer adapted at the LoRA r=8 budget; peak memory is "
                  "`torch.cuda.max_memory_allocated` from the first step on (weights included).", "", *steps]
    return lines if part.ok else lines + ["The part did not finish; its output ends:", "", *_tail(part)]


def fsdp2_section(part) -> list[str]:
    lines = ["## FSDP2 smoke (1 GPU, nccl)", ""]
    if part is None:
        return lines + ["Not run.", ""]
    rec = next((r["fsdp2"] for r in part.records if "fsdp2" in r), None)
    if rec is not None:
        lines += [f"`torchrun --nproc_per_node 1 -m bench.fsdp2_smoke`: debug tiny Llama, {rec['steps']} steps on "
                  f"{rec['backend']} / {rec['device']}, values sharded as {rec['sharded']} on "
                  f"{rec['values_device']}, k = {rec['k_total']:,}; loss {rec['losses'][0]:.3f} → "
                  f"{rec['losses'][-1]:.3f} in {rec['seconds']:.1f} s; adapter saved from the shards and reloaded "
                  f"{'exactly' if rec['adapter_roundtrip'] else 'WITH DIFFERENCES'}.", ""]
    return lines if part.ok else lines + _tail(part)
