"""``know collect``: build a meta-dataset of forgetting trajectories.

    know collect --out DIR --runs M --preset quick|default [--datasets ...] [--data-dir D]
    know collect --report DIR
    know collect --out DIR --import-mat FILE.mat [FILE.mat ...]

Run k draws its architecture and dataset from a balanced shuffle of the grid
architectures × datasets (every combination once per block of the grid's size), then
r ~ U(0.3, 0.9), a learning rate in [1e-5, 4e-3] and a batch size from the preset's menu.
The learning rate is stratified: its range is cut into ``lr_strata`` equal strata, and
each combination's visits, taken ``lr_strata`` blocks at a time, draw once from every
stratum (in a shuffled order), so no architecture's or dataset's runs all land at low or
all at high rates.  The scale is the authors' (``lr_scale="linear"``: their sampling script
draws the rate uniformly); on a log scale a third of the runs fall below 1.6e-4, where
the forgetting stages barely move a converged Θ^0 and source accuracy did not fall
(docs/collection.md).

The regime is the paper's: Θ^0 is trained on a random D^0 **to convergence** (cosine
cycles until held-out source accuracy stops improving, checked on ``val_size`` training
images outside D^0: :class:`know_kernels.research.forgetting.Convergence`), then fine-tuned stage
after stage on nested subsets **to forget**: every stage trains for the same budget of
``stage_budget`` × |D^0| samples, so the small late subsets are revisited and over-fitted
(:func:`know_kernels.research.forgetting.progressive_forgetting`).  Every run's metadata records the
convergence check and the source test accuracy after every stage.  Every draw depends only
on (--seed, k), so the runs are deterministic, a finished run is skipped when collection is
resumed or extended with a larger --runs, and an interrupted run leaves no file under its
final name (files are written atomically, the index last).  ``--jobs N`` trains N runs at a
time in worker processes (one torch thread each); the parent alone writes the index.

Two constraints tie the draws to the data: the last subset |D^{S-1}| ≈ r^{S-1}|D^0| must
hold one batch, so r's lower bound is raised where D^0 is too small for the smallest batch
size of the menu (recorded as ``r_low`` in the run's metadata), and the batch size is
drawn among the menu's sizes that fit the last subset.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Optional

import numpy as np
import torch
from torch.utils.data import TensorDataset

from ..research.data import DataSplit, load_dataset, parse_dataset_list
from ..research.forgetting import (Convergence, NonFiniteLossError, derive_seed,
                          progressive_forgetting, subset_sizes)
from ..io.mat_import import import_mat
from ..io.store import STORE_DTYPES, MetaDataset, save_trajectory
from ..research.zoo import ARCHITECTURES, DEFAULT_WIDTH, build_model, count_parameters


# Learning-rate scales: (to the scale the strata are cut on, back).
LR_SCALES = {"linear": (lambda v: v, lambda v: v), "log": (np.log, np.exp)}


@dataclass(frozen=True)
class Preset:
    """Everything that decides a collection's runs (saved in the index as the recipe)."""
    runs: int
    datasets: tuple[str, ...]
    archs: tuple[str, ...]
    widths: dict = field(default_factory=dict)  # arch -> width (missing: the zoo default)
    train_size: Optional[int] = None            # |D^0| (None: the training split less val)
    val_size: int = 1000                        # held-out source images for convergence
    test_size: Optional[int] = None             # fixed test subset per dataset
    stages: int = 7
    pretrain_samples: int = 40000               # one cosine cycle of Θ^0 (>= 4 epochs)
    pretrain_lr: float = 2e-3
    pretrain_batch_size: int = 64
    convergence_tol: float = 0.5                # points, see forgetting.Convergence
    max_cycles: int = 3
    stage_budget: float = 1.0                   # samples per forgetting stage / |D^0|
    batch_sizes: tuple[int, ...] = (8, 16, 32, 64, 128)
    r_range: tuple[float, float] = (0.3, 0.9)
    lr_range: tuple[float, float] = (1e-5, 4e-3)
    lr_scale: str = "linear"                    # or "log": strata of equal log width
    lr_strata: int = 3
    optimizer: str = "adam"
    threads: int = 1
    dtype: str = "float32"

    def __post_init__(self):
        if self.lr_scale not in LR_SCALES:
            raise ValueError(f"lr_scale must be one of {tuple(LR_SCALES)}, got "
                             f"{self.lr_scale!r}")


PRESETS = {
    # Seconds per run, for tests and smoke checks; needs only scikit-learn's digits.
    "quick": Preset(runs=3, datasets=("digits",), archs=ARCHITECTURES,
                    widths={"cnn": 4, "resnet": 4, "densenet": 4, "shufflenet": 4,
                            "mobilenetv2": 4, "mlp": 8, "vit": 8},
                    train_size=400, val_size=200, test_size=200, pretrain_samples=2400,
                    batch_sizes=(16, 32, 64)),
    # 70 runs (10 per architecture, 35 per dataset), about 35M rows, in about an hour with
    # --jobs 2 on 2 CPU cores (docs/collection.md).  |D^0| = 2,000 (digits: 1,079) keeps
    # Θ^0 short of what its data could teach: the regime where more data helps.
    "default": Preset(runs=70, datasets=("fashion-mnist", "digits"), archs=ARCHITECTURES,
                      widths={"cnn": 24, "resnet": 16, "densenet": 8, "shufflenet": 16,
                              "mobilenetv2": 16, "mlp": 192, "vit": 64},
                      train_size=2000, test_size=2000),
}


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


def recipe_of(preset: Preset, name: str, seed: int) -> dict:
    """What must match for runs to be resumed or appended (not the run count)."""
    recipe = asdict(preset)
    del recipe["runs"], recipe["threads"]
    return {"preset": name, "seed": seed,
            **{k: list(v) if isinstance(v, tuple) else v for k, v in recipe.items()}}


def feasible_r_low(n0: int, preset: Preset) -> float:
    """The smallest r in the preset's range whose last subset holds the smallest batch."""
    lo, hi = preset.r_range
    need = min(preset.batch_sizes)

    def fits(r):
        return subset_sizes(n0, r, preset.stages)[-1] >= need

    if not fits(hi):
        raise ValueError(f"|D^0| = {n0} is too small for {preset.stages} stages with r <= {hi} "
                         f"and batches of {need}")
    if fits(lo):
        return lo
    for _ in range(40):  # bisection: the last subset size grows with r
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    return hi


def grid_cell(preset: Preset, seed: int, k: int) -> tuple[int, int]:
    """Run k's block of the grid and its combination's index in the grid."""
    size = len(preset.archs) * len(preset.datasets)
    block = np.random.default_rng(derive_seed(seed, 0, k // size)).permutation(size)
    return k // size, int(block[k % size])


def plan_run(preset: Preset, seed: int, k: int) -> dict:
    """Run k's architecture, dataset and seed (the draws that need no data)."""
    grid = [(a, d) for a in preset.archs for d in preset.datasets]
    arch, dataset = grid[grid_cell(preset, seed, k)[1]]
    return {"run_id": f"run_{k:04d}", "index": k, "arch": arch, "dataset": dataset,
            "width": preset.widths.get(arch, DEFAULT_WIDTH[arch]), "seed": derive_seed(seed, 2, k)}


def lr_stratum(preset: Preset, seed: int, k: int) -> int:
    """Which of the preset's lr strata run k draws from: a combination's visits in blocks
    g·n … g·n + n - 1 (n strata) take the strata in a shuffled order."""
    block, cell = grid_cell(preset, seed, k)
    n = preset.lr_strata
    group = block // n
    order = np.random.default_rng(derive_seed(seed, 3, group, cell)).permutation(n)
    return int(order[block % n])


def draw_lr(preset: Preset, stratum: int, rng: np.random.Generator) -> float:
    """A learning rate uniform within ``stratum`` of the preset's range, cut into equal
    strata on its scale."""
    forward, back = LR_SCALES[preset.lr_scale]
    lo, hi = forward(np.asarray(preset.lr_range, dtype=np.float64))
    width = (hi - lo) / preset.lr_strata
    return float(back(rng.uniform(lo + stratum * width, lo + (stratum + 1) * width)))


def split_sizes(preset: Preset, n_train: int) -> tuple[int, int]:
    """|D^0| and the number of held-out validation images for a training split of
    ``n_train``: the validation images (at most a quarter of the split) come first."""
    n_val = min(preset.val_size, n_train // 4)
    n0 = n_train - n_val if preset.train_size is None else min(preset.train_size,
                                                               n_train - n_val)
    return n0, n_val


def draw_settings(preset: Preset, seed: int, k: int, n_train: int) -> dict:
    """Run k's D^0, validation images (disjoint from D^0), r, learning rate and batch
    size."""
    rng = np.random.default_rng(derive_seed(seed, 1, k))
    n0, n_val = split_sizes(preset, n_train)
    perm = rng.permutation(n_train)
    d0, val = np.sort(perm[:n0]), np.sort(perm[n_train - n_val:])
    r_low = feasible_r_low(n0, preset)
    r = float(rng.uniform(r_low, preset.r_range[1]))
    lr = draw_lr(preset, lr_stratum(preset, seed, k), rng)
    last = subset_sizes(n0, r, preset.stages)[-1]
    batch_size = int(rng.choice([b for b in preset.batch_sizes if b <= last]))
    return {"d0": torch.from_numpy(d0), "val": torch.from_numpy(val), "r": r,
            "r_low": r_low, "lr": lr, "batch_size": batch_size,
            "pretrain_epochs": max(4, round(preset.pretrain_samples / n0)),
            "stage_samples": max(batch_size, round(preset.stage_budget * n0))}


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
    schedule.info.update(meta, run_seconds=time.perf_counter() - started)
    save_trajectory(schedule.trajectory(), path, preset.dtype)
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


def training_samples(preset: Preset, draws: dict) -> list[int]:
    """Samples each stage trains on (full batches only), stage 0 = Θ^0's first cycle."""
    n0, pbs, bs = len(draws["d0"]), preset.pretrain_batch_size, draws["batch_size"]
    return ([draws["pretrain_epochs"] * (n0 // pbs) * pbs]
            + [draws["stage_samples"] // bs * bs] * (preset.stages - 1))


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
    store = MetaDataset(out)
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
