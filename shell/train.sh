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
source "$(dirname "${BASH_SOURCE[0]}")/launch.sh"
msv_launch train.sh train "$@"
