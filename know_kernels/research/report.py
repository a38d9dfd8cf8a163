"""A transfer result (:mod:`know_kernels.research.transfer`) as a Markdown table and as a
figure."""
from __future__ import annotations

from typing import Sequence, Union

from ..fileio import PathLike, atomic_path
from .transfer import NAIVE, TransferResult, factor_label


def _diff(mean: float, se: float) -> str:
    # + 0.0 turns the -0.0 of float noise (e.g. -1e-15 rounded) into +0.00.
    return f"{round(mean, 9) + 0.0:+.2f} ± {se:.2f}"


def format_table(result: Union[TransferResult, dict]) -> str:
    """The result as a Markdown table shaped like the paper's Table 1, with a legend."""
    res = result.to_dict() if isinstance(result, TransferResult) else result
    n = len(res["seeds"])
    lines = [f"| method | ×n | accuracy (%) | Δ vs {res['baseline']} (points) |",
             "|---|---|---:|---:|"]
    for row in res["rows"]:
        if row["method"] == NAIVE and row["step"] == 0:
            diff = "reference"
        else:
            diff = _diff(row["diff_mean"], row["diff_se"])
            if row["significant"]:
                diff += " *"
        acc = f"{row['acc_mean']:.2f} ± {row['acc_std']:.2f}"
        if row["diverged"]:
            acc += f" (diverged {len(row['diverged'])}/{n})"
        lines.append(f"| {row['name']} | {row['label']} | {acc} | {diff} |")
    lines.append("")
    lines.append(f"{res['task']}: {res['num_classes']} classes, {res['train_images_per_seed']} "
                 f"training images per seed, {res['test_images']} test images, {n} seeds. "
                 f"Accuracy: mean ± std over seeds. Δ: mean paired difference ± its standard "
                 f"error (same subset, head init and batch order per seed); "
                 f"* its 95% confidence interval (t, {n - 1} d.o.f.) excludes 0.")
    return "\n".join(lines)


def format_pooled_table(task: dict, controls: Sequence[dict] = ()) -> str:
    """A pooled demo metric (:func:`~know_kernels.research.pooling.pool_task`) as a Markdown
    table: Δ against naive transfer and, for predicted rows, against the matched-noise
    control, with the verdict's reading of each row (``controls``: the verdict's
    ``rows`` for this metric)."""
    source = "ce" in task["rows"][0]
    by_key = {(c["method"], c["factor"]): c for c in controls}
    head = "| method | ×n | accuracy (%) |" + (" cross-entropy |" if source else "") + \
        f" Δ vs {task['baseline']} (points) |" + (" Δ cross-entropy |" if source else "") + \
        " Δ vs matched noise | counts |"
    lines = [head, "|---|---|" + "---:|" * (head.count("|") - 3)]
    for row in task["rows"]:
        base = row["method"] == NAIVE and row["step"] == 0
        cells = [row["name"], row["label"], f"{row['acc_mean']:.2f} ± {row['acc_std']:.2f}"]
        if source:
            cells.append(f"{row['ce_mean']:.4f}")
        diff = "reference" if base else _diff(row["diff_mean"], row["diff_se"]) + \
            (" *" if row["significant"] else "")
        cells.append(diff)
        if source:
            cells.append("" if base else _diff(row["ce_diff_mean"], row["ce_diff_se"]))
        c = by_key.get((row["method"], row["factor"]))
        if c is None or row["control_of"] is not None:
            cells += ["", ""]
        else:
            noise = c["vs_noise"]
            cells += ["" if noise is None else _diff(noise["diff_mean"], noise["diff_se"]) +
                      (" *" if noise["resolved"] else ""), "yes" if c["counts"] else "no"]
        lines.append("| " + " | ".join(cells) + " |")
    seeds = len(task["seeds"][0])
    lines += ["", f"{task['task']}: {task['num_classes']} classes, {task['test_images']} test "
              f"images, {task['replicates']} pretraining replicates" +
              ("" if source else f" × {seeds} paired seeds "
               f"({task['train_images_per_seed']} training images per seed)") +
              ". Accuracy: mean ± std over all values. Δ: mean paired difference ± its "
              "standard error clustered by replicate; * at least 2 s.e. from 0. counts: the "
              "gain is resolved, beats its matched noise by >= 2 s.e. and (downstream) the "
              "row's source generalisation is not resolved below Θ^0's."]
    return "\n".join(lines)


def plot_results(results: Sequence[Union[TransferResult, dict]], path: PathLike,
                 title: str = "") -> None:
    """PNG: per task, accuracy (± std) and paired Δ vs naive (± s.e.) against ×n, one line
    per method (log2 axis); written atomically."""
    import matplotlib
    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    results = [r.to_dict() if isinstance(r, TransferResult) else r for r in results]
    fig, axes = plt.subplots(len(results), 2, figsize=(11, 4 * len(results)), squeeze=False)
    for (ax_acc, ax_diff), res in zip(axes, results):
        methods = list(dict.fromkeys(row["method"] for row in res["rows"]))
        for i, method in enumerate(methods):
            rows = sorted((r for r in res["rows"] if r["method"] == method),
                          key=lambda r: r["factor"])
            x = [r["factor"] for r in rows]
            style = dict(marker="os^vDP"[i % 6], capsize=3, label=rows[0]["name"],
                         linestyle="--" if method == NAIVE else
                         ":" if rows[0].get("control_of") else "-")
            ax_acc.errorbar(x, [r["acc_mean"] for r in rows], [r["acc_std"] for r in rows],
                            **style)
            ax_diff.errorbar(x, [r["diff_mean"] for r in rows], [r["diff_se"] for r in rows],
                             **style)
        ax_diff.axhline(0.0, color="grey", linewidth=0.8)
        for ax, ylabel in ((ax_acc, "test accuracy (%), mean ± std"),
                           (ax_diff, f"Δ vs {res['baseline']} (points), mean ± s.e.")):
            ax.set_xscale("log", base=2)
            factors = sorted({row["factor"] for row in res["rows"]})
            ax.set_xticks(factors, [factor_label(f) for f in factors])
            ax.minorticks_off()
            ax.set_xlabel("×n: data the weights stand for, relative to D^0")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{res['task']} ({res['replicates']} replicates × "
                         f"{len(res['seeds'][0])} seeds, s.e. clustered by replicate)"
                         if "replicates" in res else
                         f"{res['task']} ({len(res['seeds'])} paired seeds)")
            ax.grid(alpha=0.3)
        ax_acc.legend(fontsize=7, ncol=2)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
