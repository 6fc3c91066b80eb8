"""The whole benchmark: step time and memory against LoRA / SHiRA / dense-gradient / full / floor, mask rebuild,
adapter sizes; prints the tables and rewrites the generated part of docs/benchmarks.md and its chart.

    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.run_all            # about 22 minutes on 2 quiet cores
    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.run_all --quick    # about 90 s: checks that it all runs
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import tempfile
from pathlib import Path

import torch

from bench import adapter_size, masks, quantized_memory, report, step_time

DOCS = Path(__file__).resolve().parent.parent / "docs"
# (model, layers): SmolLM2-135M shapes at two depths, all-MiniLM-L6-v2 shapes.
FULL = [("smollm2", 2), ("smollm2", 6), ("minilm", 6)]
# bf16 autocast: a bf16 matmul on a CPU without bf16 instructions is tens of times slower than fp32, so a
# smaller batch and only the methods the bf16 target compares.
BF16 = {"model": "minilm", "layers": 6, "batch": 2, "seq": 128, "methods": ("spra", "spra_cpp", "lora", "floor")}


def measure_quantized(*, quick: bool) -> dict:
    """bench.quantized_memory's arms: SmolLM2-135M's real weights, all 30 layers, 4 × 256 tokens (quick: a tiny
    random Llama, one step)."""
    if not quick:
        from spra_dist.demos.packaged import smollm2_dir

        return quantized_memory.measure_all(str(smollm2_dir()), rounds=2, batch=4, seq=256, steps=3, warmup=1)
    with tempfile.TemporaryDirectory() as tmp:
        return quantized_memory.measure_all(quantized_memory.tiny_checkpoint(tmp), label="tiny Llama", rounds=1,
                                            batch=1, seq=32, steps=1, warmup=0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one tiny model, one round; writes nothing under docs/")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per process, after the warm-up")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--configs", default=",".join(f"{m}:{n}" for m, n in FULL),
                    help="model:layers list, e.g. smollm2:6,minilm:6")
    ap.add_argument("--no-bf16", action="store_true", help="skip the bf16 autocast table")
    ap.add_argument("--no-quantized", action="store_true", help="skip the quantized-base memory table")
    a = ap.parse_args()
    configs = [(c.split(":")[0], int(c.split(":")[1])) for c in a.configs.split(",")]
    rounds, steps, batch, seq = a.rounds, a.steps, 4, 256
    if a.quick:
        configs, rounds, steps, batch, seq = [("smollm2", 1)], 1, 1, 1, 32
    results = {"steps": [], "when": datetime.datetime.now().isoformat(timespec="seconds"),
               "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
                          f"torch {torch.__version__}"}
    for model, layers in configs:
        results["steps"].append(step_time.measure(model, layers=layers, batch=batch, seq=seq, rounds=rounds,
                                                  steps=steps, warmup=a.warmup))
    if not a.quick and not a.no_bf16:
        results["steps"].append(step_time.measure(BF16["model"], layers=BF16["layers"], batch=BF16["batch"],
                                                  seq=BF16["seq"], rounds=rounds, steps=steps, warmup=a.warmup,
                                                  methods=BF16["methods"], autocast="bf16"))
    results["masks"] = [] if a.quick else masks.measure()
    adapter_layers = 2 if a.quick else 30
    results["adapters"] = adapter_size.measure(adapter_layers)
    results["quantized"] = None if a.no_quantized else measure_quantized(quick=a.quick)
    generated = [f"_Last run: {results['when']}, {results['machine']}._", "", "### Step time and memory", ""]
    for res in results["steps"]:
        generated += report.step_table(res)
    generated += ["### Mask rebuild (no weight allocated)", "", *report.mask_table(results["masks"]),
                  "### Adapter files", "", *report.adapter_table(results["adapters"], adapter_layers),
                  *(["### Quantized base: NF4 and bitsandbytes 4-bit against bf16", "",
                     *quantized_memory.report(results["quantized"])] if results["quantized"] else []),
                  "### Targets", "", *report.target_lines(results["steps"], results["masks"], results["adapters"]),
                  "![step time and peak RSS](benchmarks.png)", ""]
    print("\n".join(generated))
    if not a.quick:
        (DOCS / "benchmarks.json").write_text(json.dumps(results, indent=1) + "\n")  # the numbers first
        report.write(DOCS / "benchmarks.md", generated)
        report.chart(results["steps"], DOCS / "benchmarks.png")


if __name__ == "__main__":
    main()
