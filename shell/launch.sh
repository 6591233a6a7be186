# Sourced by shell/train.sh and shell/infer.sh: the one place that turns the platform and the
# usual torchrun variables into a launch, so training and inference start the same way.
#   msv_launch NAME SUBCOMMAND [ARG ...]   (NAME labels the launch line on stderr)
# Platform: shell/env.sh (CANN -> npu, a GPU -> cuda, else cpu; MINDSPEED_VITA_BACKEND wins).
# Processes: NNODES (1)  NODE_RANK (0)  MASTER_ADDR (127.0.0.1)  MASTER_PORT (29500)
#            NPROC_PER_NODE (devices on this node; 1 on CPU)
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

msv_launch() {
  local name=$1 subcommand=$2
  shift 2
  NNODES=${NNODES:-1}
  NODE_RANK=${NODE_RANK:-0}
  MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
  MASTER_PORT=${MASTER_PORT:-29500}
  NPROC_PER_NODE=${NPROC_PER_NODE:-$MSV_NPROC_PER_NODE}
  echo "[$name] $subcommand nodes=$NNODES node_rank=$NODE_RANK procs_per_node=$NPROC_PER_NODE" \
       "master=$MASTER_ADDR:$MASTER_PORT" >&2
  exec python -m torch.distributed.run \
    --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC_PER_NODE" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    -m mindspeed_vita.cli "$subcommand" "$@"
}
