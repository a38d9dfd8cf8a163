"""The Triton VJP of one nowcast step against torch autograd on the float64 reference, run
by the Triton interpreter on CPU tensors, plus an ahead-of-time compile for sm_80 / sm_90
(no GPU needed) that catches what the interpreter lets through.

As in test_nowcast_triton.py, the kernel runs happen in a worker process started with
TRITON_INTERPRET=1 set before its imports (the ``interpreter`` fixture); each test sends
its case there and asserts on what comes back.  The checks: support/vjp_kernels.py.
"""
import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")

from know_kernels.kernels.ops import vjp_triton as vt  # noqa: E402
from know_kernels.kernels.packing import packed_offsets  # noqa: E402

from support.heads import packed_of  # noqa: E402
from support.triton_workers import compile_ptx  # noqa: E402
from support.vjp_kernels import (HALF_TOL, assert_close, call, case, check,  # noqa: E402
                                 kink_case)

BM = vt.INTERPRET_BLOCK_M


def _check(n, **kw):
    return check(vt.run, n, **kw)


@pytest.mark.parametrize("n", [1, BM - 1, BM + 1, 97])
def test_sizes(interpreter, n):
    # 97 is prime and spans 4 blocks over 3 programs, so a program takes two groups.
    assert_close(interpreter(_check, n, seed=n))


def test_no_rows(interpreter):
    assert interpreter(_check, 0) == {"grad_packed max": 0.0}


@pytest.mark.parametrize("norm", ["wnn", "raw"])
def test_norms_with_ties(interpreter, norm):
    assert_close(interpreter(_check, BM + 5, norm=norm, seed=2, constant_every=4, tied=True))


@pytest.mark.parametrize("norm", ["wnn", "raw"])
def test_without_row_gradient(interpreter, norm):
    assert_close(interpreter(_check, BM + 3, norm=norm, seed=4, row_grad=False))


@pytest.mark.parametrize("dtype,norm", [(torch.bfloat16, "wnn"), (torch.float16, "raw")])
def test_half_inputs(interpreter, dtype, norm):
    assert_close(interpreter(_check, BM + 1, dtype=dtype, norm=norm, seed=3, tied=True),
                 HALF_TOL)


@pytest.mark.parametrize("S", [2, 17])
def test_window_sizes(interpreter, S):
    # 17 pads the snapshot dimension to 32 instead of 16.
    assert_close(interpreter(_check, BM + 1, S=S, seed=S, constant_every=5))


def _kinks():
    return kink_case(vt.run)


def test_kinks(interpreter):
    assert_close(interpreter(_kinks))


def _programs_and_groups():
    """Bits of both outputs for 1, 2 and 3 programs over 2 groups of 2 and 1 blocks, and
    for the same call twice."""
    vt.GROUPS = 2
    head, rows, _, upstream = case(3 * BM - 2, seed=9, constant_every=7)
    outs = [call(vt.run, rows, head, upstream, "wnn", programs=p) for p in (1, 2, 3, 3)]
    return [(torch.equal(a, outs[0][0]), torch.equal(b, outs[0][1])) for a, b in outs[1:]]


def test_deterministic(interpreter):
    assert interpreter(_programs_and_groups) == [(True, True)] * 3


def test_input_precision_plumbing(interpreter):
    # The interpreter computes every tl.dot in float32 whatever input_precision says, so
    # this checks the plumbing only; TF32 accuracy needs a GPU (test_vjp_gpu.py).
    assert_close(interpreter(_check, BM + 1, seed=5, run_kw={"input_precision": "tf32x3"}))


def test_broken_contract_is_named():
    # What users pass (norm ...) is validated by the public entry point; run asserts its
    # own knobs and the layout its kernel indexes by, before any launch.
    head, rows, _, upstream = case(4)
    packed = packed_of(head)
    grad = torch.empty_like(packed)
    kw = dict(S=5, norm="wnn", grad_packed=grad, grad_rows=None)
    for precision in ("fp8", "bf16"):  # bf16 products are for inference only
        with pytest.raises(AssertionError, match="input_precision"):
            vt.run(rows, packed, upstream, input_precision=precision, **kw)
    with pytest.raises(AssertionError, match="programs"):
        vt.run(rows, packed, upstream, programs=0, **kw)
    with pytest.raises(AssertionError, match="rows"):
        vt.run(rows[:, :4], packed, upstream, **kw)
    with pytest.raises(AssertionError, match="rows"):
        vt.run(rows.double(), packed, upstream, **kw)
    with pytest.raises(AssertionError, match="upstream"):
        vt.run(rows, packed, upstream[:3], **kw)
    with pytest.raises(AssertionError, match="upstream"):
        vt.run(rows, packed, upstream.double(), **kw)
    with pytest.raises(AssertionError, match="packed"):
        vt.run(rows, packed[:-1], upstream, **kw)
    with pytest.raises(AssertionError, match="grad_packed"):
        vt.run(rows, packed, upstream, **{**kw, "grad_packed": grad[:-1]})
    with pytest.raises(AssertionError, match="grad_rows"):
        vt.run(rows, packed, upstream, **{**kw, "grad_rows": torch.empty(4, 4)})
    with pytest.raises(AssertionError, match="grad_rows"):
        vt.run(rows, packed, upstream, **{**kw, "grad_rows": torch.empty(5, 4).t()})


def _compile(cc, precision, rows_dtype, row_grad):
    offsets = packed_offsets(5)
    signature = {"rows_ptr": f"*{rows_dtype}", "packed_ptr": "*fp32", "upstream_ptr": "*fp32",
                 "part_ptr": "*fp32", "grad_rows_ptr": "*fp32", "N": "i32", "wnn": "i32",
                 "blocks_per_group": "i32", "groups": "i32"}
    constexprs = {"S": 5, "KP": 16, "O_D": offsets["d.w1"], "O_WO": offsets["wo"],
                  "PRECISION": precision, "ROW_GRAD": row_grad}
    return compile_ptx(vt.kernel, signature, constexprs, cc, vt.GPU_CONFIG)


@pytest.mark.parametrize("cc,precision,rows_dtype,row_grad", [
    (80, "tf32x3", "bf16", False), (90, "ieee", "fp32", True)])
def test_compiles_for_gpu(compiler, cc, precision, rows_dtype, row_grad):
    ptx, why = compiler(_compile, cc, precision, rows_dtype, row_grad)
    if ptx is None:
        pytest.skip(why)
    assert f".target sm_{cc}" in ptx
    # TF32 modes must reach the tensor cores; "ieee" must not round through them.
    assert ("tf32" in ptx) == (precision != "ieee")
