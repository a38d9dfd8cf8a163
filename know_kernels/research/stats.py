"""Statistics of paired values: accuracies of two candidates measured on the same seeds."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

MIN_SEEDS = 2


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n − 1 in the denominator)."""
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), (float(v.std(ddof=1)) if v.size > 1 else 0.0)


# Student's t 0.975 quantiles for 1..30 degrees of freedom; beyond 30 the df-30 value is a
# slightly conservative stand-in (the limit is 1.960).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_critical(n: int) -> float:
    """Half-width of a 95% confidence interval in standard errors, for n paired values."""
    return _T975[min(n - 1, len(_T975)) - 1]


def paired_difference(values: Sequence[float], baseline: Sequence[float]) -> tuple[float, float]:
    """Mean of d_s = values_s − baseline_s and its standard error s_d / √n."""
    d = np.asarray(values, dtype=np.float64) - np.asarray(baseline, dtype=np.float64)
    if d.ndim != 1 or d.size < MIN_SEEDS:
        raise ValueError(f"need >= {MIN_SEEDS} paired values of equal length, got "
                         f"{len(values)} and {len(baseline)}")
    mean, sd = mean_std(d)
    # Accuracies are counts over a test set: equal differences on every seed leave only
    # rounding noise in sd, which is no spread.
    return mean, (sd / math.sqrt(d.size) if sd > 1e-9 else 0.0)


def t_critical_df(df: int) -> float:
    """Half-width of a 95% confidence interval in standard errors for ``df`` >= 1 degrees
    of freedom."""
    return t_critical(df + 1)


def clustered_difference(values: Sequence[Sequence[float]],
                         baseline: Sequence[Sequence[float]]) -> tuple[float, float]:
    """Mean of d = values − baseline over every (cluster, unit) pair, and its standard error
    with the cluster (a pretraining replicate) as the unit of independence.

    With G clusters, N values in all, d̄ the pooled mean and D_g = Σ_{i∈g} (d_gi − d̄) the
    cluster's summed residual, the variance is the cluster-robust (CR1) one:
    V = G / (G − 1) · Σ_g D_g² / N².  With equal cluster sizes this is the sample variance
    of the G cluster means over G, so the spread between replicates is in the error bar
    however many downstream seeds each replicate has.
    """
    if len(values) != len(baseline):
        raise ValueError(f"need the same clusters, got {len(values)} and {len(baseline)}")
    d = [np.asarray(v, dtype=np.float64) - np.asarray(b, dtype=np.float64)
         for v, b in zip(values, baseline)]
    if len(d) < MIN_SEEDS or any(g.ndim != 1 or g.size == 0 for g in d):
        raise ValueError(f"need >= {MIN_SEEDS} non-empty clusters of paired values, got "
                         f"sizes {[g.size for g in d]}")
    n = sum(g.size for g in d)
    mean = float(sum(g.sum() for g in d) / n)
    summed = np.array([(g - mean).sum() for g in d])
    var = len(d) / (len(d) - 1) * float(np.square(summed).sum()) / n ** 2
    se = math.sqrt(var)
    # Accuracies are counts over a test set: the same difference everywhere leaves only
    # rounding noise, which is no spread (as in paired_difference).
    return mean, (se if se > 1e-9 else 0.0)
