#!/usr/bin/env bash
# Set up a virtual environment in .venv with everything know-kernels needs, and build the
# package (C++ extension; the CUDA module too where nvcc exists).  Safe to rerun.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip
# The CPU wheel; a bare "torch" would pull a multi-GB CUDA build.
$PIP install -q "torch==2.13.0"
$PIP install -q setuptools wheel pybind11 cmake ninja
$PIP install -q --no-build-isolation -e ".[test,triton,data,integrations]"
# Fashion-MNIST for `know demo` (Debian's package; nothing is downloaded at run time).
# Best effort: without root or passwordless sudo, say how and carry on.
FMNIST=/usr/share/datasets/fashion-mnist
if [ ! -d "$FMNIST" ] && command -v apt-get > /dev/null; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo -n"
  if ! { $SUDO apt-get install -y -q dataset-fashion-mnist > /dev/null 2>&1 \
         || { $SUDO apt-get update -q > /dev/null 2>&1 \
              && $SUDO apt-get install -y -q dataset-fashion-mnist > /dev/null 2>&1; }; }; then
    echo "setup.sh: could not install dataset-fashion-mnist; for know demo run" \
         "'apt-get install dataset-fashion-mnist' or pass --data-dir" >&2
  fi
fi
