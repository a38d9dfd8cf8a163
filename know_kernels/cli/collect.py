"""``know collect``: build a meta-dataset of forgetting trajectories.

    know collect --out DIR --runs M --preset quick|default [--datasets ...] [--data-dir D]
    know collect --report DIR
    know collect --out DIR --import-mat FILE.mat [FILE.mat ...]

Run k's architecture, dataset, r, learning rate and batch size are drawn as
:mod:`know_kernels.research.collection_plan` says, from (--seed, k) alone.  Every run
records what rebuilds it (:mod:`know_kernels.research.replay`): its dataset, the indices of
D^0, of every stage's subset, of its held-out images and of an extra pool E, and the
BatchNorm statistics of every stage.

The regime is the paper's: Θ^0 is trained on a random D^0 **to convergence** (cosine
cycles until held-out source accuracy stops improving, checked on ``val_size`` training
images outside D^0: :class:`know_kernels.research.training.Convergence`), then fine-tuned
stage after stage on nested subsets **to forget**: every stage trains for the same budget
of ``stage_budget`` × |D^0| samples, so the small late subsets are revisited and
over-fitted (:func:`know_kernels.research.forgetting.progressive_forgetting`).  Every run's
metadata records the convergence check and the source test accuracy after every stage.
The runs are deterministic, a finished run is skipped when collection is resumed or
extended with a larger --runs, and an interrupted run leaves no file under its final name
(files are written atomically, the index last).  ``--jobs N`` trains N runs at a time in
worker processes (one torch thread each); the parent alone writes the index.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from typing import Optional

import torch
from torch.utils.data import TensorDataset

from ..fileio import output_lock, sweep_stale
from ..io.mat_import import import_mat
from ..io.store import STORE_DTYPES, MetaDataset, save_trajectory
from ..research.collection_plan import (PRESETS, Preset, draw_settings, plan_run, recipe_of,
                                        training_samples)
from ..research.data import DataSplit, load_dataset, parse_dataset_list
from ..research.forgetting import progressive_forgetting, subset_sizes
from ..research.replay import replay_record
from ..research.training import Convergence, NonFiniteLossError
from ..research.zoo import ARCHITECTURES, build_model, count_parameters


def register(sub) -> None:
    p = sub.add_parser("collect", help="collect forgetting trajectories into a meta-dataset",
                       description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="meta-dataset directory (created, or resumed/extended)")
    p.add_argument("--runs", type=int, default=None, help="number of runs (default: preset's)")
    p.add_argument("--preset", default="default", choices=tuple(PRESETS))
    p.add_argument("--datasets", default=None,
                   help="comma-separated, from mnist, fashion-mnist, cifar10, cifar100, digits")
    p.add_argument("--archs", default=None, help=f"comma-separated, from {','.join(ARCHITECTURES)}")
    p.add_argument("--data-dir", default=None, help="directory holding MNIST/CIFAR files")
    p.add_argument("--stages", type=int, default=None, help="snapshots per run (default 7)")
    p.add_argument("--dtype", default=None, choices=tuple(STORE_DTYPES),
                   help="row storage type (default float32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default 1: robust when the cores are shared)")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs trained at a time, each in its own process (default 1)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--dry-run", action="store_true",
                   help="print each run's draws and training samples per stage, train nothing")
    p.add_argument("--report", metavar="DIR", default=None,
                   help="print the forgetting report of an existing meta-dataset and exit")
    p.add_argument("--import-mat", nargs="+", metavar="FILE", default=None,
                   help="import the authors' .mat trajectory files into --out and exit")
    p.set_defaults(func=run)


def resolve_preset(args) -> Preset:
    preset = PRESETS[args.preset]
    changes = {}
    if args.datasets is not None:
        changes["datasets"] = parse_dataset_list(args.datasets)
    if args.archs is not None:
        archs = tuple(a.strip() for a in args.archs.split(",") if a.strip())
        bad = [a for a in archs if a not in ARCHITECTURES]
        if not archs or bad:
            raise ValueError(f"--archs: unknown {bad or 'empty list'}; choose from "
                             f"{ARCHITECTURES}")
        changes["archs"] = archs
    for name in ("stages", "dtype", "threads"):
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    if changes.get("threads", 1) < 1:
        raise ValueError(f"--threads must be >= 1, got {changes['threads']}")
    if changes.get("stages", 2) < 2:
        raise ValueError(f"--stages must be >= 2, got {changes['stages']}")
    return replace(preset, **changes)


def train_run(plan: dict, preset: Preset, seed: int, data: DataSplit, path,
              progress: bool) -> tuple[str, dict]:
    """Train run ``plan`` and write its trajectory file to ``path`` (atomically).  Returns
    ("ok", {}) or ("failed", {"meta": ..., "error": ...}) for a run whose loss diverged."""
    draws = draw_settings(preset, seed, plan["index"], len(data.train))
    torch.manual_seed(plan["seed"])
    model = build_model(plan["arch"], data.in_shape, data.num_classes, plan["width"])
    meta = {k: v for k, v in plan.items() if k != "index"}
    meta.update(r=draws["r"], r_low=draws["r_low"], lr=draws["lr"],
                batch_size=draws["batch_size"], in_shape=list(data.in_shape),
                num_classes=data.num_classes, num_params=count_parameters(model),
                val_size=len(draws["val"]), test_size=len(data.test),
                threads=torch.get_num_threads(), torch=torch.__version__)
    x, y = data.train.tensors
    val = TensorDataset(x[draws["val"]], y[draws["val"]])
    started = time.perf_counter()
    try:
        schedule = progressive_forgetting(
            model, data.train, indices=draws["d0"], r=draws["r"], stages=preset.stages,
            stage_samples=draws["stage_samples"], batch_size=draws["batch_size"],
            lr=draws["lr"], optimizer=preset.optimizer, seed=plan["seed"],
            pretrain_epochs=draws["pretrain_epochs"], pretrain_lr=preset.pretrain_lr,
            pretrain_batch_size=preset.pretrain_batch_size, val_dataset=val,
            convergence=Convergence(preset.convergence_tol, preset.max_cycles),
            test_dataset=data.test, progress=progress)
    except NonFiniteLossError as exc:
        meta["subset_sizes"] = subset_sizes(len(draws["d0"]), draws["r"], preset.stages)
        return "failed", {"meta": meta, "error": str(exc)}
    schedule.info.update(meta, run_seconds=time.perf_counter() - started,
                         replay=replay_record(data.name, preset.test_size, len(draws["extra"])))
    trajectory = schedule.trajectory()
    trajectory.splits = {"val": draws["val"], "extra": draws["extra"]}
    save_trajectory(trajectory, path, preset.dtype)
    return "ok", {}


def collect_run(plan: dict, preset: Preset, seed: int, data: DataSplit, store: MetaDataset,
                progress: bool) -> str:
    """Run one plan into ``store``; returns its status ("ok" or "failed")."""
    return _finish(store, plan["run_id"],
                   *train_run(plan, preset, seed, data, store.run_path(plan["run_id"]),
                              progress))


def _finish(store: MetaDataset, run_id: str, status: str, failure: dict) -> str:
    if status == "ok":
        store.register(run_id)
    else:
        store.add_failed(run_id, failure["meta"], failure["error"])
    return status


_WORKER_DATA: Optional["DataCache"] = None


def _worker_run(plan: dict, preset: Preset, seed: int, data_dir: Optional[str],
                path: str) -> tuple[str, dict]:
    """One run in a worker process (datasets loaded once per process)."""
    global _WORKER_DATA
    torch.set_num_threads(preset.threads)
    if _WORKER_DATA is None:
        _WORKER_DATA = DataCache(preset, data_dir)
    return train_run(plan, preset, seed, _WORKER_DATA[plan["dataset"]], path, False)


class DataCache(dict):
    """Datasets loaded on first use, once per process."""

    def __init__(self, preset: Preset, data_dir: Optional[str]):
        super().__init__()
        self.preset, self.data_dir = preset, data_dir

    def __missing__(self, name: str) -> DataSplit:
        self[name] = load_dataset(name, self.data_dir, test_size=self.preset.test_size)
        return self[name]


def format_plan(preset: Preset, seed: int, runs: int, data: DataCache) -> str:
    lines = [f"{'run':<10} {'arch':<12} {'w':>3} {'dataset':<14} {'r':>5} {'lr':>8} {'bs':>4} "
             f"{'E0':>3}  training samples per stage"]
    total = 0
    for k in range(runs):
        plan = plan_run(preset, seed, k)
        draws = draw_settings(preset, seed, k, len(data[plan["dataset"]].train))
        samples = training_samples(preset, draws)
        total += sum(samples)
        lines.append(f"{plan['run_id']:<10} {plan['arch']:<12} {plan['width']:>3} "
                     f"{plan['dataset']:<14} {draws['r']:5.3f} {draws['lr']:8.2e} "
                     f"{draws['batch_size']:>4} {draws['pretrain_epochs']:>3}  "
                     f"{' '.join(map(str, samples))}")
    lines.append(f"{runs} runs, {total:,} training samples in all")
    return "\n".join(lines)


def collect(out: str, preset: Preset, preset_name: str, runs: int, seed: int = 0,
            data_dir: Optional[str] = None, quiet: bool = False, jobs: int = 1) -> MetaDataset:
    """Collect runs 0..runs-1 into ``out``, skipping those already there; ``jobs`` runs
    train at a time in worker processes."""
    if runs < 1:
        raise ValueError(f"--runs must be >= 1, got {runs}")
    if jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {jobs}")
    # One collection at a time per store: its index has a single writer.
    with output_lock(out):
        return _collect(out, preset, preset_name, runs, seed, data_dir, quiet, jobs)


def _collect(out, preset: Preset, preset_name: str, runs: int, seed: int,
             data_dir: Optional[str], quiet: bool, jobs: int) -> MetaDataset:
    store = MetaDataset(out)
    sweep_stale(store.index_path)   # what killed runs were writing
    recipe = recipe_of(preset, preset_name, seed)
    if store.recipe is None:
        store.set_recipe(recipe)
    elif store.recipe != recipe:
        diff = sorted(k for k in set(recipe) | set(store.recipe)
                      if recipe.get(k) != store.recipe.get(k))
        raise ValueError(f"{out} was collected with another recipe (differs in {diff}); "
                         "use a new --out, or the same preset, seed and options")
    todo = [plan for plan in (plan_run(preset, seed, k) for k in range(runs))
            if plan["run_id"] not in store]
    for plan in todo:
        sweep_stale(store.run_path(plan["run_id"]))
        sweep_stale(store.root / f"{plan['run_id']}.json")
    from tqdm.auto import tqdm
    bar = tqdm(total=len(todo), desc="collect", unit="run", disable=True if quiet else None)

    def done(plan, status):
        bar.update(1)
        bar.set_postfix(run=plan["run_id"], arch=plan["arch"], data=plan["dataset"])
        if status == "failed":
            error = store.runs("failed")[plan["run_id"]]["error"]
            bar.write(f"{plan['run_id']}: failed: {error}")

    if jobs == 1:
        data = DataCache(preset, data_dir)
        threads = torch.get_num_threads()
        torch.set_num_threads(preset.threads)
        try:
            for plan in todo:
                done(plan, collect_run(plan, preset, seed, data[plan["dataset"]], store,
                                       progress=not bar.disable))
        finally:
            torch.set_num_threads(threads)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(_worker_run, plan, preset, seed, data_dir,
                                   str(store.run_path(plan["run_id"]))): plan for plan in todo}
            for future in as_completed(futures):
                plan = futures[future]
                done(plan, _finish(store, plan["run_id"], *future.result()))
    bar.close()
    return store


def _num(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_report(summary: dict) -> str:
    lines = [f"{'run':<10} {'arch':<12} {'dataset':<14} {'r':>5}  "
             f"{'t/t0':>5} {'paper':>5} {'conv':>4}  test accuracy per stage (stage 0 = full D^0)"]
    for run in summary["per_run"]:
        acc = " ".join(_num(a, ".3f") for a in run["test_acc"] or [])
        lines.append(f"{run['run']:<10} {run['arch'] or '-':<12} {run['dataset'] or '-':<14} "
                     f"{_num(run['r'], '5.2f'):>5}  {_num(run['time_ratio'], '5.2f'):>5} "
                     f"{_num(run['paper_ratio'], '5.2f'):>5} "
                     f"{'-' if run['converged'] is None else 'yes' if run['converged'] else 'no':>4}"
                     f"  {acc}")
    n = summary["with_accuracy"]
    lines.append("")
    if n:
        lines.append(f"accuracy fell from stage 0 to the last stage in {summary['fell']} of {n} "
                     f"runs ({100 * summary['fell'] / n:.0f}%); mean drop "
                     f"{100 * summary['mean_drop']:.2f} points")
    if summary["convergence_checked"]:
        lines.append(f"Θ^0 met the convergence criterion in {summary['converged']} of "
                     f"{summary['convergence_checked']} runs")
    rows = summary["rows"]
    lines.append(f"{summary['runs']} finished runs, {sum(rows.values()):,} rows "
                 f"({', '.join(f'{h} {v:,}' for h, v in rows.items())}); "
                 f"architectures: {', '.join(summary['archs']) or '-'}; "
                 f"datasets: {', '.join(summary['datasets']) or '-'}")
    for run_id, error in summary["failed"].items():
        lines.append(f"failed: {run_id}: {error}")
    return "\n".join(lines)


def run(args) -> int:
    if args.report is not None:
        print(format_report(MetaDataset(args.report, create=False).summary()))
        return 0
    if args.out is None and not args.dry_run:
        raise ValueError("--out DIR is required (or --report DIR)")
    if args.import_mat is not None:
        store = MetaDataset(args.out)
        for path in args.import_mat:
            run_id = import_mat(path, store, dtype=args.dtype)
            print(f"imported {path} as {run_id}")
        return 0
    preset = resolve_preset(args)
    runs = PRESETS[args.preset].runs if args.runs is None else args.runs
    if args.dry_run:
        print(format_plan(preset, args.seed, runs, DataCache(preset, args.data_dir)))
        return 0
    store = collect(args.out, preset, args.preset, runs, args.seed, args.data_dir, args.quiet,
                    args.jobs)
    failed = len(store.runs("failed"))
    print(f"{args.out}: {len(store)} finished runs, {failed} failed, "
          f"{sum(store.num_rows(h) for h in ('conv', 'fc', 'bias')):,} rows", file=sys.stderr)
    return 0
