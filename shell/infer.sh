#!/usr/bin/env bash
# Generate (or serve) with a model split over processes - one node or many, NPU / GPU / CPU:
#   bash shell/infer.sh [infer] --checkpoint DIR --prompt TEXT [--image P] [--video P] --cp N ...
#   bash shell/infer.sh serve --checkpoint DIR --cp N [--port P] ...
# Every flag is `mindspeed-vita infer` / `serve`'s own (flags = inference.* config keys;
# --config reads a stage or inference YAML). Launch CP x TP processes in all (x DP, which
# repeats the same request): e.g. NPROC_PER_NODE=2 bash shell/infer.sh --checkpoint C
# --prompt hi --cp 2.
#
# Platform and processes: shell/launch.sh (as shell/train.sh), torchrun from the usual variables:
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
source "$(dirname "${BASH_SOURCE[0]}")/launch.sh"
msv_launch infer.sh "$COMMAND" "$@"
