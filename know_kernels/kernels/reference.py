"""KNOWN in plain PyTorch: the ground truth every kernel is tested against.

Everything here works in float32 and float64 and follows ``docs/spec.md`` (§3–4)
literally (two streams, learned exp activation, LeakyReLU 0.3, tanh head), without any of
the algebraic folding the fused kernels use.  Rows are in time order (oldest first); the
prediction is the next value.
"""
from __future__ import annotations

from typing import Mapping

import torch

HIDDEN = 64
BOTTLENECK = 8
OUT_HIDDEN = 32
LEAKY_SLOPE = 0.3
NORMS = ("wnn", "raw")
# The WNN scaling: s = 2 * (max - min + 1e-8 + 1e-5).
WNN_EPS = 1e-8 + 1e-5

# Role -> shape, as functions of the stream input width n.  Keras layout: y = x @ K + b.
STREAM_ROLES = ("w1", "b1", "wd", "bd", "wa", "ba", "wb", "bb", "wc", "bc", "w2", "b2")
HEAD_ROLES = ("wo", "bo")


def stream_shapes(n: int) -> dict[str, tuple[int, ...]]:
    return {
        "w1": (n, HIDDEN), "b1": (HIDDEN,),
        "wd": (HIDDEN, BOTTLENECK), "bd": (BOTTLENECK,),
        "wa": (BOTTLENECK, HIDDEN), "ba": (HIDDEN,),
        "wb": (BOTTLENECK, HIDDEN), "bb": (HIDDEN,),
        "wc": (BOTTLENECK, HIDDEN), "bc": (HIDDEN,),
        "w2": (HIDDEN, OUT_HIDDEN), "b2": (OUT_HIDDEN,),
    }


def param_shapes(S: int) -> dict[str, tuple[int, ...]]:
    """Every parameter of one head, by its canonical name, in canonical (packing) order."""
    if S < 2:
        raise ValueError(f"S must be at least 2 (got {S}): the d stream needs one difference")
    shapes: dict[str, tuple[int, ...]] = {}
    for prefix, n in (("x", S), ("d", S - 1)):
        for role, shape in stream_shapes(n).items():
            shapes[f"{prefix}.{role}"] = shape
    shapes["wo"] = (2 * OUT_HIDDEN, 1)
    shapes["bo"] = (1,)
    return shapes


def num_params(S: int) -> int:
    total = 0
    for shape in param_shapes(S).values():
        n = 1
        for s in shape:
            n *= s
        total += n
    return total


def check_norm(norm: str) -> str:
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    return norm


def normalise(w: torch.Tensor, norm: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, S) rows -> (x, scale, shift) with prediction = (x_last + out) * scale + shift."""
    check_norm(norm)
    if norm == "raw":
        one = torch.ones((), dtype=w.dtype, device=w.device)
        return w, one, torch.zeros((), dtype=w.dtype, device=w.device)
    m0 = w[:, :1]
    x = w - m0
    s = 2.0 * (x.amax(dim=1, keepdim=True) - x.amin(dim=1, keepdim=True) + WNN_EPS)
    return x / s, s[:, 0], m0[:, 0]


def stream_ref(inp: torch.Tensor, p: Mapping[str, torch.Tensor]) -> torch.Tensor:
    h = inp @ p["w1"] + p["b1"]
    z = torch.relu(h @ p["wd"] + p["bd"])
    a = z @ p["wa"] + p["ba"]
    b = z @ p["wb"] + p["bb"]
    c = z @ p["wc"] + p["bc"]
    t = a + b * torch.exp(c * h)
    return torch.nn.functional.leaky_relu(t @ p["w2"] + p["b2"], LEAKY_SLOPE)


def _stream_params(params: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {role: params[f"{prefix}.{role}"] for role in STREAM_ROLES}


def residual_ref(x: torch.Tensor, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Normalised (N, S) rows -> (N,) residual ``out`` of the head (before de-normalising)."""
    d = x[:, 1:] - x[:, :-1]
    u = torch.cat([stream_ref(x, _stream_params(params, "x")),
                   stream_ref(d, _stream_params(params, "d"))], dim=1)
    return torch.tanh(u @ params["wo"] + params["bo"])[:, 0]


def step_ref(w: torch.Tensor, params: Mapping[str, torch.Tensor], norm: str) -> torch.Tensor:
    """One prediction: (N, S) raw rows -> (N,) next value."""
    x, scale, shift = normalise(w, norm)
    return (x[:, -1] + residual_ref(x, params)) * scale + shift


def nowcast_ref(rows: torch.Tensor, params: Mapping[str, torch.Tensor], norm: str, *,
                steps: int = 1, all_steps: bool = False,
                compute_dtype: torch.dtype | None = None,
                chunk_rows: int = 1 << 15) -> torch.Tensor:
    """Reference multi-step prediction by sliding the window.

    Computes in ``compute_dtype`` (default: float64 for float64 rows, else float32) and
    returns that dtype; works through ``chunk_rows`` rows at a time so the (rows x 64)
    intermediates stay bounded whatever N is.
    """
    if rows.dim() != 2:
        raise ValueError(f"rows must be (N, S), got shape {tuple(rows.shape)}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if compute_dtype is None:
        compute_dtype = torch.float64 if rows.dtype == torch.float64 else torch.float32
    p = {k: v.to(device=rows.device, dtype=compute_dtype) for k, v in params.items()}
    n = rows.shape[0]
    out = torch.empty((n, steps), dtype=compute_dtype, device=rows.device)
    for start in range(0, n, chunk_rows):
        w = rows[start:start + chunk_rows].to(compute_dtype)
        for k in range(steps):
            nxt = step_ref(w, p, norm)
            out[start:start + w.shape[0], k] = nxt
            w = torch.cat([w[:, 1:], nxt[:, None]], dim=1)
    return out if all_steps else out[:, -1]
