"""precision="bf16" on the cpu backend: the VDPBF16PS kernel against the float64 reference
fed the same bfloat16-rounded operands (reference_bf16.py), and its refusal where a
processor has no bfloat16 products.  The kernel tests skip, saying why, on a processor
without AVX512_BF16; the refusal and dispatch tests run everywhere."""
import math

import pytest
import torch

from know_kernels import KNOWNHead, Options, nowcast
from know_kernels.kernels.ops import nowcast_cpu
from know_kernels.kernels.reference import nowcast_ref
from know_kernels.kernels.reference_bf16 import nowcast_ref_bf16, round_bf16

from support.heads import make_head, params64, relative_error
from support.rows import strided, trajectories, weight_like_rows

FUSED, WHY_NOT_FUSED = nowcast_cpu.available(torch.device("cpu"))
KERNEL, WHY = nowcast_cpu.bf16_kernel() if FUSED else (None, WHY_NOT_FUSED)
needs_bf16 = pytest.mark.skipif(KERNEL is None, reason=f"no bf16 kernel here: {WHY}")

# Relative L2 error against nowcast_ref_bf16.  Measured (2026-12-07, AMD EPYC Zen 4): at
# most 1.03e-5 over 108 cases (6 heads with and without random biases, 3 kinds of rows,
# 3001 rows, both norms, float32/bfloat16/float16 rows, 3 steps), and below 1e-7 at
# steps = 1.  What is left is float32 arithmetic and, from the second step on, the row now
# and then whose float32 prediction, rounded to bfloat16 as the next input, lands one
# unit away from the reference's (about 1e-4 on that row): hence the margin.
TOL = 1e-4
# Against the exact float64 reference, what bfloat16 products cost: at most 6.7e-3 over
# the same cases (the GPU's emulated bf16 mode: 1.1e-3 on unbiased heads).
TOL_EXACT = 1e-2


def run_bf16(rows, head, *, steps=1, all_steps=False, norm=None, out_dtype=torch.float32,
             threads=None):
    """The bf16 kernel through nowcast(), writing into an output poisoned with NaN."""
    shape = (rows.shape[0], steps) if all_steps else (rows.shape[0],)
    out = torch.full(shape, math.nan, dtype=out_dtype)
    got = nowcast(rows, head, steps=steps, all_steps=all_steps, norm=norm, backend="cpu",
                  out=out, threads=threads, precision="bf16")
    assert got is out
    return out


def check(rows, head, norm, steps, all_steps, tol=TOL):
    out = run_bf16(rows, head, steps=steps, all_steps=all_steps, norm=norm)
    assert not out.isnan().any(), "some outputs were not written"
    if rows.shape[0]:
        ref = nowcast_ref_bf16(rows, params64(head), norm, steps=steps, all_steps=all_steps)
        assert relative_error(out, ref) <= tol
        exact = nowcast_ref(rows.double(), params64(head), norm, steps=steps,
                            all_steps=all_steps)
        assert relative_error(out, exact) <= TOL_EXACT
    return out


@needs_bf16
def test_sizes_around_the_tile():
    tile = nowcast_cpu.tile_rows(KERNEL)
    head = make_head(5, "wnn", 1)
    for n in (0, 1, tile - 1, tile, tile + 1, 3 * tile + 5, 10007):
        out = check(trajectories(n, 5, seed=n), head, "wnn", 2, True)
        assert out.shape == (n, 2)


@needs_bf16
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("norm", ["wnn", "raw"])
@pytest.mark.parametrize("steps", [1, 2, 3])
def test_dtypes_norms_and_steps(dtype, norm, steps):
    head = make_head(5, norm, steps)
    rows = weight_like_rows(1031, dtype, seed=10 * steps)
    check(rows, head, norm, steps, all_steps=True)
    check(rows, head, norm, steps, all_steps=False)


@needs_bf16
@pytest.mark.parametrize("S", [2, 3, 8])
def test_window_lengths(S):
    # odd and even input widths: an odd one is padded with a zero input
    head = KNOWNHead(S, "wnn", seed=S)
    check(trajectories(301, S, seed=S), head, "wnn", 3, True)


@needs_bf16
def test_non_contiguous_rows():
    head = make_head(5, "raw", 4)
    rows = weight_like_rows(2053, torch.float32, seed=5)
    view = strided(rows.t()).t()
    assert not view.is_contiguous()
    out = check(view, head, "raw", 3, True)
    assert torch.equal(out, run_bf16(rows, head, steps=3, all_steps=True, norm="raw"))


@needs_bf16
def test_the_products_really_are_bf16():
    """Closer to the reference of the bf16 rounding than float32 can be to it, and as far
    from the exact reference as bfloat16 operands put it: not the float32 kernel."""
    head = make_head(5, "raw", 6)
    rows = torch.randn(4099, 5, generator=torch.Generator().manual_seed(6))
    out = run_bf16(rows, head, steps=1)
    f32 = nowcast(rows, head, backend="cpu", precision="float32")
    ref = nowcast_ref_bf16(rows, params64(head), "raw")
    exact = nowcast_ref(rows.double(), params64(head), "raw")
    assert relative_error(out, ref) < 1e-6
    assert relative_error(f32, ref) > 1e-4 and relative_error(out, exact) > 1e-4
    assert relative_error(f32, exact) < 1e-6


@needs_bf16
def test_low_precision_output_and_threads():
    head = make_head(5, "wnn", 7)
    rows = weight_like_rows(40 * nowcast_cpu.tile_rows(KERNEL) + 3, torch.bfloat16, seed=7)
    f32 = run_bf16(rows, head, steps=2, all_steps=True, threads=1)
    low = run_bf16(rows, head, steps=2, all_steps=True, out_dtype=torch.bfloat16, threads=1)
    assert torch.equal(low, f32.to(torch.bfloat16))
    for threads in (2, 3):
        assert torch.equal(run_bf16(rows, head, steps=2, all_steps=True, threads=threads), f32)


@needs_bf16
def test_non_finite_rows_stay_non_finite():
    head = make_head(5, "wnn", 8)
    rows = trajectories(96, 5, seed=8)
    rows[3, 2] = math.nan
    rows[50, 0] = math.inf
    out = run_bf16(rows, head, steps=2, all_steps=True)
    bad = torch.zeros(96, dtype=torch.bool)
    bad[[3, 50]] = True
    assert out[bad].isnan().all() and torch.isfinite(out[~bad]).all()


def test_round_bf16_is_nearest_even():
    x = torch.tensor([1.0, 1.0 + 2.0 ** -8, 1.0 + 3 * 2.0 ** -8, 1.0 + 2.0 ** -7 + 2.0 ** -20],
                     dtype=torch.float64)
    want = torch.tensor([1.0, 1.0, 1.0 + 2.0 ** -6, 1.0 + 2.0 ** -7], dtype=torch.float64)
    assert torch.equal(round_bf16(x), want)


NONE = {"avx512f": True, "avx512_bf16": False, "amx_bf16": False}


def test_dispatch_names_what_is_missing_or_used():
    choose = nowcast_cpu.choose_bf16
    assert choose(NONE, ["avx512_bf16"], [], "avx512") == (
        None, "this processor lacks avx512_bf16 (VDPBF16PS); no amx_bf16 (TDPBF16PS) here")
    kernel, why = choose({**NONE, "avx512_bf16": True}, ["avx512_bf16"], ["avx512_bf16"],
                         "avx512")
    assert kernel == "avx512_bf16" and why.startswith("VDPBF16PS (avx512_bf16)")
    # An AMX processor (all of them have AVX512_BF16 too) runs VDPBF16PS: no AMX kernel.
    amx = {**NONE, "avx512_bf16": True, "amx_bf16": True, "amx_granted": True}
    kernel, why = choose(amx, ["avx512_bf16"], ["avx512_bf16"], "avx512")
    assert kernel == "avx512_bf16"
    assert "the OS granted its tile data, but this build has no AMX kernel" in why
    kernel, why = choose({**amx, "amx_granted": False}, ["avx512_bf16"], ["avx512_bf16"],
                         "avx512")
    assert "did not grant its tile data" in why
    assert choose({**amx, "avx512_bf16": False}, ["avx512_bf16"], [], "avx512")[0] is None
    assert "no bf16 kernel" in choose(NONE, [], [], "avx512")[1]
    assert "KNOW_KERNELS_ISA=avx2 excludes" in choose(amx, ["avx512_bf16"], ["avx512_bf16"],
                                                      "avx2")[1]


@pytest.mark.skipif(not FUSED, reason=f"fused CPU kernel absent: {WHY_NOT_FUSED}")
def test_refused_where_the_processor_has_no_bf16_products(monkeypatch):
    head = KNOWNHead(5, seed=9)
    rows = torch.randn(7, 5)
    features = {k: v for k, v in nowcast_cpu._ext._C.cpu_features().items()}
    lacking = {**features, "avx512_bf16": False, "amx_bf16": False}
    real = nowcast_cpu.choose_bf16
    monkeypatch.setattr(nowcast_cpu, "choose_bf16",
                        lambda f, compiled, runnable, isa: real(lacking, compiled, [], isa))
    match = "precision='bf16' needs bfloat16 matrix products.*lacks avx512_bf16"
    with pytest.raises(RuntimeError, match=match):
        nowcast(rows, head, backend="cpu", precision="bf16")
    with pytest.raises(RuntimeError, match=match):  # predict refuses before it reads a file
        Options(precision="bf16")
    Options(precision="bf16", backend="reference")  # the reference computes in float32
    assert nowcast(rows, head, backend="cpu", precision="float32").shape == (7,)


@pytest.mark.skipif(not FUSED, reason=f"fused CPU kernel absent: {WHY_NOT_FUSED}")
@pytest.mark.parametrize("which", ["avx2", "portable"])
def test_refused_under_a_forced_non_avx512_isa(monkeypatch, which):
    if which not in nowcast_cpu._ext._C.runnable_isas():
        pytest.skip(f"{which} is not runnable here")
    monkeypatch.setenv(nowcast_cpu.ISA_ENV, which)
    with pytest.raises(RuntimeError, match=f"{nowcast_cpu.ISA_ENV}={which} excludes"):
        nowcast(torch.randn(3, 5), KNOWNHead(5, seed=10), backend="cpu", precision="bf16")


@pytest.mark.skipif(not FUSED, reason=f"fused CPU kernel absent: {WHY_NOT_FUSED}")
def test_extension_refuses_a_bf16_kernel_this_processor_cannot_run():
    C = nowcast_cpu._ext._C
    assert set(C.runnable_bf16_kernels()) <= set(C.compiled_bf16_kernels())
    assert not set(C.compiled_bf16_kernels()) & set(C.compiled_isas())
    for name in set(C.compiled_bf16_kernels()) - set(C.runnable_bf16_kernels()):
        with pytest.raises(ValueError, match="not runnable here"):
            C.nowcast_tile_rows(name)
