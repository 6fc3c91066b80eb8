#!/usr/bin/env bash
# Several nodes with torchrun's c10d rendezvous. Run this same command on EVERY node:
#
#   NNODES=2 RDZV_ENDPOINT=10.0.0.1:29400 launch/multinode_torchrun.sh fsdp2 configs/train/debug_tiny_llama.yaml
#
#   NNODES         number of nodes taking part (all must start within the rendezvous timeout)
#   RDZV_ENDPOINT  host:port of one node that every node can reach (any node; the first to arrive hosts the store)
#   RDZV_ID        a job id shared by the nodes of one job, different between jobs (default: spra)
#   NPROC          processes per node (default: the GPU count, or 2 on CPU nodes)
# ENGINE and CONFIG as in launch/torchrun.sh. Ranks are numbered by the rendezvous, so nodes need no rank
# of their own; output_dir should be on a shared filesystem (rank 0 writes the adapter there).
# Network: NCCL picks an interface itself; set NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME if nodes have several.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

[ $# -ge 2 ] || die "usage: NNODES=2 RDZV_ENDPOINT=host:port launch/multinode_torchrun.sh ENGINE CONFIG [key=value ...]"
[ -n "${NNODES:-}" ] || die "set NNODES, the number of nodes, e.g. NNODES=2"
[ -n "${RDZV_ENDPOINT:-}" ] || die "set RDZV_ENDPOINT=host:port of a node every node can reach, e.g. 10.0.0.1:29400"
ENGINE="$1"; CONFIG="$2"; shift 2
check_config "$CONFIG"
engine_args "$ENGINE"
need torchrun

exec torchrun --nnodes "$NNODES" --nproc_per_node "$NPROC" \
  --rdzv_backend c10d --rdzv_endpoint "$RDZV_ENDPOINT" --rdzv_id "${RDZV_ID:-spra}" \
  -m spra_dist train --config "$CONFIG" "${ENGINE_ARGS[@]}" "$@"
