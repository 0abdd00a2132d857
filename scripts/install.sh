#!/usr/bin/env bash
# Install moeprune (editable) without pulling multi-GB CUDA wheels:
# keep an already-installed torch (GPU users keep theirs), else install the CPU build torch==2.13.0 first.
# Usage: bash scripts/install.sh [EXTRAS]     e.g. `bash scripts/install.sh dev`
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "torch==2.13.0"
fi
spec="."
[ -n "${1:-}" ] && spec=".[$1]"
"$PY" -m pip install -q -e "$spec"
