#!/usr/bin/env bash
# The built-in tiny demo on a fresh machine: install what is missing, then write the synthetic
# data, train Long-VITA's four stages on a tiny model with 2 processes (CP 2 in stages 3-4,
# a checkpoint per stage), evaluate held-out accuracy and generate from a real photo and a
# video. Output goes to ${1:-demo_out}.
# Installation is skipped when this checkout is already installed with every dependency of
# setup.py satisfied (shell/install_check.py); otherwise pip runs with its progress shown.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
if "$PY" shell/install_check.py dev; then
  echo "[demo] mindspeed-vita and its dependencies are installed: nothing to install"
else
  echo "[demo] installing (pip's progress follows; a few minutes on a fresh machine)"
  bash ci/install.sh dev
fi
source shell/env.sh
exec mindspeed-vita demo --out "${1:-demo_out}"
