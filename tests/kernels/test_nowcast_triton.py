"""The Triton kernel against the float64 reference, run by the Triton interpreter on CPU
tensors, plus an ahead-of-time compile for sm_80 / sm_90 (no GPU needed) that catches
what the interpreter lets through (tile shapes, constexpr use, GPU lowering).

Triton fixes interpreter mode when it is first imported, so the kernel runs happen in
worker processes (the ``interpreter`` and ``compiler`` fixtures, support/triton_workers.py);
each test sends its case there and asserts on what comes back.
"""
import re

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")

from know_kernels import KNOWNHead, nowcast, nowcast_ref  # noqa: E402
from know_kernels.kernels.ops import nowcast_triton as nt  # noqa: E402

from support.heads import packed_of, params64, relative_error  # noqa: E402
from support.rows import strided, weight_like_rows  # noqa: E402
from support.triton_workers import compile_ptx  # noqa: E402

BM = nt.INTERPRET_BLOCK_M
TOL = 1e-5


def _case(n, dtype, norm, steps, all_steps, contiguous=True, seed=0, precision=None, S=5):
    """Runs in the interpreter worker: relative error vs float64, and whether every output
    element was written (outputs start as NaN)."""
    head = KNOWNHead(S, norm, seed=seed)
    rows = weight_like_rows(n, dtype, seed + 100, S=S)
    if not contiguous:
        rows = strided(rows)
    assert rows.is_contiguous() == contiguous
    shape = (n, steps) if all_steps else (n,)
    out = torch.full(shape, float("nan"), dtype=torch.float32)
    if precision is None:
        nowcast(rows, head, steps=steps, all_steps=all_steps, backend="triton", out=out)
    else:
        packed = packed_of(head)
        nt.run(rows.contiguous(), packed, S=S, norm=norm, steps=steps, out=out,
               input_precision=precision)
    # The reference sees exactly the values the kernel read (bf16/fp16 rounding included).
    ref = nowcast_ref(rows.double(), params64(head), norm, steps=steps, all_steps=all_steps)
    err = relative_error(out, ref) if n else 0.0
    return err, bool(torch.isfinite(out).all())


def _check(run, *args, **kw):
    err, written = run(_case, *args, **kw)
    assert written, "some outputs were not written"
    assert err <= TOL, f"relative error {err:.3g} > {TOL}"


@pytest.mark.parametrize("n", [0, 1, BM - 1, BM + 1, 257])
def test_sizes(interpreter, n):
    _check(interpreter, n, torch.float32, "wnn", 1, False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("norm", ["wnn", "raw"])
def test_half_inputs(interpreter, dtype, norm):
    _check(interpreter, BM + 1, dtype, norm, 2, True, seed=3)


@pytest.mark.parametrize("steps,all_steps", [(1, True), (2, False), (3, True), (3, False)])
@pytest.mark.parametrize("norm", ["wnn", "raw"])
def test_steps(interpreter, steps, all_steps, norm):
    _check(interpreter, BM - 1, torch.float32, norm, steps, all_steps, seed=steps)


def test_non_contiguous_prime(interpreter):
    _check(interpreter, 257, torch.float32, "raw", 3, True, contiguous=False, seed=7)


@pytest.mark.parametrize("S", [2, 8, 17])
def test_window_sizes(interpreter, S):
    # 17 pads the snapshot dimension to 32 instead of 16.
    _check(interpreter, BM + 1, torch.float32, "wnn", 2, True, seed=S, S=S)


# Not "bf16": the interpreter's tl.dot on bfloat16 operands returns garbage (errors of 1e10
# on a 16 x 16 product of randn), so that mode is checked by compiling it (below), by the
# PyTorch emulation of its rounding (bench/bench_nowcast_gpu.py --tf32-estimate) and on a GPU.
@pytest.mark.parametrize("precision", [p for p in nt.PRECISIONS if p != "bf16"])
def test_input_precision_modes_run(interpreter, precision):
    # The interpreter computes every tl.dot in float32 whatever input_precision says, so
    # this checks the plumbing only; TF32 accuracy needs a GPU (test_nowcast_gpu.py).
    _check(interpreter, BM + 1, torch.float32, "wnn", 2, True, precision=precision)


def _bf16_output_error():
    head = KNOWNHead(5, "wnn", seed=2)
    rows = weight_like_rows(BM + 1, torch.bfloat16, 5)
    got = nowcast(rows, head, steps=2, backend="triton")
    assert got.dtype == torch.bfloat16
    ref = nowcast_ref(rows.double(), params64(head), "wnn", steps=2)
    return ((got.double() - ref).abs() / ref.abs()).max().item()


def test_output_in_input_dtype(interpreter):
    # One conversion of the float32 result to bfloat16 (8 significant bits).  The Triton
    # 3.9 interpreter truncates there, so allow one unit in the last place (2^-7); a GPU
    # rounds to nearest, and test_nowcast_gpu.py holds it to half of that.
    err = interpreter(_bf16_output_error)
    assert err <= 2.0 ** -7 * (1 + 1e-3), f"relative error {err:.3g}"


def _availability():
    return {dev: nt.available(torch.device(dev)) for dev in ("cpu", "cuda")}


def test_available(interpreter, compiler):
    inside = interpreter(_availability)
    assert inside["cpu"][0], inside["cpu"][1]
    outside = compiler(_availability)
    assert not outside["cpu"][0] and "TRITON_INTERPRET" in outside["cpu"][1]
    if not torch.cuda.is_available():
        assert not outside["cuda"][0] and "CUDA" in outside["cuda"][1]


def _run_refusal() -> str:
    head = KNOWNHead(5, "wnn", seed=0)
    out = torch.full((3,), float("nan"))
    try:
        nowcast(torch.randn(3, 5), head, backend="triton", out=out)
    except RuntimeError as exc:
        assert out.isnan().all(), "a refused call wrote its output"
        return str(exc)
    return "ran"


def test_run_refuses_with_the_reason(compiler):
    why = compiler(_run_refusal)
    assert why.startswith("backend 'triton' is not usable on cpu:") and "TRITON_INTERPRET" in why


def test_interpret_flag_changed_after_import(monkeypatch):
    flip = "0" if nt.interpreting() else "1"
    monkeypatch.setenv("TRITON_INTERPRET", flip)
    ok, why = nt.available(torch.device("cpu"))
    assert not ok and "before triton is first imported" in why


def test_broken_contract_is_named():
    # What users pass is validated by nowcast (test_nowcast_api.py); run asserts its own
    # knob and the layout its kernel indexes by, before any launch.
    head = KNOWNHead(5, "wnn", seed=0)
    packed = packed_of(head)
    rows = torch.randn(4, 5)
    out = torch.empty(4)
    with pytest.raises(AssertionError, match="input_precision"):
        nt.run(rows, packed, S=5, norm="wnn", steps=1, out=out, input_precision="fp8")
    with pytest.raises(AssertionError, match="packed"):
        nt.run(rows, packed[:-1], S=5, norm="wnn", steps=1, out=out)
    with pytest.raises(AssertionError, match="out"):
        nt.run(rows, packed, S=5, norm="wnn", steps=2, out=torch.empty(4, 3))
    with pytest.raises(AssertionError, match="rows"):
        nt.run(rows.double(), packed, S=5, norm="wnn", steps=1, out=out)


def _compile(cc, precision, rows_dtype, all_steps, config=nt.AUTOTUNE_CONFIGS[4]):
    signature = {"rows_ptr": f"*{rows_dtype}", "packed_ptr": "*fp32", "out_ptr": "*fp32",
                 "N": "i64", "steps": "i32", "n_bucket": "i32"}
    constexprs = {"S": 5, "KP": 16, "WNN": True, "ALL_STEPS": all_steps,
                  "PRECISION": precision}
    return compile_ptx(nt.kernel, signature, constexprs, cc, config)


@pytest.mark.parametrize("cc,precision,rows_dtype,all_steps", [
    (80, "tf32x3", "bf16", True),
    (90, "ieee", "fp32", False),
    (90, "tf32", "fp16", True),
    (80, "bf16", "bf16", False),
    (90, "bf16", "fp32", True),
])
def test_compiles_for_gpu(compiler, cc, precision, rows_dtype, all_steps):
    ptx, why = compiler(_compile, cc, precision, rows_dtype, all_steps)
    if ptx is None:
        pytest.skip(why)
    assert f".target sm_{cc}" in ptx
    # TF32 modes must reach the tensor cores; "ieee" must not round through them.
    assert ("tf32" in ptx) == (precision in ("tf32", "tf32x3"))
    if precision == "bf16":
        assert re.search(r"mma\S*\.bf16", ptx), "bf16 products are not on the tensor cores"


@pytest.mark.parametrize("config", nt.AUTOTUNE_CONFIGS, ids=str)
def test_every_autotune_config_compiles_for_sm90(compiler, config):
    ptx, why = compiler(_compile, 90, "tf32", "bf16", False, config)
    if ptx is None:
        pytest.skip(why)
    assert "wgmma" in ptx
    # A register cap must reach ptxas, or the config is a copy of an uncapped one.
    maxnreg = config[4]
    assert (re.search(r"\.maxnreg\s+(\d+)", ptx) or [None, None])[1] == (
        None if maxnreg is None else str(maxnreg))


def test_large_calls_share_one_autotuning():
    # Powers of two up to 2^22 rows are tuned apart; beyond, one tuning serves all sizes.
    assert [nt.autotune_bucket(n) for n in (1, 2, 3, 1023, 1024)] == [0, 1, 1, 9, 10]
    assert nt.autotune_bucket(2 ** 22 - 1) == 21
    assert {nt.autotune_bucket(n) for n in (2 ** 22, 11_200_000, 10 ** 9)} == {22}
