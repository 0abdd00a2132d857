#!/usr/bin/env bash
# Install moeprune (editable) without pulling multi-GB CUDA wheels:
# keep an already-installed torch (GPU users keep theirs), else install the CPU build torch==2.13.0 first.
# With the `dev` extra, also install Debian's chromium (used by tests/test_html_report.py) when none is on PATH.
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

install_chromium() {
  if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
    return 0
  fi
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "install.sh: no chromium on PATH and apt-get is unavailable; install Chromium yourself" \
      "(tests/test_html_report.py needs it)." >&2
    return 0
  fi
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
      sudo="sudo"
    else
      echo "install.sh: not root and no sudo; run \`apt-get install -y chromium\` as root" \
        "(tests/test_html_report.py needs it)." >&2
      return 0
    fi
  fi
  echo "install.sh: installing Debian's chromium (for tests/test_html_report.py) ..."
  if ! { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium; }; then
    echo "install.sh: apt-get could not install chromium; install it yourself" \
      "(tests/test_html_report.py needs it)." >&2
  fi
  return 0
}

case ",${1:-}," in
  *,dev,*) install_chromium ;;
esac
