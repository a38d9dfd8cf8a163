"""The fused CPU VJP of one nowcast step (ops/vjp_cpu.py, csrc/cpu/vjp_kernel.cpp) and
nowcast under autograd, against torch.autograd on the float64 reference, on every
instruction set this machine can run (the ``isa`` fixture, kernels/conftest.py)."""
import copy
import math

import pytest
import torch

from know_kernels import KNOWNHead, nowcast
from know_kernels._ext import _C
from know_kernels.kernels.ops import nowcast_cpu, vjp_cpu
from know_kernels.kernels.packing import pack, packed_size
from know_kernels.kernels.reference import step_ref

from support.heads import make_head, packed_of, params64, relative_error
from support.rows import strided, windows

AVAILABLE, WHY = vjp_cpu.available(torch.device("cpu"))
pytestmark = pytest.mark.skipif(not AVAILABLE, reason=f"fused VJP kernel absent: {WHY}")
TOL = 1e-5
NORMS = ("wnn", "raw")


def rows_with_ties(n, S, seed, dtype=torch.float32):
    """Weight-like rows; every 5th constant (a frozen parameter: all S values tied for both
    max and min), every 5th + 1 with its maximum repeated, every 5th + 2 with its first
    value repeated as the minimum."""
    rows, _ = windows(n, S, seed)
    rows[::5] = rows[::5, :1].expand(-1, S).clone()
    top = rows[1::5].max(dim=1).values
    rows[1::5, S // 2] = top
    rows[1::5, -1] = top
    rows[2::5, 0] = rows[2::5].min(dim=1).values
    rows[2::5, -2] = rows[2::5, 0]
    return rows.to(dtype)


def kernel(rows, head, upstream, norm, with_rows=True):
    """The backend contract directly, outputs poisoned with NaN first: (d packed carried to
    the head's parameters by pack's autograd, grad_rows, grad_packed)."""
    params = {k: v.detach().clone().requires_grad_() for k, v in head.params_dict().items()}
    packed = pack(params, head.S)
    grad_packed = torch.full((packed_size(head.S),), math.nan)
    grad_rows = torch.full(rows.shape, math.nan) if with_rows else None
    vjp_cpu.run(rows, packed.detach(), upstream, S=head.S, norm=norm, grad_packed=grad_packed,
                grad_rows=grad_rows)
    assert not grad_packed.isnan().any(), "grad_packed entries left unwritten"
    assert grad_rows is None or not grad_rows.isnan().any(), "grad_rows entries left unwritten"
    packed.backward(grad_packed)
    return {k: p.grad for k, p in params.items()}, grad_rows, grad_packed


def reference(rows, head, upstream, norm):
    """float64 autograd of sum(upstream * step_ref) on the values the kernel reads."""
    params = params64(head, requires_grad=True)
    w = rows.double().requires_grad_()
    (upstream.double() * step_ref(w, params, norm)).sum().backward()
    return {k: p.grad for k, p in params.items()}, w.grad


def assert_close(got, want, unsigned, tol=TOL):
    """Relative errors, each against the larger of the reference and the reference for
    |upstream| (``unsigned``).  A head gradient sums rows' terms whose signs come from the
    upstream, and where those cancel no float32 sum is more accurate than the terms' own
    size allows: d.b1's gradient for S = 3 on raw rows is 0.02 from terms that sum to 52
    unsigned.  A row's gradient is its own, no sum over rows, and ``unsigned`` leaves it
    out: it is measured against itself."""
    errors = {}
    for k, ref in want.items():
        size = torch.maximum(ref.norm(), unsigned[k].norm()) if k in unsigned else ref.norm()
        if size > 0:
            errors[k] = ((got[k].double() - ref).norm() / size).item()
    worst = max(errors, key=errors.get)
    assert errors[worst] <= tol, f"{worst}: relative error {errors[worst]:.2e} > {tol:.0e}"


def check(rows, head, norm, seed, tol=TOL):
    upstream = torch.randn(rows.shape[0], generator=torch.Generator().manual_seed(seed))
    grads, grad_rows, _ = kernel(rows, head, upstream, norm)
    want, want_rows = reference(rows, head, upstream, norm)
    unsigned, _ = reference(rows, head, upstream.abs(), norm)
    assert_close({**grads, "rows": grad_rows}, {**want, "rows": want_rows}, unsigned, tol)


@pytest.mark.parametrize("norm", NORMS)
def test_matches_float64_autograd_with_ties(isa, norm):
    head = make_head(5, norm, seed=1)
    check(rows_with_ties(1031, 5, 2), head, norm, 3)


def test_row_counts_around_tiles_and_blocks(isa):
    tile = nowcast_cpu.tile_rows()
    block = tile * 32  # csrc/cpu/vjp_kernel.h: kVjpBlockTiles
    for i, n in enumerate((1, tile - 1, tile + 1, block - 1, block + 1, 10007)):
        norm = NORMS[i % 2]
        check(rows_with_ties(n, 5, n), make_head(5, norm, seed=4), norm, n)


def test_zero_rows_give_a_zero_gradient(isa):
    head = make_head(5, "wnn", seed=5)
    _, grad_rows, grad_packed = kernel(torch.zeros(0, 5), head, torch.zeros(0), "wnn")
    assert grad_rows.shape == (0, 5) and not grad_packed.any()


@pytest.mark.parametrize("S", [2, 3, 9])
def test_window_lengths(isa, S):
    for norm in NORMS:
        check(rows_with_ties(307, S, S), make_head(S, norm, seed=S), norm, S)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_rows(isa, dtype):
    """The reference reads the same rounded values, upcast to float64; coarse values make
    more ties and near-ties, hence the looser bound."""
    for norm in NORMS:
        check(rows_with_ties(409, 5, 6, dtype), make_head(5, norm, seed=6), norm, 7, tol=1e-4)


def test_without_row_gradient(isa):
    """grad_rows=None skips the row gradient; the head's gradient is the same bits."""
    head = make_head(5, "wnn", seed=8)
    rows = rows_with_ties(500, 5, 9)
    upstream = torch.randn(500)
    _, _, with_rows = kernel(rows, head, upstream, "wnn")
    _, none, without = kernel(rows, head, upstream, "wnn", with_rows=False)
    assert none is None and torch.equal(with_rows, without)


def test_threads_give_identical_results(isa):
    head = make_head(5, "wnn", seed=10)
    rows = rows_with_ties(3 * 32 * nowcast_cpu.tile_rows() + 5, 5, 11)
    upstream = torch.randn(rows.shape[0])
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(kernel(rows, head, upstream, "wnn")[1:])
    finally:
        torch.set_num_threads(before)
    for got, want in zip(results[1], results[0]):
        assert torch.equal(got, want)


def public(rows, head, steps, backend, unsigned=False):
    """Gradients of sum(u * nowcast) w.r.t. the head's parameters and the rows (of
    sum(|u| * nowcast) if ``unsigned``)."""
    head.zero_grad(set_to_none=True)
    rows = rows.detach().clone().requires_grad_()
    pred = nowcast(rows, head, steps=steps, backend=backend, all_steps=True)
    u = torch.randn(pred.shape, generator=torch.Generator().manual_seed(steps),
                    dtype=torch.float64).to(pred.dtype)
    (u.abs() * pred if unsigned else u * pred).sum().backward()
    return pred, {**{k: p.grad for k, p in head.params_dict().items()}, "rows": rows.grad}


@pytest.mark.parametrize("steps", [1, 2, 3])
@pytest.mark.parametrize("norm", NORMS)
def test_nowcast_gradients_match_float64(isa, steps, norm):
    head = make_head(5, norm, seed=12)
    rows = rows_with_ties(301, 5, 13)
    pred, got = public(rows, head, steps, "cpu")
    with torch.no_grad():
        assert torch.equal(pred, nowcast(rows, head, steps=steps, backend="cpu", all_steps=True))
    head64 = copy.deepcopy(head).double()
    _, want = public(rows.double(), head64, steps, "reference")
    _, unsigned = public(rows.double(), head64, steps, "reference", unsigned=True)
    del unsigned["rows"]
    assert_close(got, want, unsigned)


def test_nowcast_low_precision_rows_get_their_own_dtype():
    head = make_head(5, "wnn", seed=14)
    rows = rows_with_ties(50, 5, 15, torch.bfloat16).requires_grad_()
    nowcast(rows, head, steps=2, backend="cpu").float().sum().backward()
    assert rows.grad.dtype == torch.bfloat16 and torch.isfinite(rows.grad).all()


def test_nowcast_non_contiguous_rows():
    head = make_head(5, "wnn", seed=16)
    rows = rows_with_ties(157, 5, 17)
    view = strided(rows.t()).t()
    assert not view.is_contiguous()
    want, got = public(rows, head, 2, "cpu"), public(view, head, 2, "cpu")
    assert torch.equal(got[0], want[0])
    for k in want[1]:
        assert torch.equal(got[1][k], want[1][k]), k


class Head:
    """What nowcast reads of a head, with parameters gradcheck can pass in."""

    def __init__(self, S, norm, params):
        self.S, self.norm, self.params = S, norm, params

    def params_dict(self):
        return self.params


@pytest.mark.parametrize("steps", [1, 2, 3])
@pytest.mark.parametrize("norm", NORMS)
def test_reference_path_passes_gradcheck(steps, norm):
    """gradcheck needs float64, which only the reference backend takes: the rows and a few
    parameters of every kind of path (stream x, stream d, the head).  Rows without ties:
    at a tie max and min have no derivative for finite differences to find (the kernel's
    even split is checked against autograd above)."""
    base = params64(make_head(5, norm, seed=18))
    names = ("x.b1", "d.bd", "x.bc", "d.b2", "wo", "bo")
    rows = windows(6, 5, 19)[0].double().requires_grad_()

    def f(rows, *picked):
        head = Head(5, norm, {**base, **dict(zip(names, picked))})
        return nowcast(rows, head, steps=steps, backend="reference", all_steps=True)

    picked = [base[k].clone().requires_grad_() for k in names]
    assert torch.autograd.gradcheck(f, (rows, *picked), fast_mode=True)


def test_nowcast_refuses_inference_arguments_for_rows_that_require_grad():
    head = KNOWNHead(S=5, seed=20)
    rows = torch.randn(4, 5, requires_grad=True)
    for kw in ({"out": torch.empty(4)}, {"threads": 1}, {"precision": "tf32"}):
        with pytest.raises(ValueError, match=f"{next(iter(kw))}= makes nowcast inference-only"):
            nowcast(rows, head, **kw)
    assert not nowcast(rows.detach(), head, threads=1).requires_grad


def test_bad_arguments():
    """The backend asserts the layout it indexes by; the extension refuses a call that
    would go out of bounds."""
    head = KNOWNHead(S=5, seed=21)
    rows, _ = windows(8, 5, 22)
    packed, upstream = packed_of(head), torch.ones(8)
    grad, grad_rows = torch.empty(packed_size(5)), torch.empty(8, 5)

    def call(**kw):
        args = dict(rows=rows.data_ptr(), rows_dtype=_C.DTYPE_CODES["float32"],
                    packed=packed.data_ptr(), upstream=upstream.data_ptr(),
                    grad_packed=grad.data_ptr(), grad_rows=grad_rows.data_ptr(), n=8, S=5,
                    wnn=True, threads=1, isa=nowcast_cpu.isa())
        args.update(kw)
        _C.vjp(**args)

    call()
    call(grad_rows=0)
    for kw, match in [({"S": 1}, "S < 2"), ({"threads": 0}, "threads < 1"),
                      ({"n": -1}, "n out of range"), ({"rows_dtype": 7}, "unknown dtype code 7"),
                      ({"rows": 0}, "rows or upstream is a null pointer"),
                      ({"upstream": 0}, "rows or upstream is a null pointer"),
                      ({"packed": 0}, "packed is a null pointer"),
                      ({"grad_packed": 0}, "grad_packed is a null pointer"),
                      ({"isa": "mmx"}, "isa 'mmx'")]:
        with pytest.raises(ValueError, match=match):
            call(**kw)
    run = dict(S=5, norm="wnn", grad_packed=grad, grad_rows=grad_rows)
    with pytest.raises(AssertionError, match="upstream"):
        vjp_cpu.run(rows, packed, upstream.double(), **run)
    with pytest.raises(AssertionError, match="grad_packed"):
        vjp_cpu.run(rows, packed, upstream, **{**run, "grad_packed": grad[1:]})
    with pytest.raises(AssertionError, match="grad_rows"):
        vjp_cpu.run(rows, packed, upstream, **{**run, "grad_rows": grad_rows[:, :4]})
