#!/usr/bin/env bash
# Launch the megatron-vgpo job on one node of a (multi-node) torchrun world, after pre-flight checks.
#
#   cluster/torchrun/launch.sh [options] [--] CONFIG.yaml [key=value ...]
#
# Options (defaults in brackets; Slurm's variables are used when set):
#   --nnodes N             nodes in the job                      [$SLURM_NNODES or 1]
#   --node-rank R          this node's rank, 0..N-1              [$SLURM_NODEID or 0]
#   --nproc-per-node G     processes on this node                [GPUs seen by nvidia-smi, or 2 on CPU]
#   --master-addr HOST     address of node rank 0                [$MASTER_ADDR or 127.0.0.1]
#   --master-port PORT     its port                              [$MASTER_PORT or 29500]
#   --rdzv-endpoint H:P    use a c10d rendezvous at H:P instead of master addr/port (elastic restarts)
#   --rdzv-id ID           rendezvous id                         [$SLURM_JOB_ID or megatron-vgpo]
#   --ckpt DIR             Megatron checkpoint the job needs (checked by the pre-flight)
#   --connect-timeout S    seconds a node waits for the master in the pre-flight [60]
#   --skip-preflight       launch without the checks
#   --dry-run              print the torchrun command instead of running it
#
# Environment: PYTHON (interpreter with megatron_vgpo installed) [python]; OMP_NUM_THREADS [1].
# Every node runs the same command with its own --node-rank. Exit status: torchrun's, or 1 when a
# pre-flight check fails, 2 for bad arguments.
set -euo pipefail

PYTHON="${PYTHON:-python}"
NNODES="${SLURM_NNODES:-1}"
NODE_RANK="${SLURM_NODEID:-0}"
NPROC=""
MASTER_ADDR_="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT_="${MASTER_PORT:-29500}"
RDZV_ENDPOINT=""
RDZV_ID="${SLURM_JOB_ID:-megatron-vgpo}"
CKPT=""
CONNECT_TIMEOUT=60
PREFLIGHT=1
DRY_RUN=0

usage() { sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "launch.sh: $*" >&2; exit 2; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --nnodes) NNODES="$2"; shift 2 ;;
    --node-rank) NODE_RANK="$2"; shift 2 ;;
    --nproc-per-node) NPROC="$2"; shift 2 ;;
    --master-addr) MASTER_ADDR_="$2"; shift 2 ;;
    --master-port) MASTER_PORT_="$2"; shift 2 ;;
    --rdzv-endpoint) RDZV_ENDPOINT="$2"; shift 2 ;;
    --rdzv-id) RDZV_ID="$2"; shift 2 ;;
    --ckpt) CKPT="$2"; shift 2 ;;
    --connect-timeout) CONNECT_TIMEOUT="$2"; shift 2 ;;
    --skip-preflight) PREFLIGHT=0; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) break ;;
  esac
done
[[ $# -ge 1 ]] || die "missing the job's CONFIG.yaml (see --help)"
CONFIG="$1"; shift
[[ -f "$CONFIG" ]] || die "config file not found: $CONFIG"

if [[ -z "$NPROC" ]]; then
  if command -v nvidia-smi >/dev/null 2>&1 && GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU') && [[ "$GPUS" -gt 0 ]]; then
    NPROC="$GPUS"
  else
    NPROC=2  # CPU: two gloo ranks
  fi
fi
for v in NNODES NODE_RANK NPROC MASTER_PORT_; do
  [[ "${!v}" =~ ^[0-9]+$ ]] || die "$v must be a non-negative integer, got '${!v}'"
done
(( NODE_RANK < NNODES )) || die "--node-rank $NODE_RANK must be below --nnodes $NNODES"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

if [[ "$PREFLIGHT" == 1 ]]; then
  PF=(--nnodes "$NNODES" --nproc-per-node "$NPROC" --node-rank "$NODE_RANK" --connect-timeout "$CONNECT_TIMEOUT")
  if [[ -n "$RDZV_ENDPOINT" ]]; then PF+=(--rdzv-endpoint "$RDZV_ENDPOINT");
  else PF+=(--master-addr "$MASTER_ADDR_" --master-port "$MASTER_PORT_"); fi
  [[ -n "$CKPT" ]] && PF+=(--ckpt "$CKPT")
  "$PYTHON" -m megatron_vgpo.launch.preflight "${PF[@]}" -- "$CONFIG" "$@" || {
    rc=$?; echo "launch.sh: pre-flight failed (exit $rc); not launching" >&2; exit "$rc"; }
fi

CMD=("$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --nproc-per-node "$NPROC")
if [[ -n "$RDZV_ENDPOINT" ]]; then
  CMD+=(--rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "$RDZV_ID")
else
  CMD+=(--node-rank "$NODE_RANK" --master-addr "$MASTER_ADDR_" --master-port "$MASTER_PORT_")
fi
CMD+=(-m megatron_vgpo.train "$CONFIG" "$@")

echo "launch.sh: node $NODE_RANK/$NNODES, $NPROC process(es): ${CMD[*]}" >&2
if [[ "$DRY_RUN" == 1 ]]; then
  printf '%q ' "${CMD[@]}"; echo
  exit 0
fi
exec "${CMD[@]}"
