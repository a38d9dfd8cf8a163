"""Pool the replicates: every row's values over (replicate, downstream seed), its paired
difference from naive transfer and the standard error with the replicate as the cluster.

Replicate p's seed s gives a row the value v_ps and naive transfer n_ps (the same draws,
the same pretraining run); the pooled Δ is the mean of d_ps = v_ps − n_ps and its standard
error is :func:`~know_kernels.research.stats.clustered_difference`'s, so the luck of each
pretraining run is in the error bar (docs/demo.md has the formula).  A source row has one
value per replicate, and the same formula gives the plain standard error over replicates.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .controls import control_of
from .stats import clustered_difference, t_critical_df
from .transfer import DISPLAY, NAIVE, factor_label

RESOLVED_SE = 2.0


def row_name(method: str, step: int, factor: float) -> str:
    of = control_of(method)
    if of is not None:
        return f"Matched noise ({DISPLAY.get(of, of)})"
    if method == NAIVE and step < 0:
        return "Θ^1 (forgotten)"
    return DISPLAY.get(method, method)


def compare(upper: dict, lower: dict, field: str = "acc") -> dict:
    """Clustered paired difference ``upper − lower`` of two pooled rows' ``field``."""
    mean, se = clustered_difference(upper[field], lower[field])
    return {"diff_mean": mean, "diff_se": se,
            "resolved": bool(se > 0 and mean >= RESOLVED_SE * se),
            "resolved_below": bool(se > 0 and -mean >= RESOLVED_SE * se)}


def _flat(nested: Sequence[Sequence[float]]) -> np.ndarray:
    return np.concatenate([np.asarray(v, dtype=np.float64) for v in nested])


def _summary(row: dict, base: dict, field: str) -> dict:
    values = _flat(row[field])
    mean, se = clustered_difference(row[field], base[field])
    half = t_critical_df(len(row[field]) - 1) * se
    prefix = "" if field == "acc" else f"{field}_"
    return {f"{field}_mean": float(values.mean()),
            f"{field}_std": float(values.std(ddof=1)) if values.size > 1 else 0.0,
            f"{prefix}diff": [[a - b for a, b in zip(v, n)]
                              for v, n in zip(row[field], base[field])],
            f"{prefix}diff_mean": mean, f"{prefix}diff_se": se,
            f"{prefix}diff_ci95": [mean - half, mean + half],
            f"{prefix}replicate_diff": [float(np.mean(np.subtract(v, n)))
                                        for v, n in zip(row[field], base[field])]}


def pool_task(per_replicate: Sequence[dict]) -> dict:
    """One task's per-replicate results (each ``TransferResult.to_dict()``-shaped) pooled
    into rows with nested per-replicate values and clustered statistics."""
    first = per_replicate[0]
    keys = [(r["method"], r["step"]) for r in first["rows"]]
    for rep in per_replicate[1:]:
        if [(r["method"], r["step"]) for r in rep["rows"]] != keys:
            raise ValueError(f"{first['task']}: the replicates hold different rows")
    fields = ["acc"] + (["ce"] if "ce" in first["rows"][0] else [])
    pooled = []
    for i, (method, step) in enumerate(keys):
        row = {"method": method, "step": step, "factor": first["rows"][i]["factor"],
               "control_of": control_of(method),
               "diverged": [rep["rows"][i]["diverged"] for rep in per_replicate]}
        row["name"] = row_name(method, step, row["factor"])
        row["label"] = factor_label(row["factor"])
        for f in fields:
            row[f] = [list(rep["rows"][i][f]) for rep in per_replicate]
        pooled.append(row)
    base = pooled[keys.index((NAIVE, 0))]
    for row in pooled:
        for f in fields:
            row.update(_summary(row, base, f))
        row["significant"] = bool(row["diff_se"] > 0 and abs(row["diff_mean"]) >=
                                  RESOLVED_SE * row["diff_se"])
    return {"task": first["task"], "num_classes": first["num_classes"],
            "train_images_per_seed": first["train_images_per_seed"],
            "test_images": first["test_images"], "replicates": len(per_replicate),
            "seeds": [rep["seeds"] for rep in per_replicate],
            "baseline": "Naive transfer ×1", "protocol": first["protocol"],
            "recipe": first.get("recipe"), "rows": pooled}


def find_row(task: dict, method: str, factor: float):
    for row in task["rows"]:
        if row["method"] == method and row["factor"] == factor:
            return row
    return None
