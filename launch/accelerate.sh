#!/usr/bin/env bash
# launch/accelerate.sh ENGINE CONFIG [key=value ...]
#   ENGINE: ddp | fsdp2 | zero1 | zero2 | zero3 (configs/accelerate/ENGINE.yaml) or a path to an accelerate YAML
#   e.g.  launch/accelerate.sh zero2 configs/train/debug_tiny_llama.yaml max_steps=5
# spra_dist runs with engine=auto and picks DDP / FSDP2 / DeepSpeed from the environment accelerate sets.
# One process per GPU, or NPROC (default 2) CPU processes on gloo without a GPU.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

[ $# -ge 2 ] || die "usage: launch/accelerate.sh ENGINE CONFIG [key=value ...]   (ENGINE: ddp fsdp2 zero1 zero2 zero3)"
ENGINE="$1"; CONFIG="$2"; shift 2
case "$ENGINE" in
  *.yaml|*.yml) [ -f "$ENGINE" ] || die "accelerate config $ENGINE not found"; YAML="$ENGINE" ;;
  *) YAML="$REPO/configs/accelerate/$ENGINE.yaml"
     [ -f "$YAML" ] || die "ENGINE=$ENGINE: use $(cd "$REPO/configs/accelerate" && ls *.yaml | sed 's/\.yaml$//' | paste -sd, - | sed 's/,/, /g') (configs/accelerate/) or an accelerate YAML file" ;;
esac
check_config "$CONFIG"
need accelerate

# --main_process_port 0: accelerate picks a free port, so concurrent jobs on one machine don't collide.
ARGS=(--config_file "$YAML" --num_processes "$NPROC" --main_process_port 0)
# The YAML names its DeepSpeed preset relative to the repository root; an absolute path works from anywhere.
PRESET="$REPO/spra_dist/distributed/presets/$ENGINE.json"
[ -f "$PRESET" ] && ARGS+=(--deepspeed_config_file "$PRESET")
if [ "$ON_CPU" = 1 ]; then
  # CPU: keep the multi-process launch of the YAML and switch the ranks to CPU + gloo through the
  # environment. `--cpu` would start ONE process whatever num_processes says.
  export ACCELERATE_USE_CPU=true
  ARGS+=(--mixed_precision no)
fi

exec accelerate launch "${ARGS[@]}" -m spra_dist train --config "$CONFIG" "$@"
