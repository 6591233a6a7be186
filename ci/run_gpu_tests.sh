#!/usr/bin/env bash
# The GPU job, one command on an NVIDIA GPU host:  GPU_OUT=<dir> bash ci/run_gpu_tests.sh
# (CPU CI is ci/run_tests.sh; it deselects the GPU tests with the `gpu` marker.)
#
# Steps, each under its own time limit and each run whatever the previous ones gave (a failing
# test does not hide the benchmark figures); the exit status is 1 when any step failed and
# $GPU_OUT/summary.txt says which:
#   env      torch / CUDA / GPU / free memory, and whether flash-attn's kernels load
#   tests    pytest -m gpu on the GPU test files (every GPU parity test) -> tests.txt, tests.xml
#   bench    `bench attention` per kernel implementation: default shapes and a Qwen2-like
#            28 q / 4 kv heads of dim 128                               -> bench-<impl>-*.txt/json
#   audit    ci/gpu_audit.py: host syncs per call, strided views, decode/GQA edge cases,
#            kernel time vs SDPA flash / cuDNN, TFLOP/s, peak memory, fused layers
#                                                                        -> audit.txt, audit.json
#   demo     the tiny model's `demo` (train steps + generation; only with the full install)
#                                                                        -> demo.txt, demo/
# Installation: skipped when a CUDA build of torch already imports (GPU hosts here are offline,
# with torch and pytest only; the tests, benchmark and audit need nothing else). Otherwise
# torch==2.13.0 (the CUDA wheel on Linux x86_64) and the dev extra; INSTALL=0 never installs,
# INSTALL=1 always does. flash-attn is never installed here (README: GPU hosts).
# Extra arguments go to pytest. GPU_JOB_BUDGET_S (default 540) caps the whole job.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then  # the first interpreter on PATH that imports torch (hosts differ)
  PY=python3
  for candidate in python3 python; do
    if command -v "$candidate" >/dev/null && "$candidate" -c "import torch" >/dev/null 2>&1; then
      PY=$candidate; break
    fi
  done
fi
OUT=${GPU_OUT:-${GPU_BENCH_OUT:-gpu-bench}}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" MINDSPEED_VITA_BACKEND=cuda
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
# deterministic-mode checks (tests, audit) run cuBLAS too, which needs a fixed workspace
export CUBLAS_WORKSPACE_CONFIG=${CUBLAS_WORKSPACE_CONFIG:-:4096:8}
START=$SECONDS
BUDGET=${GPU_JOB_BUDGET_S:-540}
FAILED=()
: >"$OUT/summary.txt"

note() { echo "[gpu] $*" | tee -a "$OUT/summary.txt"; }
# step NAME LIMIT_S LOG CMD...: run CMD under min(LIMIT_S, what is left of the budget) and
# record how it ended. LOG *.json gets stdout only (stderr goes to LOG.err); any other LOG gets
# stdout and stderr, also shown on the console.
step() {
  local name=$1 limit=$2 log=$3 left rc t0=$SECONDS
  shift 3
  left=$((BUDGET - (SECONDS - START)))
  if [ "$left" -lt 20 ]; then
    note "$name: SKIPPED (job budget of ${BUDGET}s spent)"; FAILED+=("$name"); return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  if [[ "$log" == *.json ]]; then
    timeout --kill-after=10 "$limit" "$@" >"$log" 2>"$log.err"
    rc=$?
  else
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
  fi
  if [ "$rc" -eq 0 ]; then
    note "$name: ok ($((SECONDS - t0)) s)"
  else
    if [ "$rc" -eq 124 ]; then note "$name: TIMED OUT after ${limit}s"
    else note "$name: FAILED (exit $rc, $((SECONDS - t0)) s)"; fi
    FAILED+=("$name")
  fi
}

cuda_torch() { "$PY" -c "import sys, torch; sys.exit(0 if torch.version.cuda else 1)" >/dev/null 2>&1; }
case "${INSTALL:-auto}" in
  auto) if cuda_torch; then DO_INSTALL=0; else DO_INSTALL=1; fi ;;
  0|1) DO_INSTALL=$INSTALL ;;
  *) echo "[gpu] INSTALL must be auto, 0 or 1, got '$INSTALL'" >&2; exit 2 ;;
esac
if [ "$DO_INSTALL" = 1 ]; then
  if ! cuda_torch; then "$PY" -m pip install -q "torch==2.13.0" || note "install: torch FAILED"; fi
  bash ci/install.sh dev || note "install: mindspeed-vita[dev] FAILED"
else
  note "install: skipped (a CUDA build of torch imports)"
fi

# env: one JSON line, also the list of kernel implementations the benchmark covers
"$PY" - "$OUT/env.json" <<'EOF' | tee -a "$OUT/summary.txt"
import json, sys
import torch
info = {"torch": torch.__version__, "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available()}
impls = ["torch"]
if torch.cuda.is_available():
    free, total = torch.cuda.mem_get_info()
    info.update(gpu=torch.cuda.get_device_name(0),
                capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                free_gib=round(free / 2**30, 1), total_gib=round(total / 2**30, 1),
                cudnn=torch.backends.cudnn.version())
# flash-attn counts only when its compiled kernels load and bind: a build for another torch
# is found by pip but fails with an undefined symbol here
try:
    from backends.cuda import CUDABackend
    kernels = CUDABackend(attention_impl="flash_attn")._kernels()
    info["flash_attn"] = kernels.version
    impls.append("flash_attn")
except Exception as exc:  # noqa: BLE001 - report why, whatever it is
    info["flash_attn"] = f"unusable: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
info["impls"] = impls
json.dump(info, open(sys.argv[1], "w"), sort_keys=True)
print("[gpu] env:", json.dumps(info, sort_keys=True))
EOF
if ! "$PY" -c "import json, sys; sys.exit(0 if json.load(open('$OUT/env.json'))['cuda_available'] else 1)"; then
  note "no usable GPU (see env above): run this on an NVIDIA GPU host with a CUDA build of torch"
  exit 1
fi
IMPLS=$("$PY" -c "import json; print(' '.join(json.load(open('$OUT/env.json'))['impls']))")

# the files with `gpu` tests, named so that no other test module (megatron, transformers) is
# collected on a torch-only host
GPU_TESTS="tests/backends/test_cuda_backend.py tests/backends/test_cuda_fused.py"
TIMEOUT=()
if "$PY" -c "import pytest_timeout" >/dev/null 2>&1; then TIMEOUT=(--timeout=300); fi
step tests 240 "$OUT/tests.txt" "$PY" -m pytest -q -p no:cacheprovider ${TIMEOUT[@]+"${TIMEOUT[@]}"} \
  -m gpu -rfEs --junitxml="$OUT/tests.xml" $GPU_TESTS "$@"

# The naive baseline materialises [heads, s, s] score matrices; its budget is half of the free
# GPU memory (the estimate is an upper bound of ~4 matrices), so it cannot run out of memory on
# an 80 GB card; points above it are skipped with their estimate printed.
NAIVE_GB=$("$PY" -c "import torch; print(round(torch.cuda.mem_get_info()[0] * 0.5 / 2**30, 1))")
note "bench: naive-attention budget ${NAIVE_GB} GiB (half the free GPU memory)"
for impl in $IMPLS; do
  bench=("$PY" -m mindspeed_vita.cli bench attention --backend cuda --attention-impl "$impl"
         --repeats 5 --naive-max-gb "$NAIVE_GB")
  # the defaults (2K-16K tokens, 2 q / 1 kv heads of dim 64, bf16), comparable with CPU runs
  step "bench-$impl-default" 90 "$OUT/bench-$impl-default.txt" "${bench[@]}"
  step "bench-$impl-default-json" 90 "$OUT/bench-$impl-default.json" "${bench[@]}" --json
  # a Qwen2-like head layout (28 q / 4 kv heads of dim 128 per GPU at TP=1)
  qwen=(--heads 28 --kv-heads 4 --head-dim 128)
  step "bench-$impl-qwen2" 90 "$OUT/bench-$impl-qwen2.txt" "${bench[@]}" "${qwen[@]}"
  step "bench-$impl-qwen2-json" 90 "$OUT/bench-$impl-qwen2.json" "${bench[@]}" "${qwen[@]}" --json
done

step audit 240 "$OUT/audit.txt" "$PY" ci/gpu_audit.py --out "$OUT/audit.json"

# The whole stack on the GPU (the tiny model's demo: optimizer steps on packed rows, then
# KV-cache generation) needs the full install - megatron-core, transformers, pillow, ... - which
# offline torch-only GPU hosts lack: then it is recorded as skipped, not failed. The demo model
# is fp32, whose attention is the reference math (refused above 1 GiB of scores), so it runs at
# its default 2K tokens; DEMO_SEQ_LENGTH=32768 once it trains in bf16.
if [ "${GPU_JOB_DEMO:-1}" = 0 ]; then
  note "demo: skipped (GPU_JOB_DEMO=0)"
elif "$PY" -c "import megatron.core, transformers, yaml, pydantic, PIL, av, tokenizers" >/dev/null 2>&1; then
  step demo 150 "$OUT/demo.txt" "$PY" -m mindspeed_vita.cli demo --backend cuda --steps 2 \
    --seq-length "${DEMO_SEQ_LENGTH:-2048}" --out "$OUT/demo"
else
  note "demo: skipped (megatron-core / transformers / pillow / av not installed: pip install -e .)"
fi

if [ "${#FAILED[@]}" -eq 0 ]; then
  note "all steps passed in $((SECONDS - START)) s; results in $OUT/"
  exit 0
fi
note "FAILED steps: ${FAILED[*]} ($((SECONDS - START)) s); results in $OUT/"
exit 1
