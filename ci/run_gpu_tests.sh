#!/usr/bin/env bash
# The GPU job: CUDA backend parity tests and the attention benchmark on an NVIDIA GPU host.
# (CPU CI is ci/run_tests.sh; it deselects these tests with the `gpu` marker.)
#   - torch: the host's CUDA torch is kept when it imports; otherwise torch==2.13.0 from the
#     default index, which on Linux x86_64 is the CUDA build. Never the CPU wheel here.
#   - flash-attn (extra [gpu]) is NOT installed by this script (it builds from source for a new
#     torch); when it is already importable the tests and the benchmark also cover it.
#   - SKIP_INSTALL=1 skips every pip call (offline hosts whose environment is ready). The GPU
#     tests and the benchmark import only torch (with numpy) and pytest from the environment,
#     not megatron-core / transformers, so a CUDA torch plus pytest is enough.
# Extra arguments go to pytest. Timings land in $GPU_BENCH_OUT (default gpu-bench/).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
OUT=${GPU_BENCH_OUT:-gpu-bench}

if [ "${SKIP_INSTALL:-0}" != 1 ]; then
  if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "[gpu] installing torch==2.13.0 (CUDA build from the default index)"
    "$PY" -m pip install -q "torch==2.13.0"
  fi
  bash ci/install.sh dev
fi
"$PY" - <<'EOF'
import sys
import torch
if not torch.cuda.is_available():
    sys.exit(f"[gpu] no usable GPU: torch {torch.__version__}, CUDA build {torch.version.cuda}; "
             "run this on an NVIDIA GPU host with a CUDA build of torch")
name = torch.cuda.get_device_name(0)
cc = ".".join(map(str, torch.cuda.get_device_capability(0)))
try:
    import flash_attn
    fa = f"flash-attn {flash_attn.__version__}"
except Exception as exc:  # noqa: BLE001 - report any reason it does not import
    fa = f"flash-attn not importable ({type(exc).__name__})"
print(f"[gpu] torch {torch.__version__} (CUDA {torch.version.cuda}) on {name} (sm {cc}); {fa}")
EOF

export MINDSPEED_VITA_BACKEND=cuda
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
TIMEOUT=()
if "$PY" -c "import pytest_timeout" >/dev/null 2>&1; then TIMEOUT=(--timeout=900); fi
"$PY" -m pytest -q -p no:cacheprovider ${TIMEOUT[@]+"${TIMEOUT[@]}"} -m gpu -rA tests/backends/test_cuda_backend.py "$@"

mkdir -p "$OUT"
IMPLS="torch"
if "$PY" -c "import flash_attn" >/dev/null 2>&1; then IMPLS="torch flash_attn"; fi
for impl in $IMPLS; do
  # the defaults (2K-16K tokens, 2 q / 1 kv heads, dim 64, bf16), comparable with CPU runs
  "$PY" -m mindspeed_vita.cli bench attention --backend cuda --attention-impl "$impl" --repeats 5 \
    | tee "$OUT/attention-$impl-default.txt"
  # a Qwen2-like head layout (28 q / 4 kv heads of dim 128 per GPU at TP=1)
  "$PY" -m mindspeed_vita.cli bench attention --backend cuda --attention-impl "$impl" --repeats 5 \
    --heads 28 --kv-heads 4 --head-dim 128 --naive-max-gb 60 \
    | tee "$OUT/attention-$impl-qwen2.txt"
  "$PY" -m mindspeed_vita.cli bench attention --backend cuda --attention-impl "$impl" --repeats 5 --json \
    > "$OUT/attention-$impl-default.json"
done
echo "[gpu] benchmark tables in $OUT/"
