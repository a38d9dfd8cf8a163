"""csrc/cuda's kernels compiled as C++ for the CPU emulator of csrc/cuda/emulate.cuh, so
that the CUDA sources are tested on machines without a GPU (test_cuda_build.py,
test_vjp_cuda_build.py)."""
import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from support import CUDA_DIR

ARCHS = ("80", "90")
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def emulated_library(build, source, shim):
    """csrc/cuda/<source> and a C++ shim exposing it, compiled as C++ for the CPU emulator
    into one shared library in the folder ``build``."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler for the emulated build")
    (build / "shim.cpp").write_text(shim)
    lib = build / f"lib{Path(source).stem}_emulated.so"
    cmd = [cxx, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-DKNOW_CUDA_EMULATE",
           "-I", str(CUDA_DIR), "-x", "c++", str(CUDA_DIR / source), "-x", "none",
           str(build / "shim.cpp"), "-o", str(lib)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, f"emulated build failed:\n{done.stderr}"
    return ctypes.CDLL(str(lib))
