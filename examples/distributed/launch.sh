#!/usr/bin/env bash
# Start one machine's share of a multi-machine megatron run (run this on EVERY machine, same arguments,
# within --rdzv timeout of each other). torchrun's c10d rendezvous assigns the ranks.
#
#   NNODES=2 GPUS_PER_NODE=8 RDZV_HOST=gpu-node-01 examples/distributed/launch.sh \
#       -c examples/distributed/cluster.yaml --name eit-reptile-2x8
#
# Everything after the script name goes to `megatron run` unchanged (add --resume to continue a run).
set -euo pipefail

NNODES="${NNODES:?set NNODES, the number of machines}"
GPUS_PER_NODE="${GPUS_PER_NODE:-$(nvidia-smi -L 2>/dev/null | wc -l)}"
RDZV_HOST="${RDZV_HOST:?set RDZV_HOST to a host name or address of one of the machines that all of them can reach}"
RDZV_PORT="${RDZV_PORT:-29500}"
# one id per run: machines with the same id (and endpoint) form one job
RDZV_ID="${RDZV_ID:-megatron-$(date +%Y%m%d)-${USER:-user}}"
# how long a collective waits for a silent rank before the run fails (seconds); a dead rank is usually
# noticed much sooner, through torchrun's worker monitoring
export MEGATRON_DIST_TIMEOUT_S="${MEGATRON_DIST_TIMEOUT_S:-900}"

if [ "${GPUS_PER_NODE}" -lt 1 ]; then
    echo "no GPU found on $(hostname); set GPUS_PER_NODE" >&2
    exit 2
fi

exec torchrun \
    --nnodes "${NNODES}" \
    --nproc_per_node "${GPUS_PER_NODE}" \
    --rdzv_backend c10d \
    --rdzv_endpoint "${RDZV_HOST}:${RDZV_PORT}" \
    --rdzv_id "${RDZV_ID}" \
    --max_restarts 0 \
    -m megatron run "$@"
