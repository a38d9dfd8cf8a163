"""The CUDA sources without a GPU: every .cu compiles for sm_80 and sm_90 with nvcc, the
fused kernel runs against the float64 reference under the CPU emulator of
csrc/cuda/emulate.cuh (same source, compiled as C++), and the built module imports and
explains itself on a machine without a device."""
import concurrent.futures
import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from know_kernels import KNOWNHead, nowcast_ref
from know_kernels.packing import pack
from test_nowcast_gpu import params64, weight_like_rows

CUDA_DIR = Path(__file__).resolve().parents[1] / "csrc" / "cuda"
SOURCES = sorted(CUDA_DIR.glob("*.cu"))
ARCHS = ("80", "90")
TILE_ROWS = 32  # kTileRows of nowcast.cu: rows one warp handles per loop trip
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
EXP_CODES = {"sfu": 0, "poly": 1, "mixed": 2}
PRECISE_TOL = 1e-5
# One TF32 product per matrix product; measured under emulation at 3e-5 to 5e-5.
FAST_TOL = 2e-4


def _nvcc():
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not installed")
    return nvcc


def test_sources_found():
    assert {p.name for p in SOURCES} >= {"nowcast.cu", "exp_bench.cu", "runtime.cu"}


def test_every_source_compiles_for_sm80_and_sm90(tmp_path):
    nvcc = _nvcc()

    def compile_one(source):
        # Host code once, device code for each architecture (like the CMake build).
        cmd = [nvcc, "-std=c++17", "-O3", "-c", str(source), "-I", str(CUDA_DIR),
               *[f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS],
               "-o", str(tmp_path / f"{source.stem}.o")]
        return source, subprocess.run(cmd, capture_output=True, text=True)

    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(compile_one, SOURCES))
    failures = [f"{s.name}:\n{d.stderr}" for s, d in results if d.returncode]
    assert not failures, "\n".join(failures)
    for source, _ in results:
        assert (tmp_path / f"{source.stem}.o").stat().st_size > 0


# --- the kernel under the CPU emulator ------------------------------------------------

SHIM = r"""
#include <cstdio>
#include "nowcast.cuh"
extern "C" int know_emu_nowcast(std::uintptr_t rows, int rows_dtype, std::uintptr_t packed,
                                std::uintptr_t out, int out_dtype, std::int64_t n, int S,
                                int wnn, int steps, int all_steps, int precise, int exp_mode,
                                char* err, int err_len) {
  know::cuda::NowcastArgs a;
  a.rows = rows; a.rows_dtype = rows_dtype; a.packed = packed; a.out = out;
  a.out_dtype = out_dtype; a.n = n; a.S = S; a.wnn = wnn != 0; a.steps = steps;
  a.all_steps = all_steps != 0; a.precise = precise != 0; a.exp_mode = exp_mode;
  const std::string e = know::cuda::nowcast(a);
  std::snprintf(err, err_len, "%s", e.c_str());
  return e.empty() ? 0 : 1;
}
"""


def emulated_library(build, source, shim):
    """csrc/cuda/<source> and a C++ shim exposing it, compiled as C++ for the CPU emulator
    into one shared library in the folder ``build`` (test_l1_cuda_build.py uses it too)."""
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


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    fn = emulated_library(tmp_path_factory.mktemp("cuda_emulated"), "nowcast.cu",
                          SHIM).know_emu_nowcast
    fn.argtypes = ([ctypes.c_size_t, ctypes.c_int, ctypes.c_size_t, ctypes.c_size_t,
                    ctypes.c_int, ctypes.c_int64] + [ctypes.c_int] * 6
                   + [ctypes.c_char_p, ctypes.c_int])

    def run(rows, packed, out, *, S, norm, steps, precise=True, exp="mixed"):
        err = ctypes.create_string_buffer(512)
        rc = fn(rows.data_ptr(), DTYPE_CODES[rows.dtype], packed.data_ptr(), out.data_ptr(),
                DTYPE_CODES[out.dtype], rows.shape[0], S, norm == "wnn", steps, out.dim() == 2,
                precise, EXP_CODES[exp], err, len(err))
        if rc:
            raise RuntimeError(err.value.decode())
    return run


def _error(run, n, *, S=5, dtype=torch.float32, norm="wnn", steps=1, all_steps=False,
           precise=True, exp="mixed", out_dtype=torch.float32, seed=0):
    head = KNOWNHead(S, norm, seed=seed)
    rows = weight_like_rows(n, dtype, seed + 50, S=S)
    packed = pack({k: v.detach() for k, v in head.params_dict().items()}, S)
    out = torch.full((n, steps) if all_steps else (n,), float("nan"), dtype=out_dtype)
    run(rows, packed, out, S=S, norm=norm, steps=steps, precise=precise, exp=exp)
    assert not out.isnan().any(), "some outputs were not written"
    ref = nowcast_ref(rows.double(), params64(head), norm, steps=steps, all_steps=all_steps)
    if out_dtype != torch.float32:
        return ((out.double() - ref).abs() / ref.abs()).max().item()
    return ((out.double() - ref).norm() / ref.norm()).item() if n else 0.0


@pytest.mark.parametrize("n", [0, 1, TILE_ROWS - 1, TILE_ROWS + 1, 257])
def test_emulated_sizes(emulated, n):
    assert _error(emulated, n) <= PRECISE_TOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_emulated_half_inputs(emulated, dtype):
    assert _error(emulated, 97, dtype=dtype, norm="raw", steps=2, all_steps=True) <= PRECISE_TOL


@pytest.mark.parametrize("norm,steps,all_steps", [("wnn", 3, True), ("raw", 3, False),
                                                  ("wnn", 2, False)])
def test_emulated_steps(emulated, norm, steps, all_steps):
    assert _error(emulated, TILE_ROWS + 1, norm=norm, steps=steps, all_steps=all_steps,
                  seed=steps) <= PRECISE_TOL


@pytest.mark.parametrize("exp", ["sfu", "poly"])
def test_emulated_exp_modes(emulated, exp):
    assert _error(emulated, 61, exp=exp, steps=2, all_steps=True) <= PRECISE_TOL


@pytest.mark.parametrize("S", [2, 8])
def test_emulated_window_sizes(emulated, S):
    assert _error(emulated, 45, S=S, steps=2, all_steps=True, seed=S) <= PRECISE_TOL


def test_emulated_fast_mode(emulated):
    err = _error(emulated, 129, precise=False, steps=2, all_steps=True)
    assert err <= FAST_TOL
    # ... and it really is the one-product mode: TF32 rounding shows.
    assert err > PRECISE_TOL / 10


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_emulated_half_output(emulated, out_dtype):
    # One round-to-nearest conversion of the float32 result: half an ulp.
    bound = 2.0 ** -8 if out_dtype == torch.bfloat16 else 2.0 ** -11
    assert _error(emulated, 45, dtype=out_dtype, out_dtype=out_dtype) <= bound * (1 + 1e-3)


def test_emulated_rejects_bad_window(emulated):
    rows = torch.zeros(4, 9)
    out = torch.empty(4)
    with pytest.raises(RuntimeError, match="S must be in"):
        emulated(rows, torch.zeros(10), out, S=9, norm="wnn", steps=1)


# --- the built module -------------------------------------------------------------------

def _built():
    try:
        from know_kernels import _cuda
    except ImportError as exc:
        pytest.skip(f"know_kernels._cuda is not built ({exc})")
    return _cuda


def test_module_imports_and_describes_itself():
    C = _built()
    info = C.build_info()
    assert "80" in info and "90" in info and "static" in info
    count, why = C.runtime_status()
    assert count >= 0 and (count > 0 or why)
    assert C.device_count() == count
    assert set(C.EXP_MODES) == set(EXP_CODES) and C.MAX_WINDOW == 8


def test_available_explains_missing_device():
    C = _built()
    from know_kernels.ops import nowcast_cuda
    ok, why = nowcast_cuda.available(torch.device("cpu"))
    assert not ok and "CUDA tensors" in why
    if C.device_count() == 0:
        ok, why = nowcast_cuda.available(torch.device("cuda", 0))
        assert not ok and "no CUDA device" in why


def test_module_rejects_bad_arguments():
    C = _built()
    with pytest.raises(RuntimeError, match="S must be in"):
        C.nowcast(1, 0, 1, 1, 0, 10, 9, True, 1, False, True, 2, 0, 0)
    with pytest.raises(RuntimeError, match="exp_mode"):
        C.nowcast(1, 0, 1, 1, 0, 10, 5, True, 1, False, True, 7, 0, 0)
