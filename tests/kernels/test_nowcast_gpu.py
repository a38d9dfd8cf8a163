"""Both GPU backends (triton, cuda) on CUDA tensors against the float64 reference: odd
sizes, every input dtype, steps and all_steps, both norms, non-contiguous input, outputs
poisoned with NaN, the fast (TF32) modes within their stated bounds, a caller's stream,
and row indices past 2^31 elements.  Skipped on machines without a CUDA device."""
import pytest
import torch

from know_kernels import KNOWNHead, nowcast, nowcast_ref
from know_kernels.kernels.nowcast import backend_status

from support.heads import packed_of, params64, relative_error
from support.rows import strided, weight_like_rows

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA device (these tests need a GPU)")

BACKENDS = ("triton", "cuda")
TOL = 1e-5
# Bounds for the single-TF32-product modes: TF32 keeps 10 mantissa bits.  Emulating the
# rounding on the CPU gave 1e-4 to 6e-4 for Triton's "tf32" (operands truncated) and
# 3e-5 to 5e-5 for the CUDA kernel's "fast" mode (operands rounded to nearest).
TRITON_TF32_TOL = 3e-3
CUDA_FAST_TOL = 1e-3
# bf16 operands (8-bit mantissa), emulated on the CPU: 2.6e-5 to 1.1e-3 over 3 steps.
TRITON_BF16_TOL = 5e-3


@pytest.fixture(params=BACKENDS)
def backend(request):
    ok, why = backend_status(request.param, "cuda")
    if not ok:
        pytest.skip(f"backend {request.param} not usable here: {why}")
    return request.param


def _rows(n, dtype, seed, S=5):
    return weight_like_rows(n, dtype, seed, S=S, device="cuda")


def _check(backend, n, *, dtype=torch.float32, norm="wnn", steps=1, all_steps=False,
           contiguous=True, seed=0):
    head = KNOWNHead(5, norm, seed=seed).cuda()
    rows = _rows(n, dtype, seed + 100)
    if not contiguous:
        rows = strided(rows)
    out = torch.full((n, steps) if all_steps else (n,), float("nan"), device="cuda")
    nowcast(rows, head, steps=steps, all_steps=all_steps, backend=backend, out=out)
    torch.cuda.synchronize()
    assert not out.isnan().any(), "some outputs were not written"
    ref = nowcast_ref(rows.double(), params64(head), norm, steps=steps, all_steps=all_steps)
    if n:
        assert relative_error(out, ref) <= TOL


@pytest.mark.parametrize("n", [0, 1, 31, 33, 63, 65, 127, 129, 257, 10007])
def test_sizes(backend, n):
    _check(backend, n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("norm", ["wnn", "raw"])
def test_dtypes_and_norms(backend, dtype, norm):
    _check(backend, 4099, dtype=dtype, norm=norm, steps=2, all_steps=True, seed=1)


@pytest.mark.parametrize("steps,all_steps", [(1, True), (2, False), (3, True), (3, False)])
def test_steps(backend, steps, all_steps):
    _check(backend, 1031, steps=steps, all_steps=all_steps, seed=steps)


def test_non_contiguous(backend):
    _check(backend, 2053, norm="raw", steps=3, all_steps=True, contiguous=False, seed=5)


def test_large(backend):
    _check(backend, (1 << 20) + 3, dtype=torch.bfloat16, steps=2, seed=6)


def test_output_in_input_dtype(backend):
    head = KNOWNHead(5, "wnn", seed=2).cuda()
    rows = _rows(3001, torch.bfloat16, 7)
    got = nowcast(rows, head, steps=2, backend=backend)
    assert got.dtype == torch.bfloat16
    ref = nowcast_ref(rows.double(), params64(head), "wnn", steps=2)
    # One round-to-nearest conversion to bfloat16 (8 significant bits): half an ulp.
    assert ((got.double() - ref).abs() / ref.abs()).max().item() <= 2.0 ** -8 * (1 + 1e-3)


def test_callers_stream(backend):
    head = KNOWNHead(5, "wnn", seed=3).cuda()
    rows = _rows(50001, torch.float32, 8)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out = nowcast(rows, head, steps=2, backend=backend)
    stream.synchronize()
    ref = nowcast_ref(rows.double(), params64(head), "wnn", steps=2)
    assert relative_error(out, ref) <= TOL


def test_past_int32_indexing(backend):
    # rows * S > 2^31 elements: offsets must be computed in 64 bits.
    n = (1 << 31) // 5 + 4099
    free, _ = torch.cuda.mem_get_info()
    if free < 16 * (1 << 30):
        pytest.skip("needs about 16 GiB of free GPU memory")
    head = KNOWNHead(5, "wnn", seed=4).cuda()
    rows = torch.empty(n, 5, dtype=torch.bfloat16, device="cuda")
    for start in range(0, n, 1 << 26):
        rows[start:start + (1 << 26)] = _rows(min(1 << 26, n - start), torch.bfloat16, start)
    out = torch.full((n,), float("nan"), device="cuda")
    nowcast(rows, head, backend=backend, out=out)
    tail = slice(n - 8192, n)
    assert not out[tail].isnan().any()
    ref = nowcast_ref(rows[tail].double(), params64(head), "wnn")
    assert relative_error(out[tail], ref) <= TOL
    del rows, out
    torch.cuda.empty_cache()


def _packed_case(n, seed, norm="wnn", steps=2, S=5):
    head = KNOWNHead(S, norm, seed=seed)
    rows = _rows(n, torch.float32, seed + 200, S=S)
    packed = packed_of(head, "cuda")
    ref = nowcast_ref(rows.double(), params64(head), norm, steps=steps, all_steps=True)
    out = torch.full((n, steps), float("nan"), device="cuda")
    return rows, packed, out, ref


@pytest.mark.parametrize("precision,tol", [("ieee", TOL), ("tf32x3", TOL),
                                           ("tf32", TRITON_TF32_TOL), ("bf16", TRITON_BF16_TOL)])
@pytest.mark.parametrize("norm", ["wnn", "raw"])
def test_triton_input_precision(precision, tol, norm):
    ok, why = backend_status("triton", "cuda")
    if not ok:
        pytest.skip(why)
    from know_kernels.kernels.ops import nowcast_triton
    rows, packed, out, ref = _packed_case(20011, 11, norm)
    nowcast_triton.run(rows, packed, S=5, norm=norm, steps=2, out=out, input_precision=precision)
    torch.cuda.synchronize()
    assert not out.isnan().any()
    assert relative_error(out, ref) <= tol


@pytest.mark.parametrize("mode,tol", [("precise", TOL), ("fast", CUDA_FAST_TOL)])
@pytest.mark.parametrize("blocks_per_sm", [1, 2])
@pytest.mark.parametrize("norm", ["wnn", "raw"])
@pytest.mark.parametrize("S", [5, 6])
def test_cuda_modes(mode, tol, blocks_per_sm, norm, S):
    # S = 5 runs the kernel compiled for that window, S = 6 the one that reads S.
    ok, why = backend_status("cuda", "cuda")
    if not ok:
        pytest.skip(why)
    from know_kernels.kernels.ops import nowcast_cuda
    rows, packed, out, ref = _packed_case(20011, 12, norm, S=S)
    nowcast_cuda.run(rows, packed, S=S, norm=norm, steps=2, out=out, mode=mode,
                     blocks_per_sm=blocks_per_sm)
    torch.cuda.synchronize()
    assert not out.isnan().any()
    assert relative_error(out, ref) <= tol


def test_cuda_register_budgets_give_identical_results():
    ok, why = backend_status("cuda", "cuda")
    if not ok:
        pytest.skip(why)
    from know_kernels.kernels.ops import nowcast_cuda
    rows, packed, out, _ = _packed_case(nowcast_cuda.TUNE_MIN_ROWS + 5, 14, "wnn")
    got = {}
    for blocks in (1, 2, None):  # None: timed once, then the faster of the two
        out.fill_(float("nan"))
        nowcast_cuda.run(rows, packed, S=5, norm="wnn", steps=2, out=out, mode="fast",
                         blocks_per_sm=blocks)
        got[blocks] = out.clone()
    assert torch.equal(got[1], got[2]) and torch.equal(got[1], got[None])
    assert (rows.device.index, False, 5) in nowcast_cuda.tuned()


@pytest.mark.parametrize("S", [2, 3, 8])
def test_cuda_window_sizes(S):
    ok, why = backend_status("cuda", "cuda")
    if not ok:
        pytest.skip(why)
    head = KNOWNHead(S, "wnn", seed=S).cuda()
    rows = _rows(777, torch.float32, 13, S=S)
    out = nowcast(rows, head, steps=3, all_steps=True, backend="cuda")
    ref = nowcast_ref(rows.double(), params64(head), "wnn", steps=3, all_steps=True)
    assert relative_error(out, ref) <= TOL
