"""The verdict of a transfer table, computed from its numbers.

A difference counts as **resolved** when it is at least ``RESOLVED_SE`` standard errors
from zero (the paired standard error over seeds).  Per task the verdict asks, in order:

1. can the task see knowledge?  The 2× more-data row must beat naive transfer, resolved;
2. does KNOWN's best row beat naive transfer, resolved, and what fraction of the 2×
   more-data gain does it recover?
3. is KNOWN's best row at least as high as every baseline's best row?
4. is any KNOWN row worse than naive transfer, resolved?
"""
from __future__ import annotations

from typing import Optional

from .transfer import MORE_DATA, PAPER_ORDER

RESOLVED_SE = 2.0
BASELINES = tuple(m for m in PAPER_ORDER if m != "known")


def resolved(row: dict, sign: int = 1) -> bool:
    """The row's Δ is at least RESOLVED_SE standard errors above (sign 1) or below (-1) 0."""
    return row["diff_se"] > 0 and sign * row["diff_mean"] >= RESOLVED_SE * row["diff_se"]


def _best(rows: list[dict], method: str) -> Optional[dict]:
    mine = [r for r in rows if r["method"] == method]
    return max(mine, key=lambda r: r["diff_mean"]) if mine else None


def _fmt(row: dict) -> str:
    return f"{row['diff_mean']:+.2f} ± {row['diff_se']:.2f}"


def task_verdict(result: dict) -> dict:
    """The four answers for one task's result (``TransferResult.to_dict()``)."""
    rows = result["rows"]
    more = {r["factor"]: r for r in rows if r["method"] == MORE_DATA}
    two = more.get(2.0)
    known = _best(rows, "known")
    baselines = {m: b for m in BASELINES if (b := _best(rows, m)) is not None}
    out = {"task": result["task"], "seeds": len(result["seeds"]),
           "sees_knowledge": None if two is None else resolved(two),
           "more_data_2x": None if two is None else two["diff_mean"],
           "known_best": None, "known_best_factor": None, "known_resolved": None,
           "recovered": None, "known_at_least_baselines": None,
           "known_worse_rows": [], "best_baseline": None}
    if known is not None:
        out.update(known_best=known["diff_mean"], known_best_factor=known["factor"],
                   known_resolved=resolved(known),
                   known_worse_rows=[r["label"] for r in rows
                                     if r["method"] == "known" and resolved(r, -1)])
        if two is not None and two["diff_mean"] > 0:
            out["recovered"] = known["diff_mean"] / two["diff_mean"]
        if baselines:
            out["known_at_least_baselines"] = all(known["diff_mean"] >= b["diff_mean"]
                                                  for b in baselines.values())
    if baselines:
        top = max(baselines.values(), key=lambda r: r["diff_mean"])
        out["best_baseline"] = {"name": top["name"], "diff_mean": top["diff_mean"],
                                "diff_se": top["diff_se"]}
    return out


def _sentence(result: dict, v: dict) -> str:
    rows = result["rows"]
    more = sorted((r for r in rows if r["method"] == MORE_DATA), key=lambda r: r["factor"])
    parts = [f"On {result['task']} ({v['seeds']} paired seeds)"]
    if more:
        parts.append(", real extra data gains " + ", ".join(
            f"{_fmt(r)} points at {r['label']}" for r in more))
        parts.append(" (the task can see knowledge)." if v["sees_knowledge"] else
                     " (the 2× row is not resolved: this task cannot show knowledge).")
    else:
        parts.append(" (no more-data rows).")
    known = _best(rows, "known")
    if known is not None:
        parts.append(f" KNOWN's best row ({known['label']}) gains {_fmt(known)}, "
                     f"{'resolved' if v['known_resolved'] else 'not resolved'}")
        if v["recovered"] is not None:
            parts.append(f", {100 * v['recovered']:.0f}% of the 2× more-data gain")
        parts.append(".")
        if v["best_baseline"] is not None:
            b = v["best_baseline"]
            parts.append(f" The best baseline row ({b['name']}) gains "
                         f"{b['diff_mean']:+.2f} ± {b['diff_se']:.2f}; KNOWN is "
                         f"{'at least as high' if v['known_at_least_baselines'] else 'lower'}.")
        parts.append(" No KNOWN row is resolved below naive transfer." if not
                     v["known_worse_rows"] else
                     f" KNOWN is resolved below naive transfer at "
                     f"{', '.join(v['known_worse_rows'])}.")
    return "".join(parts)


def verdict(results: dict) -> dict:
    """Per task the answers, and one paragraph of text over all tasks."""
    tasks = {name: task_verdict(res) for name, res in results["tasks"].items()}
    text = " ".join(_sentence(res, tasks[name]) for name, res in results["tasks"].items())
    text += (f" (Resolved: at least {RESOLVED_SE:g} paired standard errors from zero; the "
             "errors cover the downstream draws, not a second pretraining run.)")
    return {"tasks": tasks, "text": text}
