"""The CUDA VJP of one nowcast step without a GPU: csrc/cuda/vjp.cu compiles for sm_80 and
sm_90 with nvcc (no register spills), the same source runs under the CPU emulator of
csrc/cuda/emulate.cuh against torch autograd on the float64 reference, and the built
module's VJP entry points explain themselves.  The checks: support/vjp_kernels.py."""
import ctypes
import re
import shutil
import subprocess

import pytest
import torch

from know_kernels.kernels.packing import packed_size

from support import CUDA_DIR
from support.cuda_emulator import ARCHS, DTYPE_CODES, emulated_library
from support.vjp_kernels import HALF_TOL, assert_close, call, case, check, kink_case

TILE_ROWS = 32  # kTile of vjp.cu


def test_compiles_for_sm80_and_sm90(tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not installed")
    cmd = [nvcc, "-std=c++17", "-O3", "-c", str(CUDA_DIR / "vjp.cu"), "-I", str(CUDA_DIR),
           "-Xptxas", "-v", *[f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS],
           "-o", str(tmp_path / "vjp.o")]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "vjp.o").stat().st_size > 0
    # ptxas reports each kernel per architecture; the fused kernel must not spill.
    spills = re.findall(r"(\d+) bytes spill stores", done.stderr)
    assert len(spills) == 2 * len(ARCHS) and not any(int(s) for s in spills), done.stderr


SHIM = r"""
#include <cstdio>
#include "vjp.cuh"
extern "C" int know_emu_vjp(std::uintptr_t rows, int rows_dtype, std::uintptr_t packed,
                            std::uintptr_t upstream, std::uintptr_t grad_packed,
                            std::uintptr_t grad_rows, std::uintptr_t workspace,
                            std::int64_t workspace_floats, std::int64_t n, int S, int wnn,
                            int groups, int max_blocks, char* err, int err_len) {
  const know::cuda::VjpArgs a{rows, rows_dtype, packed, upstream, grad_packed, grad_rows,
                              workspace, workspace_floats, n, S, wnn != 0, groups,
                              max_blocks, 0, 0};
  const std::string e = know::cuda::vjp(a);
  std::snprintf(err, err_len, "%s", e.c_str());
  return e.empty() ? 0 : 1;
}
extern "C" int know_emu_vjp_workspace(std::int64_t n, int S, int groups, std::int64_t* floats,
                                      char* err, int err_len) {
  const std::string e = know::cuda::vjp_workspace_floats(n, S, groups, floats);
  std::snprintf(err, err_len, "%s", e.c_str());
  return e.empty() ? 0 : 1;
}
"""


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    """The emulated kernel behind the backends' ``run`` signature, plus its ``groups`` and
    ``max_blocks`` (0: the defaults)."""
    so = emulated_library(tmp_path_factory.mktemp("vjp_emulated"), "vjp.cu", SHIM)
    so.know_emu_vjp.argtypes = ([ctypes.c_size_t, ctypes.c_int] + [ctypes.c_size_t] * 5
                                + [ctypes.c_int64, ctypes.c_int64] + [ctypes.c_int] * 4
                                + [ctypes.c_char_p, ctypes.c_int])
    so.know_emu_vjp_workspace.argtypes = [ctypes.c_int64, ctypes.c_int, ctypes.c_int,
                                          ctypes.POINTER(ctypes.c_int64), ctypes.c_char_p,
                                          ctypes.c_int]

    def run(rows, packed, upstream, *, S, norm, grad_packed, grad_rows, groups=0,
            max_blocks=0):
        err = ctypes.create_string_buffer(512)
        floats = ctypes.c_int64()
        if so.know_emu_vjp_workspace(rows.shape[0], S, groups, ctypes.byref(floats), err,
                                     len(err)):
            raise RuntimeError(err.value.decode())
        workspace = torch.full((max(floats.value, 1),), float("nan"))
        if so.know_emu_vjp(rows.data_ptr(), DTYPE_CODES[rows.dtype], packed.data_ptr(),
                           upstream.data_ptr(), grad_packed.data_ptr(),
                           0 if grad_rows is None else grad_rows.data_ptr(),
                           workspace.data_ptr(), floats.value, rows.shape[0], S, norm == "wnn",
                           groups, max_blocks, err, len(err)):
            raise RuntimeError(err.value.decode())
    return run


@pytest.mark.parametrize("n", [0, 1, TILE_ROWS + 1, 97])
def test_emulated_sizes(emulated, n):
    # The emulated device has 2 SMs: 97 rows are 4 tiles, two groups per block.
    errs = check(emulated, n, seed=n, constant_every=5)
    if n == 0:
        assert errs == {"grad_packed max": 0.0}
    else:
        assert_close(errs)


@pytest.mark.parametrize("norm", ["wnn", "raw"])
def test_emulated_ties_and_no_row_gradient(emulated, norm):
    assert_close(check(emulated, 45, norm=norm, seed=2, constant_every=4, tied=True))
    assert_close(check(emulated, 45, norm=norm, seed=2, row_grad=False))


@pytest.mark.parametrize("dtype,norm", [(torch.bfloat16, "wnn"), (torch.float16, "raw")])
def test_emulated_half_inputs(emulated, dtype, norm):
    assert_close(check(emulated, 37, dtype=dtype, norm=norm, seed=3, tied=True), HALF_TOL)


@pytest.mark.parametrize("S", [2, 8])
def test_emulated_window_sizes(emulated, S):
    assert_close(check(emulated, 37, S=S, seed=S, constant_every=3))


def test_emulated_kinks(emulated):
    assert_close(kink_case(emulated))


def test_emulated_deterministic_over_blocks(emulated):
    # 5 tiles in 3 groups (2, 2, 1) over 1, 2 and 3 blocks, and the same call twice.
    head, rows, _, upstream = case(5 * TILE_ROWS - 3, seed=9, constant_every=7)
    outs = [call(emulated, rows, head, upstream, "wnn", groups=3, max_blocks=b)
            for b in (1, 2, 3, 3)]
    for grad_packed, grad_rows in outs[1:]:
        assert torch.equal(grad_packed, outs[0][0]) and torch.equal(grad_rows, outs[0][1])


def test_emulated_rejects_bad_window(emulated):
    rows = torch.zeros(4, 9)
    with pytest.raises(RuntimeError, match="S must be in"):
        emulated(rows, torch.zeros(10), torch.zeros(4), S=9, norm="wnn",
                 grad_packed=torch.zeros(10), grad_rows=None)


# --- the built module -------------------------------------------------------------------

def _built():
    try:
        from know_kernels import _cuda
    except ImportError as exc:
        pytest.skip(f"know_kernels._cuda is not built ({exc})")
    if not hasattr(_cuda, "vjp"):
        pytest.skip("know_kernels._cuda was built before the VJP kernel existed")
    return _cuda


def _any_build():
    from know_kernels.kernels.ops import nowcast_cuda
    if nowcast_cuda._cuda is None:
        pytest.skip(f"know_kernels._cuda is not built ({nowcast_cuda._IMPORT_ERROR})")
    return nowcast_cuda._cuda


def test_available_adds_the_kernel_check():
    # What the inference backend says about the device, plus whether the build has vjp.cu.
    C = _any_build()
    from know_kernels.kernels.ops import nowcast_cuda, vjp_cuda
    for device in (torch.device("cpu"), torch.device("cuda", 0)):
        usable, reason = nowcast_cuda.available(device)
        ok, why = vjp_cuda.available(device)
        if not usable:
            assert (ok, why) == (usable, reason)
        else:
            assert ok == hasattr(C, "vjp") and (ok or "rebuild" in why)


def test_module_rejects_bad_arguments():
    C = _built()
    with pytest.raises(RuntimeError, match="S must be in"):
        C.vjp_workspace_floats(10, 9, 0)
    with pytest.raises(RuntimeError, match="dtype"):
        C.vjp(1, 7, 1, 1, 1, 0, 1, 100, 10, 5, True, 0, 0, 0, 0)


def test_wrapper_asserts_cuda_tensors():
    # The public entry point validates what users pass; the wrapper asserts the layout its
    # kernel indexes by, before any launch.
    _any_build()
    from know_kernels.kernels.ops import vjp_cuda
    rows = torch.zeros(4, 5)
    packed = torch.zeros(packed_size(5))
    with pytest.raises(AssertionError, match="rows on cpu"):
        vjp_cuda.run(rows, packed, torch.zeros(4), S=5, norm="wnn",
                     grad_packed=torch.zeros_like(packed), grad_rows=None)
