"""The paper's simple extrapolation baselines, vectorised over (N, S) trajectory rows.

Rows are in time order (oldest = least data first).  The fits put row entry j at
t = j + 1 (so Θ^{S-1} sits at t = 1 and Θ^0 at t = S) and read the fitted curve at
t = S + k for the k-th prediction (Θ̂^{-k}):

* ``linear``: least squares θ = a + b·t;
* ``log``:    least squares θ = a + b·ln t (t counts stages, so this bends towards a plateau);
* ``exp``:    θ = a + b·ρ^t with ρ found per row by a coarse grid then golden-section search
  on the least-squares residual (closed form for a, b at each ρ), so non-monotone rows still
  get a finite fit; ρ near 1 degenerates to the linear fit;
* ``taskvector``: Θ^{-1} = Θ^0 + λ(Θ^0 − Θ^1), iterated like KNOWN by sliding the window.

Everything is computed in float64 (float32 for very large batches would lose the small
stage-to-stage differences) and returned in the requested dtype.
"""
from __future__ import annotations

import math

import torch

METHODS = ("linear", "log", "exp", "taskvector")
DEFAULT_LAMBDA = 0.2
# Bases closer to 1 than this make 1 and ρ^t collinear on short rows.
_RHO_MIN, _RHO_MAX, _RHO_GRID, _GOLDEN_ITERS = 0.05, 3.0, 64, 40


def _lstsq_2(basis: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row least squares y ≈ a + b·basis; basis (N, S) or (S,). Returns a, b, residual."""
    basis = basis.expand_as(y)
    bm = basis.mean(dim=1, keepdim=True)
    ym = y.mean(dim=1, keepdim=True)
    db, dy = basis - bm, y - ym
    var = (db * db).sum(dim=1, keepdim=True)
    b = torch.where(var > 0, (db * dy).sum(dim=1, keepdim=True) / var.clamp_min(1e-300),
                    torch.zeros_like(var))
    a = ym - b * bm
    resid = ((y - a - b * basis) ** 2).sum(dim=1)
    return a[:, 0], b[:, 0], resid


def _exp_residual(rho: torch.Tensor, t: torch.Tensor, y: torch.Tensor):
    basis = rho[:, None] ** t[None, :]
    a, b, resid = _lstsq_2(basis, y)
    return a, b, resid


def fit_exp(y: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row (a, b, ρ) minimising Σ (y − a − b·ρ^t)² over ρ in [_RHO_MIN, _RHO_MAX]."""
    n = y.shape[0]
    grid = torch.linspace(_RHO_MIN, _RHO_MAX, _RHO_GRID, dtype=y.dtype, device=y.device)
    best = torch.full((n,), float("inf"), dtype=y.dtype, device=y.device)
    best_i = torch.zeros(n, dtype=torch.long, device=y.device)
    for i, rho in enumerate(grid):
        _, _, resid = _exp_residual(rho.expand(n), t, y)
        better = resid < best
        best = torch.where(better, resid, best)
        best_i = torch.where(better, torch.full_like(best_i, i), best_i)
    step = grid[1] - grid[0]
    lo = (grid[best_i] - step).clamp(min=_RHO_MIN)
    hi = (grid[best_i] + step).clamp(max=_RHO_MAX)
    inv_phi = (math.sqrt(5) - 1) / 2
    for _ in range(_GOLDEN_ITERS):
        m1 = hi - inv_phi * (hi - lo)
        m2 = lo + inv_phi * (hi - lo)
        left = _exp_residual(m1, t, y)[2] <= _exp_residual(m2, t, y)[2]
        hi = torch.where(left, m2, hi)
        lo = torch.where(left, lo, m1)
    rho = (lo + hi) / 2
    a, b, _ = _exp_residual(rho, t, y)
    return a, b, rho


def extrapolate(rows: torch.Tensor, method: str, *, steps: int = 1, all_steps: bool = False,
                lam: float = DEFAULT_LAMBDA, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Baseline predictions for (N, S) time-ordered rows: (N,) for step ``steps`` or (N, steps)."""
    if method not in METHODS:
        raise ValueError(f"unknown baseline {method!r}; choose from {METHODS}")
    if rows.dim() != 2 or rows.shape[1] < 2:
        raise ValueError(f"rows must be (N, S) with S >= 2, got {tuple(rows.shape)}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    out_dtype = out_dtype or rows.dtype
    y = rows.to(torch.float64)
    S = y.shape[1]
    t = torch.arange(1, S + 1, dtype=torch.float64, device=y.device)
    ahead = torch.arange(S + 1, S + steps + 1, dtype=torch.float64, device=y.device)
    if method == "taskvector":
        last, prev, preds = y[:, -1], y[:, -2], []
        for _ in range(steps):
            nxt = last + lam * (last - prev)
            preds.append(nxt)
            prev, last = last, nxt
        out = torch.stack(preds, dim=1)
    elif method == "linear":
        a, b, _ = _lstsq_2(t, y)
        out = a[:, None] + b[:, None] * ahead[None, :]
    elif method == "log":
        a, b, _ = _lstsq_2(torch.log(t), y)
        out = a[:, None] + b[:, None] * torch.log(ahead)[None, :]
    else:
        a, b, rho = fit_exp(y, t)
        out = a[:, None] + b[:, None] * rho[:, None] ** ahead[None, :]
    out = out.to(out_dtype)
    return out if all_steps else out[:, -1]
