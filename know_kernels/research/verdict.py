"""The verdict of ``know demo``, computed from its pooled rows (:mod:`~know_kernels.research.pooling`).

A difference is **resolved** when it is at least ``RESOLVED_SE`` clustered standard errors
from zero.  The verdict asks, in order:

1. **The ladder check**, per metric (source generalisation and each downstream task): on
   real data, ×0.5 < Θ^0 < ×2 < ×4, every step resolved; on source generalisation the
   forgotten Θ^1 must also lie resolved below Θ^0.  A metric that fails *cannot see
   knowledge* and judges nothing; the rest of the verdict uses the metrics that pass.
2. Per predicted row, the **controls**: does it beat its matched-noise control (resolved),
   and is its source generalisation not resolved below Θ^0's?  A downstream gain counts
   only where both hold; a source gain only where it beats its control.
3. Per passing metric: does KNOWN's best row beat naive transfer (resolved, and counted),
   what fraction of the 2× more-data gain does it recover, is it at least every baseline's
   best counted row, and is any KNOWN row resolved below naive transfer?
"""
from __future__ import annotations

from typing import Optional

from .controls import noise_method
from .demo_config import SOURCE_TASK
from .pooling import RESOLVED_SE, compare, find_row
from .transfer import MORE_DATA, NAIVE, PAPER_ORDER

# The learned lincomb rival (``know demo --lincomb``) is judged as a baseline.
BASELINES = tuple(m for m in PAPER_ORDER if m != "known") + ("lincomb",)
LADDER = ((MORE_DATA, 0.5), (NAIVE, 1.0), (MORE_DATA, 2.0), (MORE_DATA, 4.0))


def _fmt(d: dict) -> str:
    return f"{d['diff_mean']:+.2f} ± {d['diff_se']:.2f}"


def _label(method: str, factor: float) -> str:
    return "Θ^0" if method == NAIVE and factor == 1.0 else \
        "Θ^1" if method == NAIVE else f"×{factor:.3g}"


def ladder_check(task: dict) -> dict:
    """Step by step, does the metric order real amounts of data?"""
    steps = []
    rows = [find_row(task, m, f) for m, f in LADDER]
    pairs = list(zip(LADDER, rows, LADDER[1:], rows[1:]))
    if task["task"] == SOURCE_TASK:
        pairs.append(((NAIVE, 0.5), find_row(task, NAIVE, 0.5), (NAIVE, 1.0), rows[1]))
    for lo_key, lo, hi_key, hi in pairs:
        step = {"lower": _label(*lo_key), "upper": _label(*hi_key)}
        if lo is None or hi is None:
            step.update(diff_mean=None, diff_se=None, resolved=False, missing=True)
        else:
            step.update(compare(hi, lo))
        steps.append(step)
    return {"metric": task["task"], "passes": all(s["resolved"] for s in steps),
            "steps": steps}


def _predicted(row: dict) -> bool:
    return row["control_of"] is None and row["method"] not in (NAIVE, MORE_DATA)


def row_controls(task: dict, source: Optional[dict]) -> list[dict]:
    """For every predicted row: against naive, against its matched noise, its source
    generalisation, and whether its gain counts."""
    out = []
    for row in filter(_predicted, task["rows"]):
        noise = find_row(task, noise_method(row["method"]), row["factor"])
        vs_noise = compare(row, noise) if noise is not None else None
        src = find_row(source, row["method"], row["factor"]) if source is not None else None
        source_ok = src is None or not (src["diff_se"] > 0 and
                                        -src["diff_mean"] >= RESOLVED_SE * src["diff_se"])
        gain = bool(row["diff_se"] > 0 and row["diff_mean"] >= RESOLVED_SE * row["diff_se"])
        beats = bool(vs_noise and vs_noise["resolved"])
        out.append({"method": row["method"], "name": row["name"], "factor": row["factor"],
                    "label": row["label"], "diff_mean": row["diff_mean"],
                    "diff_se": row["diff_se"], "gain_resolved": gain, "vs_noise": vs_noise,
                    "beats_noise": beats, "source_not_below": source_ok,
                    "counts": gain and beats and source_ok})
    return out


def _best(controls: list[dict], method: str, counted: bool = False) -> Optional[dict]:
    mine = [c for c in controls if c["method"] == method and (c["counts"] or not counted)]
    return max(mine, key=lambda c: c["diff_mean"]) if mine else None


def task_verdict(task: dict, source: Optional[dict], ladder: dict) -> dict:
    """KNOWN against real data, its control and the baselines on one metric."""
    controls = row_controls(task, None if task["task"] == SOURCE_TASK else source)
    two = find_row(task, MORE_DATA, 2.0)
    known = _best(controls, "known")
    surviving = [b for m in BASELINES if (b := _best(controls, m, counted=True)) is not None]
    top = max(surviving, key=lambda c: c["diff_mean"]) if surviving else None
    out = {"task": task["task"], "sees_knowledge": ladder["passes"],
           "more_data_2x": None if two is None else two["diff_mean"],
           "known_best": None, "known_best_factor": None, "known_resolved": None,
           "known_counts": None, "known_beats_noise": None, "recovered": None,
           "known_at_least_baselines": None, "known_worse_rows": [],
           "best_baseline": None if top is None else
           {k: top[k] for k in ("name", "label", "diff_mean", "diff_se")},
           "rows": controls}
    if known is not None:
        out.update(known_best=known["diff_mean"], known_best_factor=known["factor"],
                   known_resolved=known["gain_resolved"], known_counts=known["counts"],
                   known_beats_noise=known["beats_noise"],
                   known_worse_rows=[r["label"] for r in task["rows"] if r["method"] == "known"
                                     and r["diff_se"] > 0
                                     and -r["diff_mean"] >= RESOLVED_SE * r["diff_se"]])
        if two is not None and two["diff_mean"] > 0:
            out["recovered"] = known["diff_mean"] / two["diff_mean"]
        out["known_at_least_baselines"] = top is None or known["diff_mean"] >= top["diff_mean"]
    return out


def _ladder_sentence(ladder: dict) -> str:
    steps = ", ".join(f"{s['lower']} < {s['upper']} "
                      f"{'(missing)' if s.get('missing') else _fmt(s)}"
                      f"{'' if s['resolved'] else ' unresolved'}" for s in ladder["steps"])
    return (f"{ladder['metric']} {'passes' if ladder['passes'] else 'CANNOT SEE KNOWLEDGE'}"
            f" ({steps})")


def _known_sentence(v: dict) -> str:
    if v["known_best"] is None:
        return f"On {v['task']}: no KNOWN rows."
    best = next(c for c in v["rows"] if c["method"] == "known"
                and c["factor"] == v["known_best_factor"])
    parts = [f"On {v['task']}, real 2× data gains {v['more_data_2x']:+.2f}; KNOWN's best row "
             f"({best['label']}) gains {_fmt(best)}, "
             f"{'resolved' if best['gain_resolved'] else 'not resolved'}"]
    if v["recovered"] is not None:
        parts.append(f", {100 * v['recovered']:.0f}% of the 2× gain")
    noise = best["vs_noise"]
    if noise is not None:
        parts.append(f"; against its matched noise {_fmt(noise)} "
                     f"({'beats it' if best['beats_noise'] else 'does not beat it'})")
    if v["task"] != SOURCE_TASK and not best["source_not_below"]:
        parts.append("; its source generalisation is resolved below Θ^0's")
    parts.append(f"; it {'counts' if best['counts'] else 'does not count'}.")
    b = v["best_baseline"]
    parts.append(f" The best baseline row that survives the controls: {b['name']} "
                 f"{b['label']} {b['diff_mean']:+.2f} ± {b['diff_se']:.2f}; KNOWN is "
                 f"{'at least as high' if v['known_at_least_baselines'] else 'lower'}."
                 if b is not None else " No baseline row survives the controls.")
    parts.append(" No KNOWN row is resolved below naive transfer." if not
                 v["known_worse_rows"] else
                 f" KNOWN is resolved below naive transfer at "
                 f"{', '.join(v['known_worse_rows'])}.")
    return "".join(parts)


def verdict(results: dict) -> dict:
    """The ladder check of every metric first, then the verdict on the metrics that pass."""
    tasks = results["tasks"]
    source = tasks.get(SOURCE_TASK)
    ladders = {name: ladder_check(task) for name, task in tasks.items()}
    per_task = {name: task_verdict(task, source, ladders[name])
                for name, task in tasks.items()}
    passing = [n for n in tasks if ladders[n]["passes"]]
    text = ["Ladder check (real data; each step at least "
            f"{RESOLVED_SE:g} clustered s.e.): " +
            "; ".join(_ladder_sentence(ladders[n]) for n in tasks) + "."]
    if passing:
        text += [_known_sentence(per_task[n]) for n in passing]
    else:
        text.append("No metric can see knowledge, so nothing is judged.")
    replicates = next(iter(tasks.values()))["replicates"]
    text.append(f"(Resolved: at least {RESOLVED_SE:g} standard errors from zero, clustered "
                f"by pretraining replicate over {replicates} replicates, so the luck of "
                "each pretraining run is in the error bars.)")
    return {"ladder": ladders, "passing": passing, "tasks": per_task, "text": " ".join(text)}
