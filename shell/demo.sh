#!/usr/bin/env bash
# The built-in tiny demo on a fresh machine: install, then build a tiny Long-VITA (tokenizer,
# synthetic data, model), run it on a real photo and a synthetic packed batch, save and reload a
# checkpoint, and generate. Output goes to ${1:-demo_out}.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash ci/install.sh dev
source shell/env.sh
exec mindspeed-vita demo --out "${1:-demo_out}"
