"""The fused VJP of one nowcast step of both GPU backends (triton, cuda) on CUDA tensors,
reached as the autograd wrapper reaches it (``backends.fused_module(name, "vjp", S)``),
against torch autograd on the float64 reference: odd sizes, every input dtype, both norms,
constant and tied rows, no row gradient, outputs poisoned with NaN before each call,
determinism, the caller's stream, and a million rows.  Skipped on machines without a CUDA
device.  The checks (support/vjp_kernels.py) are those the Triton interpreter
(test_vjp_triton.py) and the CUDA emulator (test_vjp_cuda_build.py) run on the CPU.
"""
import pytest
import torch

from know_kernels.kernels.backends import backend_status, fused_module

from support.vjp_kernels import (HALF_TOL, TOL, assert_close, call, case, check, errors,
                                 kink_case)

BACKENDS = ("triton", "cuda")

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA device (these tests need a GPU)")


@pytest.fixture(params=BACKENDS)
def backend(request):
    ok, why = backend_status(request.param, torch.device("cuda"), op="vjp")
    if not ok:
        pytest.skip(f"backend {request.param} not usable here: {why}")
    return request.param


def _run(backend, S=5):
    return fused_module(backend, "vjp", S).run


def _check(backend, n, *, S=5, tol=TOL, **kw):
    errs = check(_run(backend, S), n, S=S, device="cuda", **kw)
    torch.cuda.synchronize()
    if n == 0:
        assert errs == {"grad_packed max": 0.0}
    else:
        assert_close(errs, tol)


@pytest.mark.parametrize("n", [0, 1, 31, 33, 257, 10007])
def test_sizes(backend, n):
    _check(backend, n, seed=n, constant_every=9)


@pytest.mark.parametrize("dtype,norm,tol", [
    (torch.float32, "raw", TOL), (torch.bfloat16, "wnn", HALF_TOL),
    (torch.float16, "raw", HALF_TOL), (torch.float16, "wnn", HALF_TOL),
])
def test_dtypes_and_norms(backend, dtype, norm, tol):
    _check(backend, 4099, dtype=dtype, norm=norm, seed=1, tied=True, tol=tol)


@pytest.mark.parametrize("norm", ["wnn", "raw"])
def test_ties_and_no_row_gradient(backend, norm):
    _check(backend, 2049, norm=norm, seed=2, constant_every=4, tied=True)
    _check(backend, 2049, norm=norm, seed=2, row_grad=False)


def test_kinks(backend):
    assert_close(kink_case(_run(backend), device="cuda"))


@pytest.mark.parametrize("S", [2, 8])
def test_window_sizes(backend, S):
    _check(backend, 777, S=S, seed=S, constant_every=5)


def test_million_rows(backend):
    _check(backend, (1 << 20) + 3, dtype=torch.bfloat16, seed=6, tol=HALF_TOL)


def test_deterministic(backend):
    head, rows, _, upstream = case(200003, seed=7, constant_every=11, device="cuda")
    first = call(_run(backend), rows, head, upstream, "wnn")
    again = call(_run(backend), rows, head, upstream, "wnn")
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


def test_triton_programs_do_not_change_the_result():
    ok, why = backend_status("triton", torch.device("cuda"), op="vjp")
    if not ok:
        pytest.skip(why)
    run = _run("triton")
    head, rows, _, upstream = case(100003, seed=8, device="cuda")
    outs = [call(run, rows, head, upstream, "wnn", programs=p) for p in (1, 7, 528)]
    for grad_packed, grad_rows in outs[1:]:
        assert torch.equal(grad_packed, outs[0][0]) and torch.equal(grad_rows, outs[0][1])


def test_callers_stream(backend):
    head, rows, constant, upstream = case(50001, seed=8, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        grad_packed, grad_rows = call(_run(backend), rows, head, upstream, "wnn")
    stream.synchronize()
    assert_close(errors(grad_packed, grad_rows, rows, head, upstream, "wnn", constant))


@pytest.mark.parametrize("precision,tol", [("tf32x3", TOL), ("tf32", 1e-2)])
def test_triton_input_precision(precision, tol):
    # tf32 keeps 10 mantissa bits per operand; 1e-2 is a loose sanity bound, not a measured
    # accuracy (the first GPU run will tell).
    ok, why = backend_status("triton", torch.device("cuda"), op="vjp")
    if not ok:
        pytest.skip(why)
    assert_close(check(_run("triton"), 20011, seed=11, device="cuda",
                       run_kw={"input_precision": precision}), tol)
