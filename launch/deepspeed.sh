#!/usr/bin/env bash
# launch/deepspeed.sh STAGE CONFIG [key=value ...]
#   STAGE: zero1 | zero2 | zero3 | zero3_offload (a preset that ships with spra_dist), 1 | 2 | 3, or a JSON path
#   e.g.  launch/deepspeed.sh zero3 configs/train/debug_tiny_llama.yaml max_steps=5
# DeepSpeed's own launcher: one process per GPU, or NPROC (default 2) CPU processes on gloo without a GPU.
# Several nodes: `deepspeed --hostfile launch/hostfile.example ...` (see that file).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

[ $# -ge 2 ] || die "usage: launch/deepspeed.sh STAGE CONFIG [key=value ...]   (STAGE: zero1 zero2 zero3 zero3_offload)"
STAGE="$1"; CONFIG="$2"; shift 2
case "$STAGE" in
  1|2|3) STAGE="zero$STAGE" ;;
  *.json) [ -f "$STAGE" ] || die "DeepSpeed config $STAGE not found" ;;
esac
NOT_A_STAGE="STAGE=$STAGE: use a DeepSpeed preset (zero1, zero2, zero3, zero3_offload), 1-3 or a DeepSpeed JSON file"
engine_args "$STAGE" "$NOT_A_STAGE"
[ "${ENGINE_ARGS[0]}" = "engine=deepspeed" ] || die "$NOT_A_STAGE"
check_config "$CONFIG"
need deepspeed

# --no_local_rank: the launcher would otherwise append --local_rank=N to the command line; spra_dist reads
# LOCAL_RANK from the environment, which the launcher sets as well.
# --master_port: a free one, so concurrent jobs on one machine don't collide (MASTER_PORT to choose).
PORT="${MASTER_PORT:-$(free_port)}"
deepspeed --num_gpus "$NPROC" --master_port "$PORT" --no_local_rank \
  --module spra_dist train --config "$CONFIG" "${ENGINE_ARGS[@]}" "$@" &
RUNNER=$!
# Run in the background so that a signal to this script reaches DeepSpeed's launcher (as exec would), and the
# script outlives it to clean up.
trap 'kill -TERM "$RUNNER" 2>/dev/null' TERM HUP
trap 'kill -INT "$RUNNER" 2>/dev/null' INT
status=0
wait "$RUNNER" || status=$?
while kill -0 "$RUNNER" 2>/dev/null; do  # a trapped signal interrupted wait: wait for the runner itself
  status=0
  wait "$RUNNER" || status=$?
done
# DeepSpeed's CPU allreduce keeps a 66 MiB buffer per rank in /dev/shm, named after this job's port, and never
# removes it. The ranks unlink theirs once all have started; this removes what a rank that died before then
# left. Only this job's port: other jobs' buffers stay.
rm -f /dev/shm/deepspeed_allreduce_buffer_"$(id -u)"_*_"$PORT"_[0-9]*
exit "$status"
