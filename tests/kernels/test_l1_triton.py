"""The Triton L1 training step against torch autograd on the float64 reference, run by the
Triton interpreter on CPU tensors, plus an ahead-of-time compile for sm_80 / sm_90 (no GPU
needed) that catches what the interpreter lets through.

As in test_nowcast_triton.py, the kernel runs happen in a worker process started with
TRITON_INTERPRET=1 set before its imports (the ``interpreter`` fixture); each test sends
its case there and asserts on what comes back.  The checks: support/l1_kernels.py.
"""
import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")

from know_kernels.kernels.ops import l1_triton as lt  # noqa: E402
from know_kernels.kernels.packing import packed_offsets  # noqa: E402

from support.heads import make_head, packed_of  # noqa: E402
from support.l1_kernels import (TOL, assert_close, call, errors, kink_case,  # noqa: E402
                                zero_residual_case)
from support.rows import rows_and_target  # noqa: E402
from support.triton_workers import compile_ptx  # noqa: E402

BM = lt.INTERPRET_BLOCK_M


def _case(n, *, dtype=torch.float32, norm="wnn", loss_space="original", S=5, seed=0,
          precision="ieee"):
    """Runs in the interpreter worker: the relative errors of the loss and every gradient,
    or for n = 0 whether the call returned 0 and a zero gradient."""
    head = make_head(S, norm, seed)
    # The reference sees exactly the values the kernel read (bf16/fp16 rounding included).
    rows, target = rows_and_target(n, dtype, seed + 100, S=S)
    loss, grad = call(lt.run, rows, target, head, loss_space, input_precision=precision)
    if n == 0:
        return {"loss": float(loss), "grad": float(grad.abs().max())}
    return errors(loss, grad, rows, target, head, loss_space)


@pytest.mark.parametrize("n", [1, BM - 1, BM + 1, 257])
def test_sizes(interpreter, n):
    # 257 is prime and spans 9 blocks over 3 programs, so programs loop over several blocks.
    assert_close(interpreter(_case, n))


def test_no_rows(interpreter):
    assert interpreter(_case, 0) == {"loss": 0.0, "grad": 0.0}


@pytest.mark.parametrize("norm", ["wnn", "raw"])
@pytest.mark.parametrize("loss_space", ["original", "normalised"])
def test_norms_and_loss_spaces(interpreter, norm, loss_space):
    assert_close(interpreter(_case, BM + 5, norm=norm, loss_space=loss_space, seed=2))


@pytest.mark.parametrize("dtype,norm", [(torch.bfloat16, "wnn"), (torch.float16, "raw")])
def test_half_inputs(interpreter, dtype, norm):
    assert_close(interpreter(_case, BM + 1, dtype=dtype, norm=norm, loss_space="normalised",
                             seed=3))


@pytest.mark.parametrize("S", [2, 17])
def test_window_sizes(interpreter, S):
    # 17 pads the snapshot dimension to 32 instead of 16.
    assert_close(interpreter(_case, BM + 1, S=S, seed=S))


def _zero_residual(norm, loss_space):
    return zero_residual_case(lt.run, 4 * 64 + 1, norm, loss_space)


@pytest.mark.parametrize("norm,loss_space", [("wnn", "normalised"), ("raw", "original"),
                                             ("wnn", "original")])
def test_zero_residual(interpreter, norm, loss_space):
    errs, share = interpreter(_zero_residual, norm, loss_space)
    assert_close(errs)
    assert share > 100 * TOL, "the zero rows would not have shown a wrong sign(0)"


def _kinks():
    return kink_case(lt.run)


def test_kinks(interpreter):
    assert_close(interpreter(_kinks))


def test_input_precision_plumbing(interpreter):
    # The interpreter computes every tl.dot in float32 whatever input_precision says, so
    # this checks the plumbing only; TF32 accuracy needs a GPU (test_l1_gpu.py).
    assert_close(interpreter(_case, BM + 1, precision="tf32x3"))


def test_broken_contract_is_named():
    # What users pass (norm, loss_space ...) is validated by l1_loss (test_l1.py); run
    # asserts its own knob and the layout its kernel indexes by, before any launch.
    head = make_head(5, "wnn", 0)
    packed = packed_of(head)
    rows, target = rows_and_target(4, torch.float32, 0)
    grad = torch.empty_like(packed)
    kw = dict(S=5, norm="wnn", loss_space="original", grad=grad)
    for precision in ("fp8", "bf16"):  # bf16 products are for inference only
        with pytest.raises(AssertionError, match="input_precision"):
            lt.run(rows, target, packed, input_precision=precision, **kw)
    with pytest.raises(AssertionError, match="rows"):
        lt.run(rows[:, :4], target, packed, **kw)
    with pytest.raises(AssertionError, match="rows"):
        lt.run(rows.double(), target, packed, **kw)
    with pytest.raises(AssertionError, match="target"):
        lt.run(rows, target[:3], packed, **kw)
    with pytest.raises(AssertionError, match="target"):
        lt.run(rows, target.double(), packed, **kw)
    with pytest.raises(AssertionError, match="packed"):
        lt.run(rows, target, packed[:-1], **kw)
    with pytest.raises(AssertionError, match="grad"):
        lt.run(rows, target, packed, **{**kw, "grad": grad[:-1]})


def _compile(cc, precision, rows_dtype):
    offsets = packed_offsets(5)
    signature = {"rows_ptr": f"*{rows_dtype}", "target_ptr": "*fp32", "packed_ptr": "*fp32",
                 "part_ptr": "*fp32", "N": "i32", "n_bucket": "i32", "wnn": "i32",
                 "normalised": "i32"}
    constexprs = {"S": 5, "KP": 16, "O_D": offsets["d.w1"], "O_WO": offsets["wo"],
                  "PRECISION": precision}
    return compile_ptx(lt.kernel, signature, constexprs, cc, lt.AUTOTUNE_CONFIGS[-1])


@pytest.mark.parametrize("cc,precision,rows_dtype", [(80, "tf32x3", "bf16"), (90, "ieee", "fp32")])
def test_compiles_for_gpu(compiler, cc, precision, rows_dtype):
    ptx, why = compiler(_compile, cc, precision, rows_dtype)
    if ptx is None:
        pytest.skip(why)
    assert f".target sm_{cc}" in ptx
    # TF32 modes must reach the tensor cores; "ieee" must not round through them.
    assert ("tf32" in ptx) == (precision != "ieee")
