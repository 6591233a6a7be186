#!/usr/bin/env bash
# Install mindspeed-vita and what it needs into the current Python environment.
# Used by the README's two commands, by CI and by the launch scripts' first run.
#   - torch: kept when already importable (NPU hosts must keep the torch that matches their
#     torch_npu wheel); otherwise torch==2.13.0 is installed (CPU build where the host provides
#     it, the default wheel elsewhere). Never an unpinned torch: that pulls gigabytes of CUDA.
#   - the package itself in editable mode, with extras given as arguments (default: dev).
#     dev, the tests' extras, pins tensorboard==2.20.0 (no torch; ~55 MB, ~13 s) for the TB test.
#   - with dev or eval: lmms-eval, lean (see below; ~100 s, ~365 MB in a fresh venv).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
EXTRAS=${1:-dev}

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "[install] installing torch==2.13.0"
  "$PY" -m pip install "torch==2.13.0"
fi
# lmms-eval (the [eval] extra; tests/eval run it) is installed lean, not through the extra:
# its own dependency list is large (wandb, opencv, sentence-transformers, ...) and names an
# unpinned torchvision that can replace torch. Only the package, plus the modules it imports to
# run a model on a local task; torch is held at the installed version by a constraint.
LMMS_EVAL="lmms-eval==0.7.3"
LMMS_EVAL_DEPS=("accelerate>=0.29" "datasets>=2.19" "evaluate>=0.4" "loguru" "sacrebleu>=1.5"
                "pytz" "tenacity>=8.3" "pytablewriter" "filelock>=3.10,<4")
PIP_EXTRAS=$(echo ",$EXTRAS," | sed 's/,eval,/,/g; s/^,//; s/,$//')
echo "[install] installing mindspeed-vita[$PIP_EXTRAS]"
"$PY" -m pip install -e ".${PIP_EXTRAS:+[$PIP_EXTRAS]}"
if [[ ",$EXTRAS," == *",dev,"* || ",$EXTRAS," == *",eval,"* ]]; then
  echo "[install] installing $LMMS_EVAL (without its dependency list) and what it imports"
  TORCH_PIN=$(mktemp)
  trap 'rm -f "$TORCH_PIN"' EXIT
  "$PY" -c "import torch; print('torch==' + torch.__version__)" > "$TORCH_PIN"
  "$PY" -m pip install --no-deps "$LMMS_EVAL"
  "$PY" -m pip install -c "$TORCH_PIN" "${LMMS_EVAL_DEPS[@]}"
fi
"$PY" -c "import torch, megatron.core, transformers; print('[install] torch', torch.__version__, '| megatron-core', megatron.core.__version__, '| transformers', transformers.__version__)"
