#!/usr/bin/env bash
# Install mindspeed-vita and what it needs into the current Python environment.
# Used by the README's two commands, by CI and by the launch scripts' first run.
#   - torch: kept when already importable (NPU hosts must keep the torch that matches their
#     torch_npu wheel); otherwise torch==2.13.0 is installed (CPU build where the host provides
#     it, the default wheel elsewhere). Never an unpinned torch: that pulls gigabytes of CUDA.
#   - the package itself in editable mode, with extras given as arguments (default: dev).
#     dev, the tests' extras, pins tensorboard==2.20.0 (no torch; ~55 MB, ~13 s) for the TB test.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
EXTRAS=${1:-dev}

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "[install] installing torch==2.13.0"
  "$PY" -m pip install "torch==2.13.0"
fi
echo "[install] installing mindspeed-vita[$EXTRAS]"
"$PY" -m pip install -e ".[$EXTRAS]"
"$PY" -c "import torch, megatron.core, transformers; print('[install] torch', torch.__version__, '| megatron-core', megatron.core.__version__, '| transformers', transformers.__version__)"
