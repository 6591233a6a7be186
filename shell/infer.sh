#!/usr/bin/env bash
# Generate (or serve) with a model split over processes - one node or many, NPU / GPU / CPU:
#   bash shell/infer.sh [infer] --checkpoint DIR --prompt TEXT [--image P] [--video P] --cp N ...
#   bash shell/infer.sh serve --checkpoint DIR --cp N [--port P] ...
# Every flag is `mindspeed-vita infer` / `serve`'s own (flags = inference.* config keys;
# --config reads a stage or inference YAML). Launch CP x TP processes in all (x DP, which
# repeats the same request): e.g. NPROC_PER_NODE=2 bash shell/infer.sh --checkpoint C
# --prompt hi --cp 2.
#
# Platform: shell/env.sh (as shell/train.sh). Processes: torchrun from the usual variables:
#   NNODES (1)  NODE_RANK (0)  MASTER_ADDR (127.0.0.1)  MASTER_PORT (29500)
#   NPROC_PER_NODE (devices on this node; 1 on CPU)
# Multi-node: run the same command on every node with its NODE_RANK and the master's address;
# rank 0 (on NODE_RANK 0) prints the answer / serves HTTP.
set -euo pipefail
COMMAND=infer
if [ $# -ge 1 ] && { [ "$1" = "infer" ] || [ "$1" = "serve" ]; }; then
  COMMAND=$1
  shift
fi
if [ $# -lt 1 ]; then
  echo "usage: bash shell/infer.sh [infer|serve] --checkpoint DIR ... [--cp N] [--tp N]" >&2
  exit 2
fi
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
source shell/env.sh

case "$MINDSPEED_VITA_BACKEND" in
  cuda)
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
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
echo "[infer.sh] $COMMAND nodes=$NNODES node_rank=$NODE_RANK procs_per_node=$NPROC_PER_NODE master=$MASTER_ADDR:$MASTER_PORT" >&2

exec python -m torch.distributed.run \
  --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC_PER_NODE" \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  -m mindspeed_vita.cli "$COMMAND" "$@"
