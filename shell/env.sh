#!/usr/bin/env bash
# Detect the accelerator stack and export what every launch needs. Source it:
#   source shell/env.sh
# Sets MINDSPEED_VITA_BACKEND (unless already set) to npu (CANN found), cuda (nvidia-smi sees a
# GPU) or cpu, plus the per-stack variables docs/npu-op-contract.md (section 4.3) describes.

_msv_detect() {
  for f in "${ASCEND_TOOLKIT_SETENV:-}" /usr/local/Ascend/ascend-toolkit/set_env.sh /usr/local/Ascend/cann/set_env.sh; do
    if [ -n "$f" ] && [ -f "$f" ]; then
      # shellcheck disable=SC1090
      source "$f" >/dev/null 2>&1 && { [ -f /usr/local/Ascend/nnal/atb/set_env.sh ] && source /usr/local/Ascend/nnal/atb/set_env.sh >/dev/null 2>&1; echo npu; return; }
    fi
  done
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then echo cuda; return; fi
  echo cpu
}

export MINDSPEED_VITA_BACKEND=${MINDSPEED_VITA_BACKEND:-$(_msv_detect)}
case "$MINDSPEED_VITA_BACKEND" in
  npu)
    export PYTORCH_NPU_ALLOC_CONF=${PYTORCH_NPU_ALLOC_CONF:-expandable_segments:True}
    export TASK_QUEUE_ENABLE=${TASK_QUEUE_ENABLE:-2}
    export CPU_AFFINITY_CONF=${CPU_AFFINITY_CONF:-1}
    export HCCL_CONNECT_TIMEOUT=${HCCL_CONNECT_TIMEOUT:-1200}
    export CUDA_DEVICE_MAX_CONNECTIONS=1
    MSV_NPROC_PER_NODE=${MSV_NPROC_PER_NODE:-$(python3 -c "import torch, torch_npu; print(torch.npu.device_count())" 2>/dev/null || echo 1)}
    ;;
  cuda)
    export CUDA_DEVICE_MAX_CONNECTIONS=1
    export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
    MSV_NPROC_PER_NODE=${MSV_NPROC_PER_NODE:-$(nvidia-smi -L | wc -l)}
    ;;
  *)
    MSV_NPROC_PER_NODE=${MSV_NPROC_PER_NODE:-1}
    ;;
esac
export MSV_NPROC_PER_NODE
export TOKENIZERS_PARALLELISM=false
echo "[env] backend=$MINDSPEED_VITA_BACKEND processes_per_node=$MSV_NPROC_PER_NODE"
