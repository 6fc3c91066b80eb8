"""Worker for the fingerprint-mismatch test: for each setting named on the command line, each rank asks for a value
that differs by rank; every rank must raise the same error (then the next setting is tried in the same group)."""

import os
import sys

from tiny_models import tiny_llama

from spra_dist import SpraConfig, apply_spra
from spra_dist.distributed.group import init_distributed

init_distributed()
rank = int(os.environ["RANK"])
failed = False
for what in sys.argv[1:]:
    cfg = (SpraConfig(seed=100 + rank) if what == "seed"
           else SpraConfig(seed=1, lora_rank=None, density=0.1 + 0.1 * rank))
    try:
        apply_spra(tiny_llama(), cfg)
        print(f"rank {rank} {what}: no error", flush=True)
    except RuntimeError as e:
        print(f"rank {rank} {what} error: {e}", file=sys.stderr, flush=True)
        failed = True
sys.exit(3 if failed else 0)
