"""Triton backend of ``vjp``: the vector-Jacobian product of one nowcast step, fused
(forward, then backward to the packed head and optionally to the rows) per block of rows.

Backend contract (``run``, called by the autograd of ``kernels/nowcast.py``)::

    run(rows, packed, upstream, *, S, norm, grad_packed, grad_rows) -> None

``rows``: contiguous (N, S) of a kernel dtype; ``packed``: ``packing.pack``'s float32 vector;
``upstream``: contiguous (N,) float32, u_i = dL/d pred_i for the one-step prediction
(``reference.step_ref``).  ``grad_packed`` (float32, packed size) is overwritten with
sum_i u_i d pred_i / d packed (zeros for N = 0) and ``grad_rows``, unless None, a
contiguous (N, S) float32, with u_i d pred_i / d rows_i.  Sub-gradients are torch
autograd's: relu'(0) = 0, leaky_relu'(0) = 0.3, amax / amin shared evenly among ties.

A block of ``BLOCK_M`` rows is normalised, runs both streams forward keeping only the
bottleneck ``z`` and the pre-activation ``v`` of each, forms dL/dy = u s tanh'(y), then
runs each stream backward.  The backward pass recomputes ``h``, ``b``, ``c`` and the
exponential ``HCHUNK`` hidden units at a time instead of keeping them (4 x 64 values per
row would not fit in registers).  The rows' gradient goes back through each stream's input
(w1 and the folded g), through the d stream's differences and through the normalisation,
where the scale's max and min share their gradient evenly among tied values, as torch's
amax / amin do (a constant row ties everywhere).

Weight gradients are sums over rows, each a ``tl.dot`` over a block's rows.  So that the
result does not depend on how many programs run, the blocks are cut into at most
``GROUPS`` groups of consecutive blocks; a program takes whole groups and adds each block
of a group, in order, to that group's row of a (groups, P) float32 buffer, and one
``torch.sum`` over the groups gives the gradient.  No two programs write the same address,
so no atomics.  The block size, chunk and warps are fixed rather than autotuned: each of
them changes the order of the sums, and an autotuner's pick (by timing) could differ from
one process to the next.

Matrix products follow the inference kernel (``nowcast_triton.py``): tiles zero-padded to
16 in every dimension and the same ``input_precision`` switch ("ieee" by default; the 1e-5
bound of the tests holds for it) except "bf16", whose rounding is not meant for gradients.
The interpreter (``TRITON_INTERPRET=1``, set before triton is imported) runs the kernel on
CPU tensors.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Optional

import torch

from ..packing import packed_offsets
from . import check_vjp_call, invariant
from .triton_common import (BOT, DOT_PRECISIONS, HID, OUT, PAD, SLOPE, available,
                            bottleneck_tiles, device_function, hidden_chunk, interpreting,
                            pad_dim, stream_forward, stream_offsets, tanh_parts, tl, triton,
                            wnn_normalise)

__all__ = ["MAX_WINDOW", "available", "kernel", "run"]

PRECISIONS = tuple(p for p in DOT_PRECISIONS if p != "bf16")
MAX_WINDOW = None
# (BLOCK_M, HCHUNK, num_warps, num_stages) on a GPU: the L1 kernel's choice for sm_90 with
# ptxas -v (the backward pass keeps inp, z, v of both streams, dv, dz and the chunk's h,
# c, e, p, dp alive; larger blocks or chunks spilled kilobytes).
GPU_CONFIG = (32, 16, 8, 1)
INTERPRET_BLOCK_M = 32
INTERPRET_HCHUNK = 32
INTERPRET_NUM_WARPS = 4
# Programs under the interpreter: more than one, and fewer than the groups of most tests,
# so that programs loop over several groups.
INTERPRET_PROGRAMS = 3
# Programs per SM in the grid: one or two are resident at ~250 registers per thread; a few
# more even out the programs' shares of groups.
PROGRAMS_PER_SM = 4
# Most groups (rows of the partial-gradient buffer): 1024 x P floats is 32 MB at S = 5, and
# enough groups for every program of the largest cards.
GROUPS = 1024


@device_function
def _accumulate(ptr, value, mask):
    # The group's own row of the buffer: no other program touches it, and Triton stores
    # each element from one thread (replicas are masked off), the one that loaded it.
    tl.store(ptr, tl.load(ptr, mask=mask, other=0.0) + value, mask=mask)


@device_function
def _stream_backward(inp, z, dv, packed_ptr, grad_ptr, base, n, KP: tl.constexpr,
                     HCHUNK: tl.constexpr, PRECISION: tl.constexpr, ROW_GRAD: tl.constexpr):
    """Adds this block's gradient of one stream's folded tensors, given dv = dL/dv, and
    returns dL/dinp (zeros unless ROW_GRAD)."""
    b1_o, g_o, gb_o, wb_o, bb_o, wc_o, bc_o, w2_o, a2_o, b2_o = stream_offsets(base, n)
    g, _, a2 = bottleneck_tiles(packed_ptr, base, n, KP)
    r = tl.arange(0, KP)[:, None]
    rb = tl.arange(0, PAD)[:, None]
    cb = tl.arange(0, PAD)[None, :]
    co = tl.arange(0, OUT)[None, :]
    zt = tl.trans(z)
    it = tl.trans(inp)
    # w1 and g are zero past the stream's n inputs, so dinp is too.
    dinp = tl.zeros_like(inp)
    _accumulate(grad_ptr + b2_o + tl.arange(0, OUT), tl.sum(dv, axis=0), True)
    _accumulate(grad_ptr + a2_o + rb * OUT + co, tl.dot(zt, dv, input_precision=PRECISION),
                rb < BOT)
    dz = tl.dot(dv, tl.trans(a2), input_precision=PRECISION)
    for c0 in range(0, HID, HCHUNK):
        h, c, e, p, w1, wb, wc, w2 = hidden_chunk(inp, z, packed_ptr, base, n, c0, KP, HCHUNK,
                                                  PRECISION)
        ch = c0 + tl.arange(0, HCHUNK)
        _accumulate(grad_ptr + w2_o + ch[:, None] * OUT + co,
                    tl.dot(tl.trans(p), dv, input_precision=PRECISION), True)
        dp = tl.dot(dv, tl.trans(w2), input_precision=PRECISION)
        db = dp * e                 # p = b e
        dpp = dp * p                # d(c h) = dp b e = dp p
        dc = dpp * h
        dh = dpp * c
        _accumulate(grad_ptr + wb_o + rb * HID + ch[None, :],
                    tl.dot(zt, db, input_precision=PRECISION), rb < BOT)
        _accumulate(grad_ptr + wc_o + rb * HID + ch[None, :],
                    tl.dot(zt, dc, input_precision=PRECISION), rb < BOT)
        _accumulate(grad_ptr + base + r * HID + ch[None, :],
                    tl.dot(it, dh, input_precision=PRECISION), r < n)
        _accumulate(grad_ptr + bb_o + ch, tl.sum(db, axis=0), True)
        _accumulate(grad_ptr + bc_o + ch, tl.sum(dc, axis=0), True)
        _accumulate(grad_ptr + b1_o + ch, tl.sum(dh, axis=0), True)
        dz = tl.dot(db, tl.trans(wb), dz, input_precision=PRECISION)
        dz = tl.dot(dc, tl.trans(wc), dz, input_precision=PRECISION)
        if ROW_GRAD:
            dinp = tl.dot(dh, tl.trans(w1), dinp, input_precision=PRECISION)
    # relu'(0) = 0, as torch: z > 0 exactly where the pre-activation is.
    dzp = tl.where(z > 0.0, dz, 0.0)
    _accumulate(grad_ptr + g_o + r * BOT + cb, tl.dot(it, dzp, input_precision=PRECISION),
                (r < n) & (cb < BOT))
    _accumulate(grad_ptr + gb_o + cb, tl.sum(dzp, axis=0)[None, :], cb < BOT)
    if ROW_GRAD:
        dinp = tl.dot(dzp, tl.trans(g), dinp, input_precision=PRECISION)
    return dinp


@device_function
def _wnn_backward(gx, x, w, m0, scale, dscale_direct, du, col, valid):
    """dL/dw of the "wnn" normalisation x = (w - m0) / s, s = 2 (max - min + eps), m0 = w_0,
    given gx = dL/dx, the direct dL/ds and du = dL/d(shift)."""
    xs = w - m0[:, None]
    hi = tl.max(tl.where(valid, xs, -float("inf")), axis=1)
    lo = tl.min(tl.where(valid, xs, float("inf")), axis=1)
    at_max = tl.where(valid & (xs == hi[:, None]), 1.0, 0.0)
    at_min = tl.where(valid & (xs == lo[:, None]), 1.0, 0.0)
    ties = (at_max / tl.sum(at_max, axis=1)[:, None]
            - at_min / tl.sum(at_min, axis=1)[:, None])
    ds = dscale_direct - tl.sum(gx * x, axis=1) / scale   # x = xs / s
    dxs = gx / scale[:, None] + (2.0 * ds)[:, None] * ties
    # xs = w - w_0: w_0 gets minus the sum of dxs, and the shift's own gradient.
    return dxs + tl.where(col == 0, (du - tl.sum(dxs, axis=1))[:, None], 0.0)


def _vjp_kernel(rows_ptr, packed_ptr, upstream_ptr, part_ptr, grad_rows_ptr, N, wnn,
                blocks_per_group, groups, S: tl.constexpr, KP: tl.constexpr,
                O_D: tl.constexpr, O_WO: tl.constexpr, PRECISION: tl.constexpr,
                ROW_GRAD: tl.constexpr, BLOCK_M: tl.constexpr, HCHUNK: tl.constexpr):
    # O_D and O_WO are where stream d and wo start in the packed vector; bo ends it.  The
    # norm is a run-time flag (one branch per block); the row gradient a compile-time one,
    # so that grad_rows=None costs nothing.
    P: tl.constexpr = O_WO + 2 * OUT + 1
    pid = tl.program_id(0)
    col = tl.arange(0, KP)[None, :]
    valid = col < S
    # shift[i, j] = 1 where i == j + 1, so (x @ shift)[:, j] = x[:, j + 1].
    shift = tl.where(tl.arange(0, KP)[:, None] == col + 1, 1.0, 0.0)
    co = tl.arange(0, OUT)
    wo_x = tl.load(packed_ptr + O_WO + co)[None, :]
    wo_d = tl.load(packed_ptr + O_WO + OUT + co)[None, :]
    bo = tl.load(packed_ptr + O_WO + 2 * OUT)
    blocks = tl.cdiv(N, BLOCK_M)

    for grp in range(pid, groups, tl.num_programs(0)):
        grad_ptr = part_ptr + grp * P  # < GROUPS * P: 32 bits suffice
        for blk in range(grp * blocks_per_group,
                         tl.minimum((grp + 1) * blocks_per_group, blocks)):
            # blk * BLOCK_M < N fits the loop's integer type; row offsets need 64 bits.
            row = tl.arange(0, BLOCK_M).to(tl.int64) + blk * BLOCK_M
            row_ok = row < N
            w = tl.load(rows_ptr + row[:, None] * S + col, mask=row_ok[:, None] & valid,
                        other=0.0).to(tl.float32)
            # Rows past N get u = 0, which zeroes every gradient they could add.
            u = tl.load(upstream_ptr + row, mask=row_ok, other=0.0)
            if wnn:
                x, scale, m0 = wnn_normalise(w, col, valid)
            else:
                m0 = tl.zeros((BLOCK_M,), dtype=tl.float32)
                scale = tl.full((BLOCK_M,), 1.0, dtype=tl.float32)
                x = w
            d = tl.where(col < S - 1, tl.dot(x, shift, input_precision="ieee") - x, 0.0)

            z_x, v_x = stream_forward(x, packed_ptr, 0, S, KP, HCHUNK, PRECISION)
            z_d, v_d = stream_forward(d, packed_ptr, O_D, S - 1, KP, HCHUNK, PRECISION)
            u_x = tl.where(v_x >= 0.0, v_x, SLOPE * v_x)
            u_d = tl.where(v_d >= 0.0, v_d, SLOPE * v_d)
            y = bo + tl.sum(u_x * wo_x, axis=1) + tl.sum(u_d * wo_d, axis=1)
            # tanh'(y) = 4 t / (1 + t)^2 with t = exp(-2|y|): no cancellation in
            # 1 - tanh^2 near saturation.
            out, t = tanh_parts(y)
            # pred = (x_last + out) s + m0, so d pred / d out = s.
            dy = u * scale * (4.0 * t / ((1.0 + t) * (1.0 + t)))
            _accumulate(grad_ptr + O_WO + 2 * OUT, tl.sum(dy, axis=0), True)
            _accumulate(grad_ptr + O_WO + co, tl.sum(dy[:, None] * u_x, axis=0), True)
            _accumulate(grad_ptr + O_WO + OUT + co, tl.sum(dy[:, None] * u_d, axis=0), True)
            # leaky_relu'(0) = slope, as torch (x > 0 ? 1 : slope).
            dv_x = tl.where(v_x > 0.0, 1.0, SLOPE) * (dy[:, None] * wo_x)
            dv_d = tl.where(v_d > 0.0, 1.0, SLOPE) * (dy[:, None] * wo_d)
            dx = _stream_backward(x, z_x, dv_x, packed_ptr, grad_ptr, 0, S, KP, HCHUNK,
                                  PRECISION, ROW_GRAD)
            dd = _stream_backward(d, z_d, dv_d, packed_ptr, grad_ptr, O_D, S - 1, KP, HCHUNK,
                                  PRECISION, ROW_GRAD)
            if ROW_GRAD:
                last = col == S - 1
                # d_j = x_{j+1} - x_j: x_j gets dd_{j-1} - dd_j (dd is 0 past S - 2), and
                # x_last its direct u s.
                gx = (dx + tl.dot(dd, tl.trans(shift), input_precision="ieee") - dd
                      + tl.where(last, (u * scale)[:, None], 0.0))
                if wnn:
                    x_last = tl.sum(tl.where(last, x, 0.0), axis=1)
                    dw = _wnn_backward(gx, x, w, m0, scale, u * (x_last + out), u, col, valid)
                else:
                    dw = gx
                tl.store(grad_rows_ptr + row[:, None] * S + col, dw,
                         mask=row_ok[:, None] & valid)


@functools.lru_cache(maxsize=None)
def kernel():
    """The kernel, wrapped on first use in the library's mode (see triton_common)."""
    # Specialising on the integers' values (N divisible by 16, flags equal to 1) would only
    # multiply the compiled variants: none of them sizes an address the kernel vectorises.
    return triton.jit(_vjp_kernel,
                      do_not_specialize=("N", "wnn", "blocks_per_group", "groups"))


def plan(n: int, block_m: int, groups: int = 0) -> tuple[int, int]:
    """(groups, blocks per group) for n rows in blocks of block_m: consecutive blocks, at
    most ``groups`` (default ``GROUPS``) groups, all but the last of the same size."""
    blocks = triton.cdiv(n, block_m)
    per_group = triton.cdiv(blocks, min(groups or GROUPS, blocks))
    return triton.cdiv(blocks, per_group), per_group


def run(rows: torch.Tensor, packed: torch.Tensor, upstream: torch.Tensor, *, S: int, norm: str,
        grad_packed: torch.Tensor, grad_rows: Optional[torch.Tensor],
        input_precision: str = "ieee", programs: Optional[int] = None) -> None:
    """Backend entry point (contract: module docstring).  ``input_precision`` and
    ``programs`` (how many programs share the groups; default: a few per SM, or
    ``INTERPRET_PROGRAMS``) are this backend's own knobs, checked here; neither is taken
    by a public entry point, and ``programs`` does not change the result."""
    invariant(input_precision in PRECISIONS, f"input_precision {input_precision!r}")
    invariant(programs is None or programs >= 1, f"programs {programs!r}")
    check_vjp_call(rows, packed, upstream, grad_packed, grad_rows, S=S)
    n = rows.shape[0]
    if n == 0:
        grad_packed.zero_()
        return
    offsets = packed_offsets(S)
    if interpreting():
        block_m, chunk, warps, stages = (INTERPRET_BLOCK_M, INTERPRET_HCHUNK,
                                         INTERPRET_NUM_WARPS, 1)
        programs = programs or INTERPRET_PROGRAMS
    else:
        block_m, chunk, warps, stages = GPU_CONFIG
        if programs is None:
            with torch.cuda.device(rows.device):
                sms = torch.cuda.get_device_properties(rows.device).multi_processor_count
            programs = sms * PROGRAMS_PER_SM
    groups, per_group = plan(n, block_m)
    part = torch.zeros(groups, packed.numel(), dtype=torch.float32, device=rows.device)
    row_grad = grad_rows is not None
    # Not read without ROW_GRAD; any float32 pointer keeps the signature.
    grad_rows_arg = grad_rows if row_grad else part
    launch = kernel()[(min(programs, groups),)]
    with torch.cuda.device(rows.device) if rows.is_cuda else contextlib.nullcontext():
        launch(rows, packed, upstream, part, grad_rows_arg, n, int(norm == "wnn"), per_group,
               groups, S=S, KP=pad_dim(S), O_D=offsets["d.w1"], O_WO=offsets["wo"],
               PRECISION=input_precision, ROW_GRAD=row_grad, BLOCK_M=block_m, HCHUNK=chunk,
               num_warps=warps, num_stages=stages)
    torch.sum(part, dim=0, out=grad_packed.view(-1))
