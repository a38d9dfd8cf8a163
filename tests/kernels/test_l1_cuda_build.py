"""The CUDA L1 training step without a GPU: csrc/cuda/l1.cu compiles for sm_80 and sm_90
with nvcc (no register spills), the same source runs under the CPU emulator of
csrc/cuda/emulate.cuh against torch autograd on the float64 reference, and the built
module's L1 entry points explain themselves.  The checks: support/l1_kernels.py."""
import ctypes
import re
import shutil
import subprocess

import pytest
import torch

from know_kernels.kernels.packing import packed_size

from support import CUDA_DIR
from support.cuda_emulator import ARCHS, DTYPE_CODES, emulated_library
from support.heads import make_head
from support.l1_kernels import assert_close, call, errors, kink_case, zero_residual_case
from support.rows import rows_and_target

TILE_ROWS = 32  # kTile of l1.cu


def test_compiles_for_sm80_and_sm90(tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not installed")
    cmd = [nvcc, "-std=c++17", "-O3", "-c", str(CUDA_DIR / "l1.cu"), "-I", str(CUDA_DIR),
           "-Xptxas", "-v", *[f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS],
           "-o", str(tmp_path / "l1.o")]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "l1.o").stat().st_size > 0
    # ptxas reports each kernel per architecture; the fused kernel must not spill.
    spills = re.findall(r"(\d+) bytes spill stores", done.stderr)
    assert len(spills) == 2 * len(ARCHS) and not any(int(s) for s in spills), done.stderr


SHIM = r"""
#include <cstdio>
#include "l1.cuh"
extern "C" int know_emu_l1(std::uintptr_t rows, int rows_dtype, std::uintptr_t target,
                           std::uintptr_t packed, std::uintptr_t grad, std::uintptr_t loss,
                           std::uintptr_t workspace, std::int64_t workspace_floats,
                           std::int64_t n, int S, int wnn, int normalised, char* err,
                           int err_len) {
  know::cuda::L1Args a;
  a.rows = rows; a.rows_dtype = rows_dtype; a.target = target; a.packed = packed;
  a.grad = grad; a.loss = loss; a.workspace = workspace; a.workspace_floats = workspace_floats;
  a.n = n; a.S = S; a.wnn = wnn != 0; a.normalised = normalised != 0;
  const std::string e = know::cuda::l1_loss(a);
  std::snprintf(err, err_len, "%s", e.c_str());
  return e.empty() ? 0 : 1;
}
extern "C" int know_emu_l1_workspace(std::int64_t n, int S, std::int64_t* floats, char* err,
                                     int err_len) {
  const std::string e = know::cuda::l1_workspace_floats(n, S, 0, floats);
  std::snprintf(err, err_len, "%s", e.c_str());
  return e.empty() ? 0 : 1;
}
"""


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    """The emulated kernel behind the backends' ``run`` signature."""
    so = emulated_library(tmp_path_factory.mktemp("l1_emulated"), "l1.cu", SHIM)
    so.know_emu_l1.argtypes = ([ctypes.c_size_t, ctypes.c_int] + [ctypes.c_size_t] * 5
                               + [ctypes.c_int64, ctypes.c_int64] + [ctypes.c_int] * 3
                               + [ctypes.c_char_p, ctypes.c_int])
    so.know_emu_l1_workspace.argtypes = [ctypes.c_int64, ctypes.c_int,
                                         ctypes.POINTER(ctypes.c_int64), ctypes.c_char_p,
                                         ctypes.c_int]

    def run(rows, target, packed, *, S, norm, loss_space, grad):
        err = ctypes.create_string_buffer(512)
        floats = ctypes.c_int64()
        if so.know_emu_l1_workspace(rows.shape[0], S, ctypes.byref(floats), err, len(err)):
            raise RuntimeError(err.value.decode())
        workspace = torch.full((max(floats.value, 1),), float("nan"))
        loss = torch.full((), float("nan"))
        if so.know_emu_l1(rows.data_ptr(), DTYPE_CODES[rows.dtype], target.data_ptr(),
                          packed.data_ptr(), grad.data_ptr(), loss.data_ptr(),
                          workspace.data_ptr(), floats.value, rows.shape[0], S, norm == "wnn",
                          loss_space == "normalised", err, len(err)):
            raise RuntimeError(err.value.decode())
        return loss
    return run


def _errors(run, n, *, dtype=torch.float32, norm="wnn", loss_space="original", S=5, seed=0):
    head = make_head(S, norm, seed)
    rows, target = rows_and_target(n, dtype, seed + 50, S=S)
    loss, grad = call(run, rows, target, head, loss_space)
    return errors(loss, grad, rows, target, head, loss_space)


@pytest.mark.parametrize("n", [1, TILE_ROWS + 1, 97])
def test_emulated_sizes(emulated, n):
    # The emulated device has 2 SMs: 97 rows are 4 tiles, two per block.
    assert_close(_errors(emulated, n))


def test_emulated_no_rows(emulated):
    head = make_head(5, "wnn", 0)
    rows, target = rows_and_target(0, torch.float32, 0)
    loss, grad = call(emulated, rows, target, head, "original")
    assert float(loss) == 0.0 and not grad.any()


@pytest.mark.parametrize("dtype,norm,loss_space", [
    (torch.float32, "raw", "normalised"), (torch.bfloat16, "wnn", "normalised"),
    (torch.float16, "raw", "original"),
])
def test_emulated_dtypes_norms_spaces(emulated, dtype, norm, loss_space):
    assert_close(_errors(emulated, 45, dtype=dtype, norm=norm, loss_space=loss_space, seed=2))


@pytest.mark.parametrize("S", [2, 8])
def test_emulated_window_sizes(emulated, S):
    assert_close(_errors(emulated, 37, S=S, seed=S))


def test_emulated_zero_residual(emulated):
    errs, share = zero_residual_case(emulated, 2 * 64 + 1, "wnn", "normalised")
    assert_close(errs)
    assert share > 1e-3


def test_emulated_kinks(emulated):
    assert_close(kink_case(emulated))


def test_emulated_rejects_bad_window(emulated):
    rows = torch.zeros(4, 9)
    with pytest.raises(RuntimeError, match="S must be in"):
        emulated(rows, torch.zeros(4), torch.zeros(10), S=9, norm="wnn", loss_space="original",
                 grad=torch.zeros(10))


# --- the built module -------------------------------------------------------------------

def _built():
    try:
        from know_kernels import _cuda
    except ImportError as exc:
        pytest.skip(f"know_kernels._cuda is not built ({exc})")
    if not hasattr(_cuda, "l1_loss"):
        pytest.skip("know_kernels._cuda was built before the L1 kernel existed")
    return _cuda


def _any_build():
    from know_kernels.kernels.ops import nowcast_cuda
    if nowcast_cuda._cuda is None:
        pytest.skip(f"know_kernels._cuda is not built ({nowcast_cuda._IMPORT_ERROR})")
    return nowcast_cuda._cuda


def test_available_adds_the_kernel_check():
    # What the inference backend says about the device, plus whether the build has l1.cu.
    C = _any_build()
    from know_kernels.kernels.ops import l1_cuda, nowcast_cuda
    for device in (torch.device("cpu"), torch.device("cuda", 0)):
        usable, reason = nowcast_cuda.available(device)
        ok, why = l1_cuda.available(device)
        if not usable:
            assert (ok, why) == (usable, reason)
        else:
            assert ok == hasattr(C, "l1_loss") and (ok or "rebuild" in why)


def test_module_rejects_bad_arguments():
    C = _built()
    with pytest.raises(RuntimeError, match="S must be in"):
        C.l1_workspace_floats(10, 9, 0)
    with pytest.raises(RuntimeError, match="dtype"):
        C.l1_loss(1, 7, 1, 1, 1, 1, 1, 100, 10, 5, True, False, 0, 0)


def test_wrapper_asserts_cuda_tensors():
    # What users pass (loss_space ...) is validated by l1_loss (test_l1.py); the wrapper
    # asserts the layout its kernel indexes by, before any launch.
    _any_build()
    from know_kernels.kernels.ops import l1_cuda
    rows = torch.zeros(4, 5)
    packed = torch.zeros(packed_size(5))
    with pytest.raises(AssertionError, match="rows on cpu"):
        l1_cuda.run(rows, torch.zeros(4), packed, S=5, norm="wnn", loss_space="original",
                    grad=torch.zeros_like(packed))
