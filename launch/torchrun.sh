#!/usr/bin/env bash
# launch/torchrun.sh ENGINE CONFIG [key=value ...]
#   ENGINE: none | ddp | fsdp2 | zero1 | zero2 | zero3 | zero3_offload   (zeroN: DeepSpeed with that preset)
#   e.g.  launch/torchrun.sh fsdp2 configs/train/debug_tiny_llama.yaml max_steps=5
# One process per GPU, or NPROC (default 2) CPU processes on gloo when there is no GPU.
# Several nodes: launch/multinode_torchrun.sh.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

[ $# -ge 2 ] || die "usage: launch/torchrun.sh ENGINE CONFIG [key=value ...]   (ENGINE: none, ddp, fsdp2 or a DeepSpeed preset such as zero2)"
ENGINE="$1"; CONFIG="$2"; shift 2
check_config "$CONFIG"
engine_args "$ENGINE"
need torchrun

# --standalone: a local rendezvous on a free port, so concurrent jobs on one machine don't collide.
exec torchrun --standalone --nproc_per_node "$NPROC" \
  -m spra_dist train --config "$CONFIG" "${ENGINE_ARGS[@]}" "$@"
