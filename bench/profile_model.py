"""Where a whole training step's time goes: spra_dist's three ops inside a model, against the floor and LoRA.

    HF_HUB_OFFLINE=1 python -m bench.profile_model --model minilm --layers 6            # a table
    HF_HUB_OFFLINE=1 python -m bench.profile_model --method spra --model minilm         # one, a JSON line

Each method (spra through sampled_addmm, spra through the C++ kernel, PEFT LoRA r=8, the floor) runs in a fresh
process on bench._worker's model and tokens: warm-up steps, then timed steps under ``torch.profiler`` (CPU).
Per step it reports the median wall time and the time spent inside ``spra_dist::linear`` (forward: merge, matmul,
restore), ``spra_dist::input_grad`` (merge, matmul, restore) and ``spra_dist::values_grad`` (the sampled
product with its copies), summed over all adapted layers, and the bytes autograd keeps for backward (each
storage once, weights included). The step minus the floor's step is what SpaRA adds;
the op times say which part of it is the values' gradient. Needs a quiet machine: with other work running,
every op absorbs scheduler delays.
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
from torch.profiler import ProfilerActivity, profile

from bench._worker import MODELS, TARGETS, apply_method, build_model, loss_fn, pin_cpu_path

METHODS = ("spra", "spra_cpp", "lora", "floor")
OPS = ("spra_dist::linear", "spra_dist::input_grad", "spra_dist::values_grad")


def saved_bytes(forward) -> int:
    """Bytes autograd keeps for backward after ``forward()``: each storage counted once, frozen weights and
    buffers (parameters of the model, alive anyway) included as a method saves them."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()  # the graph is dropped unused
    return sum(storages.values())


def measure(method: str, model_name: str, *, layers: int, batch: int, seq: int, steps: int, warmup: int) -> dict:
    pin_cpu_path(method)
    model, vocab = build_model(model_name, layers)
    model = apply_method(model, method, TARGETS[model_name]).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1))

    def step() -> float:
        start = time.perf_counter()
        loss_fn(model, model_name, ids).backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    for _ in range(warmup):
        step()
    saved = saved_bytes(lambda: loss_fn(model, model_name, ids))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        times = [step() for _ in range(steps)]
    totals = {e.key: e.cpu_time_total / 1e3 / steps for e in prof.key_averages() if e.key in OPS}
    return {"method": method, "model": model_name, "layers": layers, "batch": batch, "seq": seq,
            "step_ms": 1e3 * statistics.median(times), "ops_ms": {op: totals.get(op, 0.0) for op in OPS},
            "saved_mib": saved / 2**20,
            "load_before": os.getloadavg()[0]}


def table(results: list[dict]) -> list[str]:
    floor = next((r["step_ms"] for r in results if r["method"] == "floor"), None)
    lines = ["| method | median step (ms) | − floor (ms) | forward op (ms) | input-grad op (ms) | values-grad op (ms) "
             "| saved for backward (MiB) | load before |", "|---|" + "---:|" * 7]
    for r in results:
        over = f"{r['step_ms'] - floor:+.0f}" if floor is not None else "–"
        ops = " | ".join(f"{r['ops_ms'][op]:.0f}" if r["ops_ms"][op] else "–" for op in OPS)
        lines.append(f"| {r['method']} | {r['step_ms']:.0f} | {over} | {ops} | {r['saved_mib']:.0f} | "
                     f"{r['load_before']:.1f} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", choices=METHODS, help="one method in this process (prints one JSON line)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--model", choices=MODELS, default="minilm")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    a = ap.parse_args()
    sizes = dict(layers=a.layers, batch=a.batch, seq=a.seq, steps=a.steps, warmup=a.warmup)
    if a.method:
        print(json.dumps(measure(a.method, a.model, **sizes)))
        return
    results = []
    for method in a.methods.split(","):
        cmd = [sys.executable, "-m", "bench.profile_model", "--method", method, "--model", a.model,
               *[f"--{k}={v}" for k, v in sizes.items()]]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"_{a.model}, {a.layers} layers, batch {a.batch} × {a.seq}, fp32, {torch.get_num_threads()} threads, "
          f"{a.steps} profiled steps per method after {a.warmup} warm-up_\n")
    print("\n".join(table(results)))


if __name__ == "__main__":
    main()
