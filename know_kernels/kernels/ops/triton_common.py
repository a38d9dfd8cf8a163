"""What the Triton kernels of ``nowcast`` and ``vjp`` share: the import of triton, the
layout constants, the device functions of one stream's forward pass, the normalisation and
the tanh, the backends' ``available``, and the tiles' sizes.

The Triton interpreter (``TRITON_INTERPRET=1``) runs the kernels on CPU tensors.  Triton
reads that variable whenever ``triton.jit`` wraps a function, including the functions of
its own library (``tl.sum``, ``tl.zeros`` ...) when ``triton.language`` is first imported,
and a kernel only runs if it and that library were wrapped the same way.  So the variable
must be set before triton is first imported; ``available`` reports a process where it
changed afterwards, and each kernel is wrapped lazily, in the mode of the library.  The
device functions here are wrapped when this module is imported.
"""
from __future__ import annotations

import math
import os

import torch

from ..reference import BOTTLENECK, HIDDEN, LEAKY_SLOPE, OUT_HIDDEN, WNN_EPS

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # the modules stay importable so `available` can say why
    triton = tl = None
    IMPORT_ERROR = str(exc)
else:
    IMPORT_ERROR = ""

# The precisions ``mm`` takes: tl.dot's input_precision values, and "bf16" (both operands
# rounded to bfloat16).
DOT_PRECISIONS = ("ieee", "tf32x3", "tf32", "bf16")
MIN_DOT = 16  # smallest tile dimension tl.dot accepts

# The kernels read the layout constants as constexpr globals (plain globals are refused
# inside a Triton function).
_constexpr = tl.constexpr if tl is not None else (lambda value: value)
HID = _constexpr(HIDDEN)
BOT = _constexpr(BOTTLENECK)
OUT = _constexpr(OUT_HIDDEN)
PAD = _constexpr(MIN_DOT)
SLOPE = _constexpr(LEAKY_SLOPE)
EPS = _constexpr(WNN_EPS)


def device_function(fn):
    """A Triton device function (called from kernels, inlined there)."""
    return triton.jit(fn) if triton is not None else fn


@device_function
def stream_offsets(base, n):
    """Offsets of b1, g, gb, wb, bb, wc, bc, w2, a2, b2 of the stream whose w1 starts at
    ``base`` (input width ``n``) in the packed vector (layout: ``packing.py``)."""
    b1 = base + n * HID
    g = b1 + HID
    gb = g + n * BOT
    wb = gb + BOT
    bb = wb + BOT * HID
    wc = bb + HID
    bc = wc + BOT * HID
    w2 = bc + HID
    a2 = w2 + HID * OUT
    b2 = a2 + BOT * OUT
    return b1, g, gb, wb, bb, wc, bc, w2, a2, b2


@device_function
def mm(a, b, acc, PRECISION: tl.constexpr):
    """a @ b (+ acc) on tl.dot in the given precision; "bf16" rounds both operands to
    bfloat16, whose products are exact in the float32 accumulator."""
    if PRECISION == "bf16":
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc)
    else:
        return tl.dot(a, b, acc, input_precision=PRECISION)


@device_function
def bottleneck_tiles(packed_ptr, base, n, KP: tl.constexpr):
    """g (KP x 16), gb (1 x 16) and a2 (16 x 32) of one stream, zero past the real rows and
    columns (tiles padded to what tl.dot accepts)."""
    _, g_o, gb_o, _, _, _, _, _, a2_o, _ = stream_offsets(base, n)
    r = tl.arange(0, KP)[:, None]
    rb = tl.arange(0, PAD)[:, None]
    cb = tl.arange(0, PAD)[None, :]
    g = tl.load(packed_ptr + g_o + r * BOT + cb, mask=(r < n) & (cb < BOT), other=0.0)
    gb = tl.load(packed_ptr + gb_o + cb, mask=cb < BOT, other=0.0)
    a2 = tl.load(packed_ptr + a2_o + rb * OUT + tl.arange(0, OUT)[None, :], mask=rb < BOT,
                 other=0.0)
    return g, gb, a2


@device_function
def hidden_chunk(inp, z, packed_ptr, base, n, c0, KP: tl.constexpr, HCHUNK: tl.constexpr,
                 PRECISION: tl.constexpr):
    """Hidden units c0 .. c0 + HCHUNK of one stream: h, c, e = exp(c h), p = b e, and the
    weight tiles w1, wb, wc, w2 of the chunk (the backward pass multiplies by them again)."""
    b1, _, _, wb_o, bb, wc_o, bc, w2_o, _, _ = stream_offsets(base, n)
    r = tl.arange(0, KP)[:, None]
    rb = tl.arange(0, PAD)[:, None]
    cc = c0 + tl.arange(0, HCHUNK)[None, :]
    w1 = tl.load(packed_ptr + base + r * HID + cc, mask=r < n, other=0.0)
    wb = tl.load(packed_ptr + wb_o + rb * HID + cc, mask=rb < BOT, other=0.0)
    wc = tl.load(packed_ptr + wc_o + rb * HID + cc, mask=rb < BOT, other=0.0)
    w2 = tl.load(packed_ptr + w2_o + (c0 + tl.arange(0, HCHUNK))[:, None] * OUT
                 + tl.arange(0, OUT)[None, :])
    h = mm(inp, w1, None, PRECISION) + tl.load(packed_ptr + b1 + cc)
    b = mm(z, wb, None, PRECISION) + tl.load(packed_ptr + bb + cc)
    c = mm(z, wc, None, PRECISION) + tl.load(packed_ptr + bc + cc)
    e = tl.exp(c * h)
    return h, c, e, b * e, w1, wb, wc, w2


@device_function
def stream_forward(inp, packed_ptr, base, n, KP: tl.constexpr, HCHUNK: tl.constexpr,
                   PRECISION: tl.constexpr):
    """One stream on a block of rows: z = relu(inp g + gb) and v = z a2 + b2 + p w2, the
    pre-activation of its LeakyReLU (padded columns of z stay exactly 0: relu(0 + 0))."""
    g, gb, a2 = bottleneck_tiles(packed_ptr, base, n, KP)
    b2_o = stream_offsets(base, n)[9]
    z = tl.maximum(mm(inp, g, None, PRECISION) + gb, 0.0)
    v = (mm(z, a2, None, PRECISION)
         + tl.load(packed_ptr + b2_o + tl.arange(0, OUT))[None, :])
    # The 64 hidden units go HCHUNK at a time through a runtime loop: only one chunk's
    # weights are live (an MMA's B operand is held whole by every warp), and the loop keeps
    # the compiler from hoisting every weight out of the caller's loops into registers.
    for c0 in range(0, HID, HCHUNK):
        _, _, _, p, _, _, _, w2 = hidden_chunk(inp, z, packed_ptr, base, n, c0, KP, HCHUNK,
                                            PRECISION)
        v = mm(p, w2, v, PRECISION)
    return z, v


@device_function
def wnn_normalise(w, col, valid):
    """The "wnn" normalisation of a block of rows: (x, scale, shift) with x 0 past S."""
    m0 = tl.sum(tl.where(col == 0, w, 0.0), axis=1)
    xs = w - m0[:, None]
    span = (tl.max(tl.where(valid, xs, -float("inf")), axis=1)
            - tl.min(tl.where(valid, xs, float("inf")), axis=1))
    scale = 2.0 * (span + EPS)
    return tl.where(valid, xs / scale[:, None], 0.0), scale, m0


@device_function
def tanh_parts(y):
    """tanh(y) = sign(y) (1 - t) / (1 + t) with t = exp(-2|y|): no overflow for any y, and
    its absolute error (~1e-7) is what matters once x_last is added.  Returns (tanh(y), t)."""
    t = tl.exp(-2.0 * tl.abs(y))
    out = (1.0 - t) / (1.0 + t)
    return tl.where(y < 0.0, -out, out), t


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


def available(device: torch.device) -> tuple[bool, str]:
    if triton is None:
        return False, f"triton is not importable ({IMPORT_ERROR})"
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
    """The autotuner's key for n rows: log2(n), capped."""
    return min(max(0, int(math.log2(n))), MAX_TUNED_BUCKET)


def pad_dim(S: int) -> int:
    """The snapshot dimension of the kernels' tiles: S, padded for tl.dot."""
    return max(MIN_DOT, 1 << (S - 1).bit_length())
