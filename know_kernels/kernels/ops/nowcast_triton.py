"""Triton backend of ``nowcast``: one fused kernel, a block of rows per program.

Each program loads ``BLOCK_M`` rows and keeps everything in registers: normalisation,
both streams (six small products on ``tl.dot``), the learned exp, LeakyReLU, the tanh
head, de-normalisation and, for ``steps > 1``, the window slide.  The head's folded
weights (``packing.pack``) are read as zero-padded tiles whose every dimension is at least
16 (what ``tl.dot`` accepts), the 64 hidden units ``HCHUNK`` at a time.  Inputs may be
float32, bfloat16 or float16; all arithmetic is float32.  ``BLOCK_M``, ``HCHUNK``,
``num_warps``, ``num_stages`` and a register cap are autotuned per power of two of N up to
2^22 rows (``autotune_bucket``); larger calls share the 2^22 tuning.

``input_precision`` picks how ``tl.dot`` treats its float32 operands:

* ``"ieee"`` (default): exact float32 products; meets the 1e-5 bound of the test suite.
* ``"tf32x3"``: three TF32 tensor-core products (big*big + big*small + small*big), close
  to float32 accuracy at tensor-core speed.
* ``"tf32"``: one TF32 product, operands truncated to 10 mantissa bits; fastest.  The
  Triton interpreter does not emulate TF32, so its accuracy was estimated by emulating
  the rounding in PyTorch (``bench/bench_nowcast_gpu.py --tf32-estimate``): relative error
  1e-5 to 6e-4 against float64 for untrained heads, 3 steps; tf32x3 stays at 1e-7.  The GPU
  tests hold "tf32" to 3e-3 and "tf32x3" to 1e-5.

The two products that only move values around (the window shift and the differences of
the d stream) always run in ``"ieee"``: they multiply by 0 and 1, which is exact there,
whereas TF32 would round the raw snapshots before subtracting them.

The Triton interpreter (``TRITON_INTERPRET=1``) runs the same kernel on CPU tensors.
Triton reads that variable whenever ``triton.jit`` wraps a function, including the
functions of its own library (``tl.sum``, ``tl.zeros`` ...) when ``triton.language`` is
first imported, and a kernel only runs if it and that library were wrapped the same way.
So the variable must be set before triton is first imported; ``available`` reports a
process where it changed afterwards, and the kernel itself is wrapped lazily, in the mode
of the library.  Its device functions (one stream's forward pass, the normalisation, the
tanh), which ``l1_triton`` shares, are wrapped when this module is imported.
"""
from __future__ import annotations

import functools
import math
import os
from typing import Optional

import torch

from ..packing import packed_size
from ..reference import BOTTLENECK, HIDDEN, LEAKY_SLOPE, OUT_HIDDEN, WNN_EPS, check_norm
from . import require_runnable

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # the module stays importable so `available` can say why
    triton = None
    _IMPORT_ERROR = str(exc)
else:
    _IMPORT_ERROR = ""

PRECISIONS = ("ieee", "tf32x3", "tf32", "bf16")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# The interpreter gets one fixed configuration (autotuning there would only cost time).
INTERPRET_BLOCK_M = 32
INTERPRET_NUM_WARPS = 4
INTERPRET_HCHUNK = 32
MIN_DOT = 16  # smallest tile dimension tl.dot accepts

if triton is not None:
    # The kernel reads its layout constants as constexpr globals (plain globals are
    # refused inside a Triton function).
    _HID = tl.constexpr(HIDDEN)
    _BOT = tl.constexpr(BOTTLENECK)
    _OUT = tl.constexpr(OUT_HIDDEN)
    _PAD = tl.constexpr(MIN_DOT)
    _SLOPE = tl.constexpr(LEAKY_SLOPE)
    _EPS = tl.constexpr(WNN_EPS)


def _device(fn):
    """A Triton device function (called from kernels, inlined there); the kernels of this
    module and of ``l1_triton`` share these."""
    return triton.jit(fn) if triton is not None else fn


@_device
def stream_offsets(base, n):
    """Offsets of b1, g, gb, wb, bb, wc, bc, w2, a2, b2 of the stream whose w1 starts at
    ``base`` (input width ``n``) in the packed vector (layout: ``packing.py``)."""
    b1 = base + n * _HID
    g = b1 + _HID
    gb = g + n * _BOT
    wb = gb + _BOT
    bb = wb + _BOT * _HID
    wc = bb + _HID
    bc = wc + _BOT * _HID
    w2 = bc + _HID
    a2 = w2 + _HID * _OUT
    b2 = a2 + _BOT * _OUT
    return b1, g, gb, wb, bb, wc, bc, w2, a2, b2


@_device
def mm(a, b, acc, PRECISION: tl.constexpr):
    """a @ b (+ acc) on tl.dot in the given precision; "bf16" rounds both operands to
    bfloat16, whose products are exact in the float32 accumulator."""
    if PRECISION == "bf16":
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc)
    else:
        return tl.dot(a, b, acc, input_precision=PRECISION)


@_device
def bottleneck_tiles(packed_ptr, base, n, KP: tl.constexpr):
    """g (KP x 16), gb (1 x 16) and a2 (16 x 32) of one stream, zero past the real rows and
    columns (tiles padded to what tl.dot accepts)."""
    _, g_o, gb_o, _, _, _, _, _, a2_o, _ = stream_offsets(base, n)
    r = tl.arange(0, KP)[:, None]
    rb = tl.arange(0, _PAD)[:, None]
    cb = tl.arange(0, _PAD)[None, :]
    g = tl.load(packed_ptr + g_o + r * _BOT + cb, mask=(r < n) & (cb < _BOT), other=0.0)
    gb = tl.load(packed_ptr + gb_o + cb, mask=cb < _BOT, other=0.0)
    a2 = tl.load(packed_ptr + a2_o + rb * _OUT + tl.arange(0, _OUT)[None, :], mask=rb < _BOT,
                 other=0.0)
    return g, gb, a2


@_device
def hidden_chunk(inp, z, packed_ptr, base, n, c0, KP: tl.constexpr, HCHUNK: tl.constexpr,
                 PRECISION: tl.constexpr):
    """Hidden units c0 .. c0 + HCHUNK of one stream: h, c, e = exp(c h), p = b e, and the
    weight tiles wb, wc, w2 of the chunk (the backward pass multiplies by them again)."""
    b1, _, _, wb_o, bb, wc_o, bc, w2_o, _, _ = stream_offsets(base, n)
    r = tl.arange(0, KP)[:, None]
    rb = tl.arange(0, _PAD)[:, None]
    cc = c0 + tl.arange(0, HCHUNK)[None, :]
    w1 = tl.load(packed_ptr + base + r * _HID + cc, mask=r < n, other=0.0)
    wb = tl.load(packed_ptr + wb_o + rb * _HID + cc, mask=rb < _BOT, other=0.0)
    wc = tl.load(packed_ptr + wc_o + rb * _HID + cc, mask=rb < _BOT, other=0.0)
    w2 = tl.load(packed_ptr + w2_o + (c0 + tl.arange(0, HCHUNK))[:, None] * _OUT
                 + tl.arange(0, _OUT)[None, :])
    h = mm(inp, w1, None, PRECISION) + tl.load(packed_ptr + b1 + cc)
    b = mm(z, wb, None, PRECISION) + tl.load(packed_ptr + bb + cc)
    c = mm(z, wc, None, PRECISION) + tl.load(packed_ptr + bc + cc)
    e = tl.exp(c * h)
    return h, c, e, b * e, wb, wc, w2


@_device
def stream_forward(inp, packed_ptr, base, n, KP: tl.constexpr, HCHUNK: tl.constexpr,
                   PRECISION: tl.constexpr):
    """One stream on a block of rows: z = relu(inp g + gb) and v = z a2 + b2 + p w2, the
    pre-activation of its LeakyReLU (padded columns of z stay exactly 0: relu(0 + 0))."""
    g, gb, a2 = bottleneck_tiles(packed_ptr, base, n, KP)
    b2_o = stream_offsets(base, n)[9]
    z = tl.maximum(mm(inp, g, None, PRECISION) + gb, 0.0)
    v = (mm(z, a2, None, PRECISION)
         + tl.load(packed_ptr + b2_o + tl.arange(0, _OUT))[None, :])
    # The 64 hidden units go HCHUNK at a time through a runtime loop: only one chunk's
    # weights are live (an MMA's B operand is held whole by every warp), and the loop keeps
    # the compiler from hoisting every weight out of the caller's loops into registers.
    for c0 in range(0, _HID, HCHUNK):
        _, _, _, p, _, _, w2 = hidden_chunk(inp, z, packed_ptr, base, n, c0, KP, HCHUNK,
                                            PRECISION)
        v = mm(p, w2, v, PRECISION)
    return z, v


@_device
def wnn_normalise(w, col, valid):
    """The "wnn" normalisation of a block of rows: (x, scale, shift) with x 0 past S."""
    m0 = tl.sum(tl.where(col == 0, w, 0.0), axis=1)
    xs = w - m0[:, None]
    span = (tl.max(tl.where(valid, xs, -float("inf")), axis=1)
            - tl.min(tl.where(valid, xs, float("inf")), axis=1))
    scale = 2.0 * (span + _EPS)
    return tl.where(valid, xs / scale[:, None], 0.0), scale, m0


@_device
def tanh_parts(y):
    """tanh(y) = sign(y) (1 - t) / (1 + t) with t = exp(-2|y|): no overflow for any y, and
    its absolute error (~1e-7) is what matters once x_last is added.  Returns (tanh(y), t)."""
    t = tl.exp(-2.0 * tl.abs(y))
    out = (1.0 - t) / (1.0 + t)
    return tl.where(y < 0.0, -out, out), t


def _nowcast_kernel(rows_ptr, packed_ptr, out_ptr, N, steps, n_bucket,
                    S: tl.constexpr, KP: tl.constexpr, WNN: tl.constexpr,
                    ALL_STEPS: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                    HCHUNK: tl.constexpr):
    # n_bucket only keys the autotuner (autotune_bucket).
    row = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = row < N
    col = tl.arange(0, KP)[None, :]
    valid = col < S
    w = tl.load(rows_ptr + row[:, None] * S + col, mask=row_ok[:, None] & valid,
                other=0.0).to(tl.float32)
    # shift[i, j] = 1 where i == j + 1, so (v @ shift)[:, j] = v[:, j + 1].
    shift = tl.where(tl.arange(0, KP)[:, None] == col + 1, 1.0, 0.0)

    co = tl.arange(0, _OUT)[None, :]
    # Packed layout: stream x's block (n = S), stream d's (n = S - 1), wo (2 x 32), bo.
    SIZE_X: tl.constexpr = (S * _HID + _HID + S * _BOT + _BOT + 2 * (_BOT * _HID + _HID)
                            + _HID * _OUT + _BOT * _OUT + _OUT)
    O_WO: tl.constexpr = 2 * SIZE_X - _HID - _BOT
    bo = tl.load(packed_ptr + O_WO + 2 * _OUT)

    pred = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k in range(steps):
        if WNN:
            x, scale, m0 = wnn_normalise(w, col, valid)
        else:
            x = w
        d = tl.where(col < S - 1, tl.dot(x, shift, input_precision="ieee") - x, 0.0)

        acc = tl.zeros((BLOCK_M,), dtype=tl.float32) + bo
        for si in tl.static_range(2):
            if si == 0:
                inp = x
            else:
                inp = d
            _, v = stream_forward(inp, packed_ptr, si * SIZE_X, S - si, KP, HCHUNK, PRECISION)
            u = tl.where(v >= 0.0, v, _SLOPE * v)
            acc += tl.sum(u * tl.load(packed_ptr + O_WO + si * _OUT + co), axis=1)

        out = tanh_parts(acc)[0]
        last = tl.sum(tl.where(col == S - 1, x, 0.0), axis=1)
        if WNN:
            pred = (last + out) * scale + m0
        else:
            pred = last + out
        if ALL_STEPS:
            tl.store(out_ptr + row * steps + k, pred.to(out_ptr.dtype.element_ty), mask=row_ok)
        # Slide: [w_1 .. w_{S-1}, pred]; columns past S stay 0.
        w = tl.where(col == S - 1, pred[:, None], tl.dot(w, shift, input_precision="ieee"))
    if not ALL_STEPS:
        tl.store(out_ptr + row, pred.to(out_ptr.dtype.element_ty), mask=row_ok)


def interpreting() -> bool:
    """Whether triton was imported in interpreter mode (``TRITON_INTERPRET=1`` then)."""
    if triton is None:
        return False
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(tl.sum, InterpretedFunction)


def _interpret_env() -> bool:
    """TRITON_INTERPRET as Triton reads it now (through ``triton.knobs`` where it exists)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")


def _mode_problem() -> str:
    """Why kernels cannot run in this process's interpreter setting ('' when they can)."""
    env = _interpret_env()
    if env != interpreting():
        return (f"TRITON_INTERPRET is {'set' if env else 'unset'} now but was "
                f"{'set' if interpreting() else 'unset'} when triton was imported; set it "
                f"before triton is first imported")
    return ""


# (BLOCK_M, HCHUNK, num_warps, num_stages, maxnreg), picked with ptxas -v for sm_80 and
# sm_90.  Uncapped (maxnreg None), these use 165-250 registers and at most a few tens of
# bytes of spills in some precisions, which leaves room for 8 to 12 warps per SM; BLOCK_M
# = 256, or 128 with 4 warps, spill hundreds of bytes.  The capped ones trade spills
# (outside the hidden-unit loop) for 12 or 16 warps per SM, to hide more latency.
AUTOTUNE_CONFIGS = (
    (64, 16, 4, 1, None), (64, 32, 4, 1, None), (128, 16, 8, 1, None), (128, 32, 8, 1, None),
    (128, 16, 8, 2, None), (64, 16, 4, 1, 168), (64, 16, 4, 1, 128), (128, 16, 8, 1, 128),
)


def _autotune_configs():
    return [triton.Config({"BLOCK_M": block_m, "HCHUNK": chunk}, num_warps=warps,
                          num_stages=stages, maxnreg=maxnreg)
            for block_m, chunk, warps, stages, maxnreg in AUTOTUNE_CONFIGS]


@functools.lru_cache(maxsize=None)
def _kernel():
    """The kernel, wrapped on first use in the library's mode (see the module docstring)."""
    kernel = triton.jit(_nowcast_kernel)
    if interpreting():
        return kernel
    return triton.autotune(_autotune_configs(),
                           key=["n_bucket", "S", "WNN", "ALL_STEPS", "PRECISION"])(kernel)


def available(device: torch.device) -> tuple[bool, str]:
    if triton is None:
        return False, f"triton is not importable ({_IMPORT_ERROR})"
    problem = _mode_problem()
    if problem:
        return False, problem
    device = torch.device(device)
    if device.type == "cuda" and interpreting():
        return True, f"triton {triton.__version__} interpreter (TRITON_INTERPRET=1)"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False, "no CUDA device visible to torch"
        return True, f"triton {triton.__version__}"
    if device.type == "cpu":
        if interpreting():
            return True, f"triton {triton.__version__} interpreter (TRITON_INTERPRET=1)"
        return False, ("CPU tensors need the Triton interpreter (TRITON_INTERPRET=1 set "
                       "before triton is imported)")
    return False, f"device type {device.type!r} is not supported by the triton backend"


# Beyond 2^22 rows (tens of thousands of programs, hundreds of waves on any card) the best
# configuration no longer depends on N, so larger calls share one tuning instead of
# benchmarking every configuration again on 100M or 1B rows (a minute per precision).
MAX_TUNED_BUCKET = 22


def autotune_bucket(n: int) -> int:
    """The autotuner's key for n rows (l1_triton shares it): log2(n), capped."""
    return min(max(0, int(math.log2(n))), MAX_TUNED_BUCKET)


def _pad_dim(S: int) -> int:
    return max(MIN_DOT, 1 << (S - 1).bit_length())


def check_rows(rows: torch.Tensor, S: int) -> None:
    """rows a contiguous (N, S) tensor of a dtype the kernels read (l1_triton shares it)."""
    if rows.dim() != 2 or rows.shape[1] != S or not rows.is_contiguous():
        raise ValueError(f"rows must be a contiguous (N, {S}) tensor, got "
                         f"{tuple(rows.shape)} (contiguous={rows.is_contiguous()})")
    if rows.dtype not in DTYPES:
        raise TypeError(f"rows dtype must be one of {DTYPES}, got {rows.dtype}")


def run(rows: torch.Tensor, packed: torch.Tensor, *, S: int, norm: str, steps: int,
        out: torch.Tensor, threads: Optional[int] = None,
        input_precision: str = "ieee") -> None:
    """Backend entry point (see ``know_kernels.kernels.nowcast``).  ``threads`` is a CPU-backend
    notion and is ignored; ``input_precision`` is described in the module docstring."""
    del threads
    check_norm(norm)
    if triton is None:
        raise RuntimeError(f"triton is not importable ({_IMPORT_ERROR})")
    if input_precision not in PRECISIONS:
        raise ValueError(f"input_precision must be one of {PRECISIONS}, got {input_precision!r}")
    check_rows(rows, S)
    if (packed.dtype != torch.float32 or packed.numel() != packed_size(S)
            or packed.device != rows.device):
        raise ValueError(f"packed must be the float32 packed head ({packed_size(S)} values) on "
                         f"{rows.device}, got {packed.numel()} {packed.dtype} on {packed.device}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    n = rows.shape[0]
    if (tuple(out.shape) not in ((n,), (n, steps)) or not out.is_contiguous()
            or out.device != rows.device):
        raise ValueError(f"out must be a contiguous ({n},) or ({n}, {steps}) tensor on "
                         f"{rows.device}, got {tuple(out.shape)} on {out.device}")
    if out.dtype not in DTYPES:
        raise TypeError(f"out dtype must be one of {DTYPES}, got {out.dtype}")
    if n == 0:
        return
    require_runnable("triton", available, rows.device)
    all_steps = out.dim() == 2
    kernel = _kernel()
    args = dict(S=S, KP=_pad_dim(S), WNN=norm == "wnn", ALL_STEPS=all_steps,
                PRECISION=input_precision)
    n_bucket = autotune_bucket(n)
    if interpreting():
        kernel[(triton.cdiv(n, INTERPRET_BLOCK_M),)](
            rows, packed, out, n, steps, n_bucket, BLOCK_M=INTERPRET_BLOCK_M,
            HCHUNK=INTERPRET_HCHUNK, num_warps=INTERPRET_NUM_WARPS, **args)
    else:
        with torch.cuda.device(rows.device):
            kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_M"]),)](
                rows, packed, out, n, steps, n_bucket, **args)
