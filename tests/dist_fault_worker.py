"""Run ``spra train`` with a NaN loss injected on one rank at chosen steps (a real 2-rank job, no mocks of
the engines): ``python -m torch.distributed.run ... dist_fault_worker.py RANK STEPS key=value ...``.

STEPS is a comma list of 0-based optimizer steps whose micro batches get loss * NaN on rank RANK only.
"""

import os
import sys

import spra_dist.train.recipe as recipe
from spra_dist.cli import main


def poisoned_apply_spra(rank: int, steps: set[int], grad_accum: int):
    original = recipe.apply_spra

    def apply(model, cfg):
        model = original(model, cfg)
        forward, calls = model.forward, [0]

        def poisoned(*args, **kwargs):
            out = forward(*args, **kwargs)
            if model.training:
                step = calls[0] // grad_accum
                calls[0] += 1
                if step in steps and int(os.environ.get("RANK", "0")) == rank:
                    out.loss = out.loss * float("nan")
            return out

        model.forward = poisoned
        return model

    return apply


if __name__ == "__main__":
    rank, steps, *overrides = sys.argv[1:]
    recipe.apply_spra = poisoned_apply_spra(int(rank), {int(s) for s in steps.split(",")}, grad_accum=2)
    sys.exit(main(["train", "--config", os.path.join(os.path.dirname(__file__), "..", "configs", "train",
                                                     "debug_tiny_llama.yaml"), *overrides]))
