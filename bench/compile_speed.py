"""torch.compile against eager for a SpaRA model, side by side in one process (steps interleaved in blocks).

    HF_HUB_OFFLINE=1 python -m bench.compile_speed --layers 2 --batch 4 --seq 128

One model (SmolLM2-135M shapes, SpaRA at the LoRA r=8 budget on every attention and MLP linear), the same
token ids; blocks of eager steps and compiled steps alternate, so load drift on the machine hits both. A step is
forward + backward + AdamW. The first compiled step (tracing and code generation) is reported on its own.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from bench._worker import TARGETS, apply_method, build_model, loss_fn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--blocks", type=int, default=4, help="alternating blocks of each mode")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per block")
    args = ap.parse_args()

    model, vocab = build_model("smollm2", args.layers)
    model = apply_method(model, "spra", TARGETS["smollm2"]).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    compiled = torch.compile(model)

    def step(run) -> float:
        start = time.perf_counter()
        loss_fn(run, "smollm2", ids).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    first_compiled = step(compiled)
    step(model)  # eager warm-up
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    for _ in range(args.blocks):
        for mode, run in (("eager", model), ("compiled", compiled)):
            times[mode] += [step(run) for _ in range(args.steps)]
    eager, comp = statistics.median(times["eager"]), statistics.median(times["compiled"])
    result = {"layers": args.layers, "batch": args.batch, "seq": args.seq, "threads": torch.get_num_threads(),
              "load_before": os.getloadavg()[0], "first_compiled_step_s": first_compiled,
              "eager_median_s": eager, "compiled_median_s": comp, "speedup": eager / comp,
              "eager_s": times["eager"], "compiled_s": times["compiled"]}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
