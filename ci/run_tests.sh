#!/usr/bin/env bash
# The test entry point: the README's test command and CI (.ci/run) both call exactly this.
# Installs what the tests need, lints, then runs the whole suite on the CPU backend.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
bash ci/install.sh dev
# lint first (ruff.toml: pyflakes, syntax, line length): a second, not worth a test run if it fails
"$PY" -m ruff check .
export MINDSPEED_VITA_BACKEND=${MINDSPEED_VITA_BACKEND:-cpu}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
exec "$PY" -m pytest -q -p no:cacheprovider --timeout=600 --durations=15 tests "$@"
