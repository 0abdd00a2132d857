#!/usr/bin/env bash
# Install moeprune (editable) without pulling multi-GB CUDA wheels:
# keep an already-installed torch (GPU users keep theirs), else install the CPU build torch==2.13.0 first.
# With the `dev` extra, also install Debian's chromium (used by tests/test_html_report.py) when none is on PATH:
# one line says so, apt-get runs quietly into a log file under ${TMPDIR:-/tmp} that is shown (tail) only on failure.
# Usage: bash scripts/install.sh [EXTRAS]     e.g. `bash scripts/install.sh dev`
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "torch==2.13.0"
fi
spec="."
[ -n "${1:-}" ] && spec=".[$1]"
case ",${1:-}," in
  *,dev,*|*,gguf,*)
    # llama-cpp-python is a source-only package: the first install compiles llama.cpp (CPU only; its multimodal
    # library, tools and server are not needed). pip caches the built wheel, so later installs take seconds.
    if ! "$PY" -c "import llama_cpp" 2>/dev/null; then
      echo "install.sh: installing llama-cpp-python (llama.cpp, for the GGUF checks); PyPI ships it as source, so" \
        "the first install on a machine compiles it (10-20 minutes on 2 cores), later ones reuse pip's wheel ..."
      export CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF}"
      export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || echo 2)}"
    fi ;;
esac
"$PY" -m pip install -q -e "$spec"
case ",${1:-}," in
  *,dev,*|*,gguf,*) "$PY" -m moeprune.gguf >/dev/null ;;  # llama.cpp's converter, fetched once
esac

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
  local how="as root" log
  [ -n "$sudo" ] && how="via sudo"
  log=$(mktemp "${TMPDIR:-/tmp}/moeprune-install-chromium.XXXXXX")
  echo "install.sh: installing Debian's chromium with apt-get $how: the dev tests" \
    "(tests/test_html_report.py) render the HTML report in it (about a minute) ..."
  if { $sudo apt-get update -qq && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } \
      >"$log" 2>&1; then
    rm -f "$log"
  else
    echo "install.sh: apt-get could not install chromium; install it yourself" \
      "(tests/test_html_report.py needs it). Last lines of $log:" >&2
    tail -n 20 "$log" >&2
  fi
  return 0
}

case ",${1:-}," in
  *,dev,*) install_chromium ;;
esac
