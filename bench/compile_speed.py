"""torch.compile against eager for spra_dist, PEFT LoRA and the floor (everything frozen): per method, eager and
compiled steps side by side in one fresh process (blocks interleaved), methods one after another.

    HF_HUB_OFFLINE=1 python -m bench.compile_speed --layers 2 --batch 4 --seq 256            # all three, a table
    HF_HUB_OFFLINE=1 python -m bench.compile_speed --method spra --layers 2                  # one, a JSON line

One model (SmolLM2-135M shapes; SpaRA and LoRA at the r=8 budget on every attention and MLP linear), the same
token ids; blocks of eager steps and compiled steps alternate, so load drift on the machine hits both. A step is
forward + backward + AdamW (the floor has no optimizer). The first compiled step (tracing and code generation) is
reported on its own.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from bench._worker import TARGETS, apply_method, build_model, loss_fn

METHODS = ("spra", "lora", "floor")
LABELS = {"spra": "spra_dist", "lora": "PEFT LoRA r=8", "floor": "floor (all frozen)"}


def measure(method: str, *, layers: int, batch: int, seq: int, blocks: int, steps: int) -> dict:
    model, vocab = build_model("smollm2", layers)
    model = apply_method(model, method, TARGETS["smollm2"]).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1))
    compiled = torch.compile(model)

    def step(run) -> float:
        start = time.perf_counter()
        loss_fn(run, "smollm2", ids).backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    load = os.getloadavg()[0]
    first_compiled = step(compiled)
    step(model)  # eager warm-up
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    for _ in range(blocks):
        for mode, run in (("eager", model), ("compiled", compiled)):
            times[mode] += [step(run) for _ in range(steps)]
    eager, comp = statistics.median(times["eager"]), statistics.median(times["compiled"])
    return {"method": method, "layers": layers, "batch": batch, "seq": seq, "threads": torch.get_num_threads(),
            "load_before": load, "first_compiled_step_s": first_compiled, "eager_median_s": eager,
            "compiled_median_s": comp, "speedup": eager / comp, "eager_s": times["eager"],
            "compiled_s": times["compiled"]}


def table(results: list[dict]) -> list[str]:
    by = {r["method"]: r for r in results}
    lines = ["| method | eager median step (s) | compiled median step (s) | speed-up | first compiled step (s) | "
             "compiled × LoRA compiled | compiled × floor compiled | load before |", "|---|" + "---:|" * 7]
    for r in results:
        ratio = {ref: (f"{r['compiled_median_s'] / by[ref]['compiled_median_s']:.2f}" if ref in by else "–")
                 for ref in ("lora", "floor")}
        lines.append(f"| {LABELS[r['method']]} | {r['eager_median_s']:.3f} | {r['compiled_median_s']:.3f} | "
                     f"{r['speedup']:.2f}× | {r['first_compiled_step_s']:.1f} | {ratio['lora']} | {ratio['floor']} | "
                     f"{r['load_before']:.1f} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", choices=METHODS, help="one method in this process (prints one JSON line)")
    ap.add_argument("--methods", default=",".join(METHODS), help="each in a fresh process, then a table")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--blocks", type=int, default=4, help="alternating blocks of each mode")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per block")
    a = ap.parse_args()
    sizes = dict(layers=a.layers, batch=a.batch, seq=a.seq, blocks=a.blocks, steps=a.steps)
    if a.method:
        print(json.dumps(measure(a.method, **sizes)))
        return
    results = []
    for method in a.methods.split(","):
        cmd = [sys.executable, "-m", "bench.compile_speed", "--method", method,
               *[f"--{k}={v}" for k, v in sizes.items()]]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"  {method}: eager {results[-1]['eager_median_s']:.3f} s, compiled "
              f"{results[-1]['compiled_median_s']:.3f} s", flush=True)
    print("\n".join(table(results)))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
