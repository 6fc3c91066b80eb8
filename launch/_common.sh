# Sourced by launch/*.sh: process count and CPU-mode settings shared by every wrapper.
# Not meant to be run on its own.

REPO="$(cd -P "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"  # -P: the real checkout, also through a symlinked launch/

die() { echo "error: $*" >&2; exit 2; }

# The project's own environment (make setup) comes first when it exists and none is active.
if [ -z "${VIRTUAL_ENV:-}" ] && [ -x "$REPO/.venv/bin/python" ]; then
  export PATH="$REPO/.venv/bin:$PATH"
fi

need() {  # the launcher command must come from the project's environment
  command -v "$1" >/dev/null 2>&1 || die "$1 not found on PATH; activate the environment (source .venv/bin/activate) or run make setup"
}

gpu_count() {
  # nvidia-smi -L prints one "GPU i: ..." line per visible device; no nvidia-smi means no GPU.
  { nvidia-smi -L 2>/dev/null || true; } | grep -c '^GPU' || true
}

# NGPU > 0: one process per GPU (NPROC may pick fewer). Otherwise NPROC CPU processes (default 2) on gloo.
NGPU="$(gpu_count)"
if [ "$NGPU" -gt 0 ]; then
  NPROC="${NPROC:-$NGPU}"
  ON_CPU=0
else
  NPROC="${NPROC:-2}"
  ON_CPU=1
  # DeepSpeed picks its CPU accelerator (gloo, shared-memory ops) instead of probing for CUDA.
  export DS_ACCELERATOR=cpu
  # Split the cores between the ranks; oversubscribed threads make every collective wait on the slowest rank.
  cores="$(nproc 2>/dev/null || echo 2)"
  threads=$(( cores / NPROC ))
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( threads > 0 ? threads : 1 ))}"
fi
case "$NPROC" in
  ''|*[!0-9]*|0) die "NPROC=$NPROC must be a positive integer (processes on this machine), e.g. NPROC=2" ;;
esac

check_config() {  # $1: the training YAML
  [ -n "${1:-}" ] || die "missing CONFIG; e.g. configs/train/debug_tiny_llama.yaml"
  [ -f "$1" ] || die "CONFIG $1 not found; give a training YAML such as configs/train/debug_tiny_llama.yaml"
}

# ENGINE_ARGS: the training overrides that select engine $1 (none, ddp, fsdp2, a DeepSpeed preset such as zero2,
# or a DeepSpeed JSON file). spra_dist knows the names: an unknown one fails here, before any process starts,
# with spra_dist's message or $2.
engine_args() {
  local out
  out="$(python -m spra_dist.distributed.parallelize "$1" 2>&1)" || die "${2:-${out#error: }}"
  mapfile -t ENGINE_ARGS <<< "$out"
}

free_port() {  # a port nobody listens on now, for launchers without their own standalone mode
  python - <<'PY'
import socket
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    print(s.getsockname()[1])
PY
}
