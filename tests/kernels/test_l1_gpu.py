"""The fused L1 training step of both GPU backends (triton, cuda) on CUDA tensors, against
torch autograd on the float64 reference: odd sizes, every input dtype, both norms, both
loss spaces, rows with exactly zero residual, the activations' kinks, gradients poisoned
with NaN before each call, the caller's stream, and a million rows.  Skipped on machines
without a CUDA device.  The checks (support/l1_kernels.py) are those the Triton interpreter
(test_l1_triton.py) and the CUDA emulator (test_l1_cuda_build.py) run on the CPU.
"""
import importlib

import pytest
import torch

from support.heads import make_head
from support.l1_kernels import TOL, assert_close, call, errors, kink_case, zero_residual_case
from support.rows import rows_and_target

BACKENDS = ("triton", "cuda")

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA device (these tests need a GPU)")


def _module(name):
    return importlib.import_module(f"know_kernels.kernels.ops.l1_{name}")


@pytest.fixture(params=BACKENDS)
def run(request, monkeypatch):
    module = _module(request.param)
    ok, why = module.available(torch.device("cuda"))
    if not ok:
        pytest.skip(f"backend {request.param} not usable here: {why}")
    if request.param == "triton":
        # One configuration: autotuning would compile four per variant (see test_autotuned).
        monkeypatch.setattr(module, "FIXED_CONFIG", module.AUTOTUNE_CONFIGS[2])
    return module.run


def _check(run, n, *, dtype=torch.float32, norm="wnn", loss_space="original", S=5, seed=0,
           tol=TOL, **kw):
    head = make_head(S, norm, seed)
    rows, target = rows_and_target(n, dtype, seed + 100, S=S, device="cuda")
    loss, grad = call(run, rows, target, head, loss_space, **kw)
    torch.cuda.synchronize()
    if n == 0:
        assert float(loss) == 0.0 and not grad.any()
        return
    assert_close(errors(loss, grad, rows, target, head, loss_space), tol)


@pytest.mark.parametrize("n", [0, 1, 31, 33, 257, 10007])
def test_sizes(run, n):
    _check(run, n)


@pytest.mark.parametrize("dtype,norm,loss_space", [
    (torch.float32, "wnn", "normalised"), (torch.bfloat16, "wnn", "original"),
    (torch.float16, "raw", "normalised"), (torch.float32, "raw", "original"),
])
def test_dtypes_norms_spaces(run, dtype, norm, loss_space):
    _check(run, 4099, dtype=dtype, norm=norm, loss_space=loss_space, seed=1)


@pytest.mark.parametrize("norm,loss_space", [("wnn", "normalised"), ("raw", "original")])
def test_zero_residual(run, norm, loss_space):
    errs, share = zero_residual_case(run, 20 * 64 + 1, norm, loss_space, device="cuda")
    assert_close(errs)
    assert share > 100 * TOL


def test_kinks(run):
    assert_close(kink_case(run, device="cuda"))


def test_million_rows(run):
    _check(run, (1 << 20) + 3, dtype=torch.bfloat16, seed=6)


def test_callers_stream(run):
    head = make_head(5, "wnn", 3)
    rows, target = rows_and_target(50001, torch.float32, 8, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        loss, grad = call(run, rows, target, head, "original")
    stream.synchronize()
    assert_close(errors(loss, grad, rows, target, head, "original"))


@pytest.mark.parametrize("S", [2, 8])
def test_window_sizes(run, S):
    _check(run, 777, S=S, seed=S)


@pytest.mark.parametrize("precision,tol", [("tf32x3", TOL), ("tf32", 1e-2)])
def test_triton_input_precision(monkeypatch, precision, tol):
    # tf32 keeps 10 mantissa bits per operand; 1e-2 is a loose sanity bound, not a measured
    # accuracy (the first GPU run will tell).
    module = _module("triton")
    ok, why = module.available(torch.device("cuda"))
    if not ok:
        pytest.skip(why)
    monkeypatch.setattr(module, "FIXED_CONFIG", module.AUTOTUNE_CONFIGS[2])
    _check(module.run, 20011, seed=11, tol=tol, input_precision=precision)


def test_triton_autotuned():
    # The benchmark's variant (bench/bench_l1_gpu.py), whose compiled kernels it then reuses.
    module = _module("triton")
    ok, why = module.available(torch.device("cuda"))
    if not ok:
        pytest.skip(why)
    _check(module.run, 1 << 16, loss_space="normalised", seed=12)
