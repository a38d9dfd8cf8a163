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

The Triton interpreter (``TRITON_INTERPRET=1``, set before triton is imported: see
``triton_common.py``) runs the same kernel on CPU tensors with one fixed configuration.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from . import check_nowcast_call, invariant
from .triton_common import (BOT, DOT_PRECISIONS, HID, OUT, SLOPE, autotune_bucket, available,
                            interpreting, pad_dim, stream_forward, tanh_parts, tl, triton,
                            wnn_normalise)

__all__ = ["MAX_WINDOW", "available", "kernel", "run"]

PRECISIONS = DOT_PRECISIONS
MAX_WINDOW = None
# The interpreter gets one fixed configuration (autotuning there would only cost time).
INTERPRET_BLOCK_M = 32
INTERPRET_NUM_WARPS = 4
INTERPRET_HCHUNK = 32


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

    co = tl.arange(0, OUT)[None, :]
    # Packed layout: stream x's block (n = S), stream d's (n = S - 1), wo (2 x 32), bo.
    SIZE_X: tl.constexpr = (S * HID + HID + S * BOT + BOT + 2 * (BOT * HID + HID)
                            + HID * OUT + BOT * OUT + OUT)
    O_WO: tl.constexpr = 2 * SIZE_X - HID - BOT
    bo = tl.load(packed_ptr + O_WO + 2 * OUT)

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
            u = tl.where(v >= 0.0, v, SLOPE * v)
            acc += tl.sum(u * tl.load(packed_ptr + O_WO + si * OUT + co), axis=1)

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
def kernel():
    """The kernel, wrapped on first use in the library's mode (see triton_common)."""
    jitted = triton.jit(_nowcast_kernel)
    if interpreting():
        return jitted
    return triton.autotune(_autotune_configs(),
                           key=["n_bucket", "S", "WNN", "ALL_STEPS", "PRECISION"])(jitted)


def run(rows: torch.Tensor, packed: torch.Tensor, *, S: int, norm: str, steps: int,
        out: torch.Tensor, threads: Optional[int] = None,
        input_precision: str = "ieee") -> None:
    """Backend entry point (see ``know_kernels.kernels.nowcast``).  ``threads`` is a CPU-backend
    notion and is ignored; ``input_precision``, described in the module docstring, is this
    backend's own knob, which no public entry point takes, so it is checked here."""
    del threads
    invariant(input_precision in PRECISIONS, f"input_precision {input_precision!r}")
    check_nowcast_call(rows, packed, out, S=S, steps=steps)
    n = rows.shape[0]
    args = dict(S=S, KP=pad_dim(S), WNN=norm == "wnn", ALL_STEPS=out.dim() == 2,
                PRECISION=input_precision)
    n_bucket = autotune_bucket(n)
    if interpreting():
        kernel()[(triton.cdiv(n, INTERPRET_BLOCK_M),)](
            rows, packed, out, n, steps, n_bucket, BLOCK_M=INTERPRET_BLOCK_M,
            HCHUNK=INTERPRET_HCHUNK, num_warps=INTERPRET_NUM_WARPS, **args)
    else:
        with torch.cuda.device(rows.device):
            kernel()[lambda meta: (triton.cdiv(n, meta["BLOCK_M"]),)](
                rows, packed, out, n, steps, n_bucket, **args)
