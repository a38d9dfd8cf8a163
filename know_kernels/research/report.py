"""A transfer result (:mod:`know_kernels.research.transfer`) as a Markdown table and as a
figure."""
from __future__ import annotations

from typing import Sequence, Union

from ..fileio import PathLike, atomic_path
from .transfer import NAIVE, TransferResult, factor_label


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
            # + 0.0 turns the -0.0 of float noise (e.g. -1e-15 rounded) into +0.00.
            diff = f"{round(row['diff_mean'], 9) + 0.0:+.2f} ± {row['diff_se']:.2f}"
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
                         linestyle="--" if method == NAIVE else "-")
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
            ax.set_title(f"{res['task']} ({len(res['seeds'])} paired seeds)")
            ax.grid(alpha=0.3)
        ax_acc.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
