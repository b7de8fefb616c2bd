#!/usr/bin/env bash
# Build llama-cpp-python once and keep the wheel, so a second install takes seconds.
#
# llama-cpp-python ships only a source distribution on PyPI: installing it compiles llama.cpp
# (minutes on a small machine). The wheel is built here at low priority with at most
# $CMAKE_BUILD_PARALLEL_LEVEL (default 2) compile jobs and cached under
#   ${XDG_CACHE_HOME:-~/.cache}/ruyiflow/wheels/llama-cpp-python-<version>-<key>/
# where <key> covers the Python tag, the machine and the CPU flags (llama.cpp builds for the
# CPU it is built on, so a wheel is only reused where it can run). Prints the directory on
# stdout; on failure writes the reason to <dir>.failed (the engine tests quote it) and exits 1.
#
# Usage: scripts/engine_wheels.sh PYTHON
set -euo pipefail
PY="${1:?usage: engine_wheels.sh PYTHON}"
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/ruyiflow/wheels"
PYTAG="$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')"
FLAGS="$(grep -m1 -E '^(flags|Features)' /proc/cpuinfo 2>/dev/null || true)"
KEY="$(printf '%s %s %s' "$PYTAG" "$(uname -m)" "$FLAGS" | sha256sum | cut -c1-12)"
DIR="$CACHE/llama-cpp-python-$VERSION-$KEY"
mkdir -p "$CACHE"

if ls "$DIR"/llama_cpp_python-"$VERSION"-*.whl >/dev/null 2>&1; then
  echo "$DIR"
  exit 0
fi
rm -f "$DIR.failed"
LOG="$(mktemp)"
started=$(date +%s)
echo "install: building llama-cpp-python $VERSION from source once (cached in $DIR)" >&2
# LLAVA_BUILD=OFF: the multimodal library is not needed to serve a text model.
if CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}" \
  CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF}" \
  nice -n 10 "$PY" -m pip wheel -q --no-deps "llama-cpp-python==$VERSION" -w "$DIR.tmp" \
  >"$LOG" 2>&1; then
  rm -rf "$DIR" && mv "$DIR.tmp" "$DIR"
  echo "install: built llama-cpp-python in $(($(date +%s) - started)) s" >&2
  rm -f "$LOG"
  echo "$DIR"
  exit 0
fi
rm -rf "$DIR.tmp"
{
  echo "building llama-cpp-python $VERSION from source failed (needs a C/C++ compiler and"
  echo "cmake); last lines of the build log:"
  tail -n 20 "$LOG"
} >"$DIR.failed"
rm -f "$LOG"
cat "$DIR.failed" >&2
exit 1
