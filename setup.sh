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
$PIP install -q --no-build-isolation -e ".[test,triton,data]"
