"""Triton backend of ``l1_loss``: one fused training step (forward, L1, backward) per
block of rows.

Each program walks blocks of ``BLOCK_M`` rows (block ``pid``, ``pid + programs``, ...).
For a block it normalises the rows, runs both streams forward keeping only the
bottleneck ``z`` and the pre-activation ``v`` of each (``BLOCK_M`` x 16 and x 32), forms
the prediction, the loss and the loss's derivative with respect to the head's output
before its tanh, then runs each stream backward.  The backward pass recomputes ``h``,
``b``, ``c`` and the exponential ``HCHUNK`` hidden units at a time instead of keeping them
(4 x 64 values per row would not fit in registers), about an eighth more arithmetic.

Weight gradients are sums over rows: every product that forms one is a ``tl.dot`` over the
block's rows, added to the program's own row of a (programs, P + 1) float32 buffer (the
last column holds the loss).  No two programs write the same address, so the block loop
needs no atomics, and one ``torch.sum`` over the programs gives the gradient and the loss.
The grid is a few programs per SM, so the buffer stays small whatever N is.

Matrix products follow the inference kernel (``nowcast_triton.py``): tiles zero-padded to
16 in every dimension, and the same ``input_precision`` switch ("ieee" by default; the
1e-5 bound of the tests holds for it) except "bf16", an inference-speed mode whose
rounding is not meant for gradients.  The interpreter (``TRITON_INTERPRET=1``, set before
triton is imported) runs the kernel on CPU tensors with one fixed configuration; on a GPU
the block size, chunk and warps are autotuned per power of two of N (``autotune_bucket``).
"""
from __future__ import annotations

import functools

import torch

from ..packing import packed_offsets
from . import check_l1_call, invariant
from .triton_common import (BOT, DOT_PRECISIONS, HID, OUT, PAD, SLOPE, autotune_bucket,
                            available, bottleneck_tiles, device_function, hidden_chunk,
                            interpreting, pad_dim, stream_forward, stream_offsets, tanh_parts,
                            tl, triton, wnn_normalise)

__all__ = ["MAX_WINDOW", "available", "kernel", "run"]

PRECISIONS = tuple(p for p in DOT_PRECISIONS if p != "bf16")
MAX_WINDOW = None
INTERPRET_BLOCK_M = 32
INTERPRET_HCHUNK = 32
INTERPRET_NUM_WARPS = 4
# Programs under the interpreter: more than one, and fewer than the blocks of most tests,
# so that programs loop over several blocks.
INTERPRET_PROGRAMS = 3
# Programs per SM in the grid.  At 240-255 registers per thread (ptxas, sm_90) one or two
# programs are resident per SM; a few more in the grid even out the programs' shares of
# blocks, and the buffer stays at a few MB.
PROGRAMS_PER_SM = 4


@device_function
def _accumulate(ptr, value, mask):
    # The program's own row of the buffer: no other program touches it, and Triton stores
    # each element from one thread (replicas are masked off), the one that loaded it.
    tl.store(ptr, tl.load(ptr, mask=mask, other=0.0) + value, mask=mask)


@device_function
def _stream_backward(inp, z, dv, packed_ptr, grad_ptr, base, n, KP: tl.constexpr,
                     HCHUNK: tl.constexpr, PRECISION: tl.constexpr):
    """Adds this block's gradient of one stream's folded tensors, given dv = dL/dv."""
    b1_o, g_o, gb_o, wb_o, bb_o, wc_o, bc_o, w2_o, a2_o, b2_o = stream_offsets(base, n)
    _, _, a2 = bottleneck_tiles(packed_ptr, base, n, KP)
    r = tl.arange(0, KP)[:, None]
    rb = tl.arange(0, PAD)[:, None]
    cb = tl.arange(0, PAD)[None, :]
    co = tl.arange(0, OUT)[None, :]
    zt = tl.trans(z)
    it = tl.trans(inp)
    _accumulate(grad_ptr + b2_o + tl.arange(0, OUT), tl.sum(dv, axis=0), True)
    _accumulate(grad_ptr + a2_o + rb * OUT + co, tl.dot(zt, dv, input_precision=PRECISION),
                rb < BOT)
    dz = tl.dot(dv, tl.trans(a2), input_precision=PRECISION)
    for c0 in range(0, HID, HCHUNK):
        h, c, e, p, wb, wc, w2 = hidden_chunk(inp, z, packed_ptr, base, n, c0, KP, HCHUNK,
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
    # relu'(0) = 0, as torch: z > 0 exactly where the pre-activation is.
    dzp = tl.where(z > 0.0, dz, 0.0)
    _accumulate(grad_ptr + g_o + r * BOT + cb, tl.dot(it, dzp, input_precision=PRECISION),
                (r < n) & (cb < BOT))
    _accumulate(grad_ptr + gb_o + cb, tl.sum(dzp, axis=0)[None, :], cb < BOT)


def _l1_kernel(rows_ptr, target_ptr, packed_ptr, part_ptr, N, n_bucket, wnn, normalised,
               S: tl.constexpr, KP: tl.constexpr, O_D: tl.constexpr, O_WO: tl.constexpr,
               PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, HCHUNK: tl.constexpr):
    # n_bucket only keys the autotuner (autotune_bucket).  O_D and O_WO are where stream d
    # and wo start in the packed vector; bo ends it.  The norm and the loss space are
    # run-time flags (one branch per block): one compiled kernel serves all four
    # combinations.
    P: tl.constexpr = O_WO + 2 * OUT + 1
    pid = tl.program_id(0)
    grad_ptr = part_ptr + pid.to(tl.int64) * (P + 1)
    col = tl.arange(0, KP)[None, :]
    valid = col < S
    # shift[i, j] = 1 where i == j + 1, so (x @ shift)[:, j] = x[:, j + 1].
    shift = tl.where(tl.arange(0, KP)[:, None] == col + 1, 1.0, 0.0)
    co = tl.arange(0, OUT)
    wo_x = tl.load(packed_ptr + O_WO + co)[None, :]
    wo_d = tl.load(packed_ptr + O_WO + OUT + co)[None, :]
    bo = tl.load(packed_ptr + O_WO + 2 * OUT)

    for blk in range(pid, tl.cdiv(N, BLOCK_M), tl.num_programs(0)):
        # blk * BLOCK_M < N fits the loop's integer type; row offsets need 64 bits.
        row = tl.arange(0, BLOCK_M).to(tl.int64) + blk * BLOCK_M
        row_ok = row < N
        w = tl.load(rows_ptr + row[:, None] * S + col, mask=row_ok[:, None] & valid,
                    other=0.0).to(tl.float32)
        target = tl.load(target_ptr + row, mask=row_ok, other=0.0)
        if wnn:
            x, scale, m0 = wnn_normalise(w, col, valid)
        else:
            # scale 1 and shift 0 leave the prediction's bits alone.
            m0 = tl.zeros((BLOCK_M,), dtype=tl.float32)
            scale = tl.full((BLOCK_M,), 1.0, dtype=tl.float32)
            x = w
        d = tl.where(col < S - 1, tl.dot(x, shift, input_precision="ieee") - x, 0.0)

        z_x, v_x = stream_forward(x, packed_ptr, 0, S, KP, HCHUNK, PRECISION)
        z_d, v_d = stream_forward(d, packed_ptr, O_D, S - 1, KP, HCHUNK, PRECISION)
        u_x = tl.where(v_x >= 0.0, v_x, SLOPE * v_x)
        u_d = tl.where(v_d >= 0.0, v_d, SLOPE * v_d)
        y = bo + tl.sum(u_x * wo_x, axis=1) + tl.sum(u_d * wo_d, axis=1)
        # tanh'(y) = 4 t / (1 + t)^2 with t = exp(-2|y|): no cancellation in 1 - tanh^2
        # near saturation.
        out, t = tanh_parts(y)
        dout = 4.0 * t / ((1.0 + t) * (1.0 + t))
        last = tl.sum(tl.where(col == S - 1, x, 0.0), axis=1)
        diff = (last + out) * scale + m0 - target
        # d|e|/de = sign(e), sign(0) = 0; e = diff or diff / scale, and d pred / d out is
        # scale, so dL/dy is sign(diff) tanh' times scale ("original") or 1.
        sign = tl.where(diff > 0.0, 1.0, tl.where(diff < 0.0, -1.0, 0.0))
        if normalised:
            loss = tl.abs(diff) / scale
            dy = sign * dout
        else:
            loss = tl.abs(diff)
            dy = sign * dout * scale
        loss = tl.where(row_ok, loss, 0.0)
        dy = tl.where(row_ok, dy, 0.0)
        _accumulate(grad_ptr + P, tl.sum(loss, axis=0), True)
        _accumulate(grad_ptr + O_WO + 2 * OUT, tl.sum(dy, axis=0), True)
        _accumulate(grad_ptr + O_WO + co, tl.sum(dy[:, None] * u_x, axis=0), True)
        _accumulate(grad_ptr + O_WO + OUT + co, tl.sum(dy[:, None] * u_d, axis=0), True)
        # leaky_relu'(0) = slope, as torch (x > 0 ? 1 : slope).
        dv_x = tl.where(v_x > 0.0, 1.0, SLOPE) * (dy[:, None] * wo_x)
        dv_d = tl.where(v_d > 0.0, 1.0, SLOPE) * (dy[:, None] * wo_d)
        _stream_backward(x, z_x, dv_x, packed_ptr, grad_ptr, 0, S, KP, HCHUNK, PRECISION)
        _stream_backward(d, z_d, dv_d, packed_ptr, grad_ptr, O_D, S - 1, KP, HCHUNK, PRECISION)


# (BLOCK_M, HCHUNK, num_warps, num_stages), picked with ptxas -v for sm_90 ("ieee"): the
# backward pass keeps many tiles alive (inp, z, v of both streams, dv, dz, and the chunk's
# h, c, e, p, dp), so these sit at 240-255 registers with no spills or at most a few
# hundred bytes; BLOCK_M = 64 with 4 warps, HCHUNK = 32 or BLOCK_M = 128 spill 1.5-4 KB.
AUTOTUNE_CONFIGS = ((16, 16, 4, 1), (32, 16, 4, 1), (32, 16, 8, 1), (64, 16, 8, 1))
# When set to one of the tuples above, GPU launches use it instead of autotuning (each
# autotuned variant compiles every configuration; the GPU tests use this to stay short).
FIXED_CONFIG = None


@functools.lru_cache(maxsize=None)
def kernel():
    """The kernel, wrapped on first use in the library's mode (see triton_common)."""
    # Specialising on the integers' values (N divisible by 16, flags equal to 1) would only
    # multiply the compiled variants: none of them sizes an address the kernel vectorises.
    jitted = triton.jit(_l1_kernel, do_not_specialize=("N", "n_bucket", "wnn", "normalised"))
    if interpreting():
        return jitted
    # Every launch adds into the buffer, so each one, the autotuner's benchmark runs and the
    # final run alike, must start from zero: a config's pre_hook runs before each of them.
    configs = [triton.Config({"BLOCK_M": block_m, "HCHUNK": chunk}, num_warps=warps,
                             num_stages=stages, pre_hook=_zero_partials)
               for block_m, chunk, warps, stages in AUTOTUNE_CONFIGS]
    return triton.autotune(configs, key=["n_bucket", "S", "PRECISION"])(jitted)


def _zero_partials(args):
    args["part_ptr"].zero_()


def run(rows: torch.Tensor, target: torch.Tensor, packed: torch.Tensor, *, S: int, norm: str,
        loss_space: str, grad: torch.Tensor, input_precision: str = "ieee") -> torch.Tensor:
    """Backend entry point (see ``know_kernels.kernels.l1``): overwrites ``grad`` with
    d(sum |e|)/d(packed) and returns the sum of |e| as a 0-d float32 tensor.
    ``input_precision`` (module docstring) is this backend's own knob, checked here."""
    invariant(input_precision in PRECISIONS, f"input_precision {input_precision!r}")
    check_l1_call(rows, target, packed, grad, S=S)
    n = rows.shape[0]
    size = packed.numel()
    if n == 0:
        grad.zero_()
        return torch.zeros((), dtype=torch.float32, device=rows.device)
    offsets = packed_offsets(S)
    args = dict(S=S, KP=pad_dim(S), O_D=offsets["d.w1"], O_WO=offsets["wo"],
                PRECISION=input_precision)
    flags = (autotune_bucket(n), int(norm == "wnn"), int(loss_space == "normalised"))
    if interpreting():
        programs = min(INTERPRET_PROGRAMS, triton.cdiv(n, INTERPRET_BLOCK_M))
        part = torch.zeros(programs, size + 1, dtype=torch.float32, device=rows.device)
        kernel()[(programs,)](rows, target, packed, part, n, *flags, BLOCK_M=INTERPRET_BLOCK_M,
                              HCHUNK=INTERPRET_HCHUNK, num_warps=INTERPRET_NUM_WARPS, **args)
    else:
        with torch.cuda.device(rows.device):
            sms = torch.cuda.get_device_properties(rows.device).multi_processor_count
            programs = sms * PROGRAMS_PER_SM
            # Rows of programs that get no block (small N, large BLOCK_M) stay zero.
            part = torch.zeros(programs, size + 1, dtype=torch.float32, device=rows.device)
            if FIXED_CONFIG is None:
                kernel()[lambda meta: (min(programs, triton.cdiv(n, meta["BLOCK_M"])),)](
                    rows, target, packed, part, n, *flags, **args)
            else:
                block_m, chunk, warps, stages = FIXED_CONFIG
                kernel().fn[(min(programs, triton.cdiv(n, block_m)),)](
                    rows, target, packed, part, n, *flags, BLOCK_M=block_m, HCHUNK=chunk,
                    num_warps=warps, num_stages=stages, **args)
    torch.sum(part[:, :size], dim=0, out=grad.view(-1))
    return part[:, size].sum()
