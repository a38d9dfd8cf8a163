"""The CUDA sources without a GPU: every .cu compiles for sm_80 and sm_90 with nvcc, the
fused kernel runs against the float64 reference under the CPU emulator of
csrc/cuda/emulate.cuh (same source, compiled as C++), and the built module imports and
explains itself on a machine without a device."""
import concurrent.futures
import ctypes
import shutil
import subprocess
import sys

import pytest
import torch

from know_kernels import KNOWNHead, nowcast_ref

from support import CUDA_DIR, ROOT
from support.cuda_emulator import ARCHS, DTYPE_CODES, emulated_library
from support.heads import packed_of, params64, relative_error
from support.rows import weight_like_rows

SOURCES = sorted(CUDA_DIR.glob("*.cu"))
TILE_ROWS = 32  # kTileRows of nowcast.cu: rows one warp handles per loop trip
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


@pytest.fixture(scope="module")
def objects(tmp_path_factory):
    """Every source compiled by nvcc as the CMake build does (host code once, device code
    for each architecture): {stem: (object path, nvcc's completed process)}."""
    nvcc = _nvcc()
    build = tmp_path_factory.mktemp("nvcc")

    def compile_one(source):
        obj = build / f"{source.stem}.o"
        cmd = [nvcc, "-std=c++17", "-O3", "-c", str(source), "-I", str(CUDA_DIR),
               *[f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS], "-o", str(obj)]
        return source.stem, (obj, subprocess.run(cmd, capture_output=True, text=True))

    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(compile_one, SOURCES))


def test_every_source_compiles_for_sm80_and_sm90(objects):
    failures = [f"{stem}:\n{done.stderr}" for stem, (_, done) in objects.items()
                if done.returncode]
    assert not failures, "\n".join(failures)
    for obj, _ in objects.values():
        assert obj.stat().st_size > 0


def test_machine_code_census_of_the_nowcast_kernels(objects):
    # bench/sass_census.py reads the kernels' SASS; this keeps it in step with the kernel
    # and pins what the variants are for.
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import sass_census
        obj, done = objects["nowcast"]
        assert done.returncode == 0, done.stderr
        rows = {label: rest for label, *rest in sass_census.cuda_census(obj, 90)}
    except SystemExit as exc:  # no cuobjdump here
        pytest.skip(str(exc))
    finally:
        sys.path.pop(0)
    assert len(rows) == 8
    for label, (regs, stack, warps, c) in rows.items():
        # Two hidden slices x two 16-row slabs per trip: 7 products each (3 per pass in
        # precise mode), and 8 exps per slice and slab on the SFU.
        assert c["trip_tensor"] == (84 if label.startswith("precise") else 28), label
        assert c["trip_mufu"] == 16 and c["trip_ldg"] == 0, label
        if "blocks/SM=2" in label:
            assert regs <= 128 and warps == 16, label
        else:
            assert stack == 0 and warps == 8, label
        if "S=5" in label:  # the copy for S = 5 does less outside the hidden loop
            assert c["rest_row"] < 0.8 * rows[label.replace("S=5", "S=any")][3]["rest_row"]
    # The fast S = 5 copies spill nothing inside the hidden loop.
    assert rows["fast S=5 blocks/SM=2"][3]["trip_local"] == 0


# --- the kernel under the CPU emulator ------------------------------------------------

SHIM = r"""
#include <cstdio>
#include "nowcast.cuh"
extern "C" int know_emu_nowcast(std::uintptr_t rows, int rows_dtype, std::uintptr_t packed,
                                std::uintptr_t out, int out_dtype, std::int64_t n, int S,
                                int wnn, int steps, int all_steps, int precise, int blocks_per_sm,
                                char* err, int err_len) {
  know::cuda::NowcastArgs a;
  a.rows = rows; a.rows_dtype = rows_dtype; a.packed = packed; a.out = out;
  a.out_dtype = out_dtype; a.n = n; a.S = S; a.wnn = wnn != 0; a.steps = steps;
  a.all_steps = all_steps != 0; a.precise = precise != 0; a.blocks_per_sm = blocks_per_sm;
  const std::string e = know::cuda::nowcast(a);
  std::snprintf(err, err_len, "%s", e.c_str());
  return e.empty() ? 0 : 1;
}
"""


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    fn = emulated_library(tmp_path_factory.mktemp("cuda_emulated"), "nowcast.cu",
                          SHIM).know_emu_nowcast
    fn.argtypes = ([ctypes.c_size_t, ctypes.c_int, ctypes.c_size_t, ctypes.c_size_t,
                    ctypes.c_int, ctypes.c_int64] + [ctypes.c_int] * 6
                   + [ctypes.c_char_p, ctypes.c_int])

    def run(rows, packed, out, *, S, norm, steps, precise=True, blocks_per_sm=1):
        err = ctypes.create_string_buffer(512)
        rc = fn(rows.data_ptr(), DTYPE_CODES[rows.dtype], packed.data_ptr(), out.data_ptr(),
                DTYPE_CODES[out.dtype], rows.shape[0], S, norm == "wnn", steps, out.dim() == 2,
                precise, blocks_per_sm, err, len(err))
        if rc:
            raise RuntimeError(err.value.decode())
    return run


def _error(run, n, *, S=5, dtype=torch.float32, norm="wnn", steps=1, all_steps=False,
           precise=True, blocks_per_sm=1, out_dtype=torch.float32, seed=0):
    head = KNOWNHead(S, norm, seed=seed)
    rows = weight_like_rows(n, dtype, seed + 50, S=S)
    packed = packed_of(head)
    out = torch.full((n, steps) if all_steps else (n,), float("nan"), dtype=out_dtype)
    run(rows, packed, out, S=S, norm=norm, steps=steps, precise=precise,
        blocks_per_sm=blocks_per_sm)
    assert not out.isnan().any(), "some outputs were not written"
    ref = nowcast_ref(rows.double(), params64(head), norm, steps=steps, all_steps=all_steps)
    if out_dtype != torch.float32:
        return ((out.double() - ref).abs() / ref.abs()).max().item()
    return relative_error(out, ref) if n else 0.0


@pytest.mark.parametrize("n", [0, 1, TILE_ROWS - 1, TILE_ROWS + 1, 257])
def test_emulated_sizes(emulated, n):
    assert _error(emulated, n) <= PRECISE_TOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("S", [5, 6])  # the S = 5 copy and the one that reads S
def test_emulated_half_inputs(emulated, dtype, S):
    assert _error(emulated, 97, S=S, dtype=dtype, norm="raw", steps=2,
                  all_steps=True) <= PRECISE_TOL


@pytest.mark.parametrize("norm,steps,all_steps", [("wnn", 3, True), ("raw", 3, False),
                                                  ("wnn", 2, False)])
def test_emulated_steps(emulated, norm, steps, all_steps):
    assert _error(emulated, TILE_ROWS + 1, norm=norm, steps=steps, all_steps=all_steps,
                  seed=steps) <= PRECISE_TOL


# S = 5 runs the copy compiled for that window, S = 6 the one that reads S at run time;
# blocks_per_sm picks the register budget (the same code, so the same results).
@pytest.mark.parametrize("S", [5, 6])
@pytest.mark.parametrize("blocks_per_sm", [1, 2])
@pytest.mark.parametrize("precise", [True, False])
def test_emulated_variants(emulated, S, blocks_per_sm, precise):
    err = _error(emulated, 61, S=S, steps=2, all_steps=True, precise=precise,
                 blocks_per_sm=blocks_per_sm, seed=S)
    assert err <= (PRECISE_TOL if precise else FAST_TOL)


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


EXP_SHIM = r"""
#include <cstdio>
#include "nowcast.cuh"
extern "C" int know_emu_exp(int mode, std::uintptr_t out, std::int64_t threads, int iters,
                            char* err, int err_len) {
  const std::string e = know::cuda::exp_throughput(mode, out, threads, iters, 0, 0);
  std::snprintf(err, err_len, "%s", e.c_str());
  return e.empty() ? 0 : 1;
}
"""
OMEGA = 0.5671432904097838  # the fixed point of x -> exp(-x)


@pytest.mark.parametrize("mode", ["sfu", "poly", "mixed"])
def test_emulated_exp_benchmark(tmp_path, mode):
    # Each thread iterates x <- exp(-x) on 8 chains and writes their sum: 8 * omega once
    # converged (the map contracts by omega per step), so a wrong exp flavour shows.
    fn = emulated_library(tmp_path, "exp_bench.cu", EXP_SHIM).know_emu_exp
    fn.argtypes = [ctypes.c_int, ctypes.c_size_t, ctypes.c_int64, ctypes.c_int,
                   ctypes.c_char_p, ctypes.c_int]
    out = torch.full((37,), float("nan"))
    err = ctypes.create_string_buffer(256)
    assert fn(EXP_CODES[mode], out.data_ptr(), 37, 80, err, len(err)) == 0, err.value
    assert torch.allclose(out.double(), torch.full((37,), 8 * OMEGA, dtype=torch.float64),
                          rtol=1e-6, atol=0)
    assert fn(7, out.data_ptr(), 37, 80, err, len(err)) == 1 and b"exp_mode" in err.value


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
    from know_kernels.kernels.ops import nowcast_cuda
    ok, why = nowcast_cuda.available(torch.device("cpu"))
    assert not ok and "CUDA tensors" in why
    if C.device_count() == 0:
        ok, why = nowcast_cuda.available(torch.device("cuda", 0))
        assert not ok and "no CUDA device" in why


def test_module_rejects_bad_arguments():
    C = _built()
    with pytest.raises(RuntimeError, match="S must be in"):
        C.nowcast(1, 0, 1, 1, 0, 10, 9, True, 1, False, True, 1, 0, 0)
    with pytest.raises(RuntimeError, match="blocks_per_sm"):
        C.nowcast(1, 0, 1, 1, 0, 10, 5, True, 1, False, True, 3, 0, 0)
    with pytest.raises(RuntimeError, match="exp_mode"):
        C.exp_throughput(7, 1, 32, 1, 0, 0)


def test_register_budget_is_timed_once_per_key_and_reused(monkeypatch):
    from know_kernels.kernels.ops import nowcast_cuda
    monkeypatch.setattr(nowcast_cuda, "_tuned", {})
    ran, times = [], {1: 3.0, 2: 2.0}

    def timer(launch):
        launch()
        return times[ran[-1]]

    key = (0, False, 5)
    # Too small to time (or capturing a graph): one launch with the default, nothing kept.
    nowcast_cuda.launch_tuned(key, ran.append, False, timer)
    assert ran == [1] and nowcast_cuda.tuned() == {}
    # Timed: each budget runs (and writes the output) once; no extra launch after.
    nowcast_cuda.launch_tuned(key, ran.append, True, timer)
    assert sorted(ran[1:]) == [1, 2] and nowcast_cuda.tuned() == {key: 2}
    times[1] = 1.0
    nowcast_cuda.launch_tuned(key, ran.append, True, timer)
    assert ran[3:] == [2], "a cached choice must be launched once, not timed again"
    nowcast_cuda.launch_tuned((0, True, 5), ran.append, True, timer)
    assert nowcast_cuda.tuned()[(0, True, 5)] == 1


def test_run_refuses_unknown_register_budget():
    from know_kernels.kernels.ops import nowcast_cuda
    if nowcast_cuda._cuda is None:
        pytest.skip("know_kernels._cuda is not built")
    with pytest.raises(AssertionError, match="blocks_per_sm"):
        nowcast_cuda.run(torch.zeros(4, 5), torch.zeros(10), S=5, norm="wnn", steps=1,
                         out=torch.zeros(4), blocks_per_sm=3)


def test_public_entry_points_refuse_windows_the_kernels_do_not_take():
    C = _built()
    from know_kernels.kernels.backends import fused_module
    for op in ("nowcast", "vjp"):
        assert fused_module("cuda", op, C.MAX_WINDOW).MAX_WINDOW == C.MAX_WINDOW
        with pytest.raises(ValueError, match=f"up to {C.MAX_WINDOW} snapshots, got S=9"):
            fused_module("cuda", op, 9)


def test_both_modules_take_dtypes_as_the_codes_of_one_table():
    # DTYPE_CODES, what the emulated kernels are handed, is csrc/kernel_abi.h's table.
    from know_kernels._ext import _C
    from know_kernels.kernels.ops import DTYPE_NAMES
    codes = {DTYPE_NAMES[dtype]: code for dtype, code in DTYPE_CODES.items()}
    if _C is not None:
        assert _C.DTYPE_CODES == codes
    assert _built().DTYPE_CODES == codes
