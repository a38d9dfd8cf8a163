"""The float64 reference of ``precision="bf16"``: what the fused kernels compute when their
matrix products take bfloat16 operands, with every other operation exact.

The bf16 kernels (the CPU's VDPBF16PS copy, csrc/cpu/tile_forward_bf16.h, and the Triton
kernel's "bf16" mode, ops/triton_common.py ``mm``) run the folded head of ``packing.py``
and round to bfloat16 (nearest even) both operands of each of its learned products: the
stream input (x, or the differences d), z after its relu, p = b e, and the folded weights
w1, g, wb, wc, w2 and a2 as the packed float32 vector holds them.  The products of two
bfloat16 values are exact in float32 and accumulate in float32; biases, the exp, LeakyReLU,
the head's 64 -> 1 product, tanh, the normalisation and the window slide stay float32.

This module does the same in float64: the rounding of the operands is the only
approximation besides the stream inputs, computed in float32 as the kernels do, so that
the same values are rounded.  A kernel's distance to it is its float32 arithmetic (and the
rare z, p or later-step input that float32 and float64 round to neighbouring bfloat16
values), while its distance to ``reference.nowcast_ref`` is what bfloat16 costs.
"""
from __future__ import annotations

from typing import Mapping

import torch

from .packing import fold
from .reference import LEAKY_SLOPE, OUT_HIDDEN, normalise

__all__ = ["ROUNDED_WEIGHTS", "nowcast_ref_bf16", "round_bf16"]

# The folded weights the bf16 products read rounded; every other folded tensor (the biases,
# wo and bo) stays float32.
ROUNDED_WEIGHTS = ("w1", "g", "wb", "wc", "w2", "a2")


def round_bf16(t: torch.Tensor) -> torch.Tensor:
    """t rounded to bfloat16 (nearest even, from its float32 value), in t's dtype."""
    return t.to(torch.float32).to(torch.bfloat16).to(t.dtype)


def _operands(params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The folded head as the kernels read it: folded in float64, rounded to float32 (the
    packed vector), the product weights then to bfloat16; all returned in float64."""
    folded = fold({k: v.detach().to(torch.float64) for k, v in params.items()})
    out = {}
    for name, t in folded.items():
        t = t.to(torch.float32)
        if name.split(".")[-1] in ROUNDED_WEIGHTS:
            t = t.to(torch.bfloat16)
        out[name] = t.to(torch.float64)
    return out


def _stream(inp: torch.Tensor, f: Mapping[str, torch.Tensor], prefix: str) -> torch.Tensor:
    def w(role):
        return f[f"{prefix}.{role}"]
    x = round_bf16(inp)
    z = round_bf16(torch.relu(x @ w("g") + w("gb")))
    h = x @ w("w1") + w("b1")
    b = z @ w("wb") + w("bb")
    c = z @ w("wc") + w("bc")
    p = round_bf16(b * torch.exp(c * h))
    return torch.nn.functional.leaky_relu(p @ w("w2") + z @ w("a2") + w("b2"), LEAKY_SLOPE)


def _step(w: torch.Tensor, f: Mapping[str, torch.Tensor], norm: str) -> torch.Tensor:
    # The stream inputs in float32, as the kernels compute them: rounding the same values
    # to bfloat16 makes the same operands (float64 ones would round differently now and
    # then, and one input a bfloat16 unit away moves its row's prediction by ~1e-3).
    x, scale, shift = normalise(w.to(torch.float32), norm)
    d = (x[:, 1:] - x[:, :-1]).to(torch.float64)
    x, scale, shift = x.to(torch.float64), scale.to(torch.float64), shift.to(torch.float64)
    u = torch.cat([_stream(x, f, "x"), _stream(d, f, "d")], dim=1)
    out = torch.tanh(u @ f["wo"][:, None] + f["bo"])[:, 0]
    return (x[:, -1] + out) * scale + shift


@torch.no_grad()
def nowcast_ref_bf16(rows: torch.Tensor, params: Mapping[str, torch.Tensor], norm: str, *,
                     steps: int = 1, all_steps: bool = False,
                     chunk_rows: int = 1 << 15) -> torch.Tensor:
    """``nowcast_ref`` with bfloat16 product operands, in float64 (see the module
    docstring): (N, S) rows, oldest first -> (N,) or, with ``all_steps``, (N, steps)."""
    if rows.dim() != 2:
        raise ValueError(f"rows must be (N, S), got shape {tuple(rows.shape)}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    f = {k: v.to(rows.device) for k, v in _operands(params).items()}
    assert f["wo"].numel() == 2 * OUT_HIDDEN
    n = rows.shape[0]
    out = torch.empty((n, steps), dtype=torch.float64, device=rows.device)
    for start in range(0, n, chunk_rows):
        w = rows[start:start + chunk_rows].to(torch.float64)
        for k in range(steps):
            nxt = _step(w, f, norm)
            out[start:start + w.shape[0], k] = nxt
            # The window slides in float32, as in the kernels.
            w = torch.cat([w[:, 1:], nxt[:, None].to(torch.float32).to(torch.float64)], dim=1)
    return out if all_steps else out[:, -1]
