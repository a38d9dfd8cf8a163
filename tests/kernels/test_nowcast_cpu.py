"""The fused CPU kernel (backend "cpu") against the float64 reference, on every
instruction set this machine can run (the ``isa`` fixture, kernels/conftest.py)."""
import math
import mmap
import sys

import pytest
import torch

from know_kernels import KNOWNHead, nowcast
from know_kernels._ext import _C
from know_kernels.kernels.nowcast import resolve_backend
from know_kernels.kernels.ops import nowcast_cpu
from know_kernels.kernels.reference import nowcast_ref

from support.heads import packed_of, params64
from support.rows import strided, trajectories

AVAILABLE, WHY = nowcast_cpu.available(torch.device("cpu"))
pytestmark = pytest.mark.skipif(not AVAILABLE, reason=f"fused CPU kernel absent: {WHY}")

RUNNABLE = _C.runnable_isas() if AVAILABLE else []
UNRUNNABLE = [i for i in _C.compiled_isas() if i not in RUNNABLE] if AVAILABLE else []
LOW_PRECISION = (torch.bfloat16, torch.float16)
TOL = 1e-5


def adversarial(S, seed):
    g = torch.Generator().manual_seed(seed)
    n = 64
    return torch.cat([
        torch.full((n, S), 0.37),                                   # constant rows
        torch.zeros(n, S),
        1e4 + torch.cumsum(torch.randn(n, S, generator=g), dim=1),  # huge, slowly moving
        1e4 * torch.randn(n, S, generator=g),                       # huge and wild
        1e-6 * torch.randn(n, S, generator=g),                      # tiny
        torch.randn(n, S, generator=g) * 10.0 ** torch.randint(-6, 5, (n, S), generator=g),
        torch.tensor([[math.nan] + [1.0] * (S - 1), [1.0] * (S - 1) + [math.inf],
                      [-math.inf] * S, [3.0] * (S - 1) + [math.nan]]),
    ])


def reference(rows, head, norm, steps, all_steps):
    """float64 reference on exactly the values the kernel sees (rows already rounded)."""
    return nowcast_ref(rows.double(), params64(head), norm, steps=steps, all_steps=all_steps)


def run_cpu(rows, head, *, steps=1, all_steps=False, norm=None, out_dtype=torch.float32,
            threads=None):
    """The kernel through nowcast(), writing into an output poisoned with NaN."""
    shape = (rows.shape[0], steps) if all_steps else (rows.shape[0],)
    out = torch.full(shape, math.nan, dtype=out_dtype)
    got = nowcast(rows, head, steps=steps, all_steps=all_steps, norm=norm, backend="cpu",
                  out=out, threads=threads)
    assert got is out
    return out


def assert_matches(out, ref, tol=TOL):
    assert out.shape == ref.shape
    out = out.double()
    finite = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(out), finite), "finite entries differ from the reference"
    if finite.any():
        err = (out[finite] - ref[finite]).norm() / ref[finite].norm().clamp_min(1e-300)
        assert err <= tol, f"relative error {err:.3e} > {tol:.0e}"


def increment_error(out, ref, rows):
    """Relative error of the predicted change (pred - last value): it isolates the network's
    part of the prediction, which the norm of the whole prediction can hide."""
    last = rows[:, -1].double()
    change = ref - last
    return ((out.double() - last - change).norm() / change.norm()).item()


@pytest.mark.parametrize("norm", ["wnn", "raw"])
@pytest.mark.parametrize("steps", [1, 2, 3, 4])
@pytest.mark.parametrize("all_steps", [False, True])
def test_matches_float64_reference(isa, norm, steps, all_steps):
    head = KNOWNHead(S=5, norm=norm, seed=steps)
    rows = trajectories(517, 5, seed=10 * steps + all_steps)
    out = run_cpu(rows, head, steps=steps, all_steps=all_steps)
    ref = reference(rows, head, norm, steps, all_steps)
    assert_matches(out, ref)
    if not all_steps and steps == 1:
        assert increment_error(out, ref, rows) < 1e-4


def test_row_counts_around_the_tile(isa):
    tile = nowcast_cpu.tile_rows()
    head = KNOWNHead(S=5, norm="wnn", seed=7)
    for n in (0, 1, tile - 1, tile, tile + 1, 3 * tile + 5, 1009):
        rows = trajectories(n, 5, seed=n)
        out = run_cpu(rows, head, steps=2, all_steps=True)
        assert out.shape == (n, 2)
        if n:
            assert_matches(out, reference(rows, head, "wnn", 2, True))


@pytest.mark.parametrize("S", [2, 3, 8, 16])
def test_window_lengths(isa, S):
    head = KNOWNHead(S=S, norm="wnn", seed=S)
    rows = trajectories(203, S, seed=S)
    for norm in ("wnn", "raw"):
        out = run_cpu(rows, head, steps=3, all_steps=True, norm=norm)
        assert_matches(out, reference(rows, head, norm, 3, True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_input_dtypes(isa, dtype):
    head = KNOWNHead(S=5, norm="wnn", seed=11)
    rows = trajectories(301, 5, seed=12).to(dtype)
    for norm in ("wnn", "raw"):
        out = run_cpu(rows, head, steps=2, all_steps=True, norm=norm)
        assert out.dtype == torch.float32
        assert_matches(out, reference(rows, head, norm, 2, True))


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_low_precision_output_is_the_rounded_float32_output(isa, dtype):
    head = KNOWNHead(S=5, norm="wnn", seed=13)
    ramps = torch.linspace(5e4, 6.5e4, 5).repeat(40, 1) * torch.sign(torch.randn(40, 1))
    rows = torch.cat([trajectories(150, 5, seed=14), adversarial(5, seed=15),
                      ramps]).to(dtype)  # ramps: predictions past float16's range
    f32 = run_cpu(rows, head, steps=3, all_steps=True)
    low = run_cpu(rows, head, steps=3, all_steps=True, out_dtype=dtype)
    assert low.dtype == dtype
    torch.testing.assert_close(low, f32.to(dtype), rtol=0, atol=0, equal_nan=True)
    # and the default output dtype is the input's
    assert nowcast(rows, head, steps=3, backend="cpu").dtype == dtype


@pytest.mark.parametrize("norm", ["wnn", "raw"])
def test_adversarial_rows(isa, norm):
    """Constant, huge, tiny and non-finite rows.  Where float32's narrower range makes a
    value overflow that float64 keeps finite (raw rows of magnitude 1e4), the kernel must
    agree with the float32 evaluation of the same reference: same NaN and inf entries."""
    head = KNOWNHead(S=5, norm=norm, seed=16)
    rows = adversarial(5, seed=17)
    out = run_cpu(rows, head, steps=2, all_steps=True)
    ref = reference(rows, head, norm, 2, True)
    ref32 = nowcast_ref(rows, {k: v.detach() for k, v in head.params_dict().items()}, norm,
                        steps=2, all_steps=True)
    assert torch.equal(torch.isnan(out), torch.isnan(ref32))
    assert torch.equal(torch.isposinf(out), torch.isposinf(ref32))
    assert torch.equal(torch.isneginf(out), torch.isneginf(ref32))
    both = torch.isfinite(out) & torch.isfinite(ref)
    assert both.sum() > rows.shape[0]  # most of it is finite: the comparison means something
    assert_matches(out[both], ref[both])
    if norm == "wnn":  # normalised rows never overflow: every finite row stays finite
        assert_matches(out, ref)


def test_non_contiguous_rows(isa):
    head = KNOWNHead(S=5, norm="wnn", seed=18)
    rows = trajectories(157, 5, seed=19)
    view = strided(rows.t()).t()
    assert not view.is_contiguous()
    out = run_cpu(view, head, steps=2, all_steps=True)
    assert_matches(out, reference(rows, head, "wnn", 2, True))
    # a non-contiguous out is filled too
    big = torch.full((157, 4), math.nan)
    nowcast(rows, head, steps=2, all_steps=True, backend="cpu", out=big[:, ::2])
    assert torch.equal(big[:, ::2], out)


def test_threads_give_identical_results(isa):
    head = KNOWNHead(S=5, norm="wnn", seed=20)
    rows = trajectories(40 * nowcast_cpu.tile_rows() + 3, 5, seed=21)
    one = run_cpu(rows, head, steps=2, all_steps=True, threads=1)
    for threads in (2, 3):
        assert torch.equal(run_cpu(rows, head, steps=2, all_steps=True, threads=threads), one)
    assert torch.equal(run_cpu(rows, head, steps=2, all_steps=True), one)  # torch's count


@pytest.mark.slow
def test_a_million_rows():
    head = KNOWNHead(S=5, norm="wnn", seed=24)
    rows = trajectories(1_000_003, 5, seed=25)
    out = run_cpu(rows, head, steps=1, threads=2)
    ref = reference(rows, head, "wnn", 1, False)
    assert_matches(out, ref)
    assert increment_error(out, ref, rows) < 1e-4


def test_rows_beyond_2_to_the_31(isa):
    """64-bit indexing: rows past index 2^31 (elements past 2^32) of a huge, mostly
    untouched virtual mapping, computed through the kernel's row range."""
    S, n = 2, (1 << 31) + 100
    # Python < 3.13 lacks the constant; its value is fixed by the Linux ABI.
    noreserve = getattr(mmap, "MAP_NORESERVE", 0x4000 if sys.platform == "linux" else 0)
    try:
        rows_map = mmap.mmap(-1, n * S * 2, flags=mmap.MAP_PRIVATE | noreserve)
        out_map = mmap.mmap(-1, n * 4, flags=mmap.MAP_PRIVATE | noreserve)
    except (OSError, ValueError) as exc:
        pytest.skip(f"cannot reserve {n * S * 2 / 2**30:.0f} GiB of address space here: {exc}")
    rows = torch.frombuffer(rows_map, dtype=torch.bfloat16).view(n, S)
    out = torch.frombuffer(out_map, dtype=torch.float32)
    begin = n - 77
    sample = trajectories(77, S, seed=26).to(torch.bfloat16)
    rows[begin:] = sample
    out[begin - 10:] = math.nan
    head = KNOWNHead(S=S, norm="wnn", seed=27)
    packed = packed_of(head)
    _C.nowcast(rows.data_ptr(), _C.DTYPE_CODES["bfloat16"], packed.data_ptr(), out.data_ptr(),
               _C.DTYPE_CODES["float32"], n, S, True, 1, False, 2, nowcast_cpu.isa(),
               row_begin=begin, row_end=n)
    assert torch.isnan(out[begin - 10:begin]).all()  # outside the range: untouched
    assert torch.equal(out[begin:], run_cpu(sample, head))


def test_vector_exp_exp2_and_tanh_edges(isa):
    special = torch.tensor([0.0, -0.0, 1.0, -1.0, 88.72, 88.7229, 89.0, 1e30, math.inf,
                            -87.3, -87.5, -100.0, -103.9, -104.0, -1e30, -math.inf, math.nan,
                            1e-30, -1e-30])
    x = torch.cat([special, torch.linspace(-104.0, 89.0, 100_003)])
    got = nowcast_cpu.vec_math("exp", x)
    want = torch.exp(x.double())
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert torch.equal(torch.isinf(got), torch.isinf(want.float()))  # overflow -> +inf
    normal = torch.isfinite(want.float()) & (want >= torch.finfo(torch.float32).tiny)
    assert ((got.double()[normal] - want[normal]).abs() / want[normal]).max() < 2e-7
    sub = (want < torch.finfo(torch.float32).tiny) & ~torch.isnan(want)
    assert ((got.double()[sub] - want[sub]).abs() <= 2.0 ** -149).all()  # within 1 subnormal ulp
    assert got[x == -math.inf].item() == 0.0 and got[x == -104.0].eq(0.0).all()
    assert got[x == 1e30].item() == math.inf and got[x == 88.72].isfinite().all()

    # exp2, the form the kernel evaluates (log2(e) is folded into the weights)
    y = torch.cat([special, torch.linspace(-151.0, 128.0, 100_003), torch.tensor([127.9999])])
    got = nowcast_cpu.vec_math("exp2", y)
    want = torch.exp2(y.double())
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert torch.equal(torch.isinf(got), torch.isinf(want.float()))
    normal = torch.isfinite(want.float()) & (want >= torch.finfo(torch.float32).tiny)
    assert ((got.double()[normal] - want[normal]).abs() / want[normal]).max() < 2e-7
    sub = (want < torch.finfo(torch.float32).tiny) & ~torch.isnan(want)
    assert ((got.double()[sub] - want[sub]).abs() <= 2.0 ** -149).all()

    t = torch.cat([special, torch.linspace(-12.0, 12.0, 100_003)])
    got = nowcast_cpu.vec_math("tanh", t)
    want = torch.tanh(t.double())
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    ok = ~torch.isnan(want) & (want != 0)
    assert ((got.double()[ok] - want[ok]).abs() / want[ok].abs()).max() < 3e-7
    assert torch.equal(torch.signbit(got[t == 0]), torch.signbit(t[t == 0]))  # tanh(-0) = -0
    assert got[t == math.inf].item() == 1.0 and got[t == -math.inf].item() == -1.0


def test_auto_picks_the_fused_kernel_for_cpu_tensors():
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert resolve_backend("auto", torch.device("cpu"), dtype) == "cpu"


def test_bad_isa_in_environment(monkeypatch):
    head = KNOWNHead(S=5, seed=28)
    monkeypatch.setenv(nowcast_cpu.ISA_ENV, "sse9")
    with pytest.raises(ValueError, match="KNOW_KERNELS_ISA='sse9'.*avx512, avx2, portable"):
        nowcast(torch.randn(3, 5), head, backend="cpu")


@pytest.mark.parametrize("which", UNRUNNABLE)
def test_isa_this_cpu_cannot_run(monkeypatch, which):
    monkeypatch.setenv(nowcast_cpu.ISA_ENV, which)
    with pytest.raises(RuntimeError, match=f"KNOW_KERNELS_ISA={which}.*cannot run"):
        nowcast(torch.randn(3, 5), KNOWNHead(S=5, seed=29), backend="cpu")
    with pytest.raises(ValueError, match="not runnable here"):  # the extension refuses too
        _C.vec_math("exp", 0, 0, 0, which)


def test_bad_arguments():
    """What users pass is validated by nowcast (here and in test_nowcast_api.py); below it,
    the backend asserts the layout it indexes by and the extension refuses a call that
    would go out of bounds."""
    head = KNOWNHead(S=5, seed=30)
    rows = torch.randn(8, 5)
    with pytest.raises(ValueError, match="threads"):
        nowcast(rows, head, backend="cpu", threads=0)
    packed = packed_of(head)
    out = torch.empty(8)
    with pytest.raises(AssertionError, match="packed"):
        nowcast_cpu.run(rows, packed[:-1], S=5, norm="wnn", steps=1, out=out, threads=1)
    with pytest.raises(AssertionError, match="out"):
        nowcast_cpu.run(rows, packed, S=5, norm="wnn", steps=2, out=torch.empty(8, 3),
                        threads=1)
    isa = nowcast_cpu.isa()

    def call(**kw):
        args = dict(rows=rows.data_ptr(), rows_dtype=_C.DTYPE_CODES["float32"],
                    packed=packed.data_ptr(), out=out.data_ptr(),
                    out_dtype=_C.DTYPE_CODES["float32"], n=8, S=5, wnn=True, steps=1,
                    all_steps=False, threads=1, isa=isa)
        args.update(kw)
        _C.nowcast(**args)

    call()
    for kw, match in [({"S": 1}, "S < 2"), ({"threads": 0}, "threads < 1"),
                      ({"n": -1}, "n out of range"),
                      ({"rows_dtype": 7}, "unknown dtype code 7"),
                      ({"out_dtype": 8}, "unknown dtype code 8"),
                      ({"row_begin": 5, "row_end": 3}, "row range"),
                      ({"row_end": 9}, "row range"), ({"rows": 0}, "rows or out is a null"),
                      ({"packed": 0}, "packed is a null pointer"),
                      ({"isa": "mmx"}, "isa 'mmx'")]:
        with pytest.raises(ValueError, match=match):
            call(**kw)
    with pytest.raises(ValueError, match="fn must be"):
        _C.vec_math("log", 0, 0, 0, isa)
