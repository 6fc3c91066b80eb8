"""Worker for the fingerprint-mismatch test: each rank asks for a setting that differs by rank."""

import os
import sys

from tiny_models import tiny_llama

from spra_dist import SpraConfig, apply_spra
from spra_dist.distributed.group import init_distributed

what = sys.argv[1]
init_distributed()
rank = int(os.environ["RANK"])
cfg = SpraConfig(seed=100 + rank) if what == "seed" else SpraConfig(seed=1, lora_rank=None, density=0.1 + 0.1 * rank)
try:
    apply_spra(tiny_llama(), cfg)
except RuntimeError as e:
    print(f"rank {rank} error: {e}", file=sys.stderr, flush=True)
    sys.exit(3)
print(f"rank {rank} no error", flush=True)
