#!/usr/bin/env bash
# Train one stage on this machine or on a cluster - the same line on Ascend NPU, NVIDIA GPU and
# CPU:
#   bash shell/train.sh CONFIG [key=value ...]
# e.g.  bash shell/train.sh configs/stages/stage3.yaml training.save=runs/stage3
# Run it again with the same arguments to resume from the latest checkpoint in training.save.
#
# Platform: shell/env.sh detects it (CANN found -> npu: sources its set_env.sh and sets the NPU
# allocator / task queue / HCCL timeouts; nvidia-smi sees a GPU -> cuda: NCCL settings below;
# else cpu: gloo) unless MINDSPEED_VITA_BACKEND is set.
# Processes: torchrun, one node or many, from the usual variables:
#   NNODES (1)  NODE_RANK (0)  MASTER_ADDR (127.0.0.1)  MASTER_PORT (29500)
#   NPROC_PER_NODE (devices on this node; 1 on CPU)
# Multi-node: run the same command on every node with its NODE_RANK and the master's address.
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: bash shell/train.sh CONFIG [key=value ...]" >&2
  exit 2
fi
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
source shell/env.sh

case "$MINDSPEED_VITA_BACKEND" in
  cuda)
    # fail fast on a hung collective instead of waiting forever
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
    export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}
    ;;
  npu)
    export HCCL_EXEC_TIMEOUT=${HCCL_EXEC_TIMEOUT:-1800}
    ;;
  *)
    # gloo on the host: leave cores to the other processes of this node
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    ;;
esac

NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
NPROC_PER_NODE=${NPROC_PER_NODE:-$MSV_NPROC_PER_NODE}
echo "[train.sh] nodes=$NNODES node_rank=$NODE_RANK procs_per_node=$NPROC_PER_NODE master=$MASTER_ADDR:$MASTER_PORT"

exec python -m torch.distributed.run \
  --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC_PER_NODE" \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  -m mindspeed_vita.cli train "$@"
