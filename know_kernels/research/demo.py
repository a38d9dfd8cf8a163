"""The KNOW pipeline end to end on small embedded data (``know demo``).

1. Pretrain Θ^0, a small ResNet, on Fashion-MNIST's classes 0–4 (a random D^0 of 2,000
   images) **to convergence** (:class:`~know_kernels.research.training.Convergence`, checked on
   held-out source images).
2. The yardstick: the same recipe, same initialisation, on nested D^{-1} ⊃ D^0 and
   D^{-2} ⊃ D^{-1} with 2× and 4× the images (:mod:`know_kernels.research.more_data`).
3. Progressive forgetting, r = 0.5, S = 5 snapshots: Θ^1 … Θ^4 on D^1 ⊃ … ⊃ D^4, each
   stage with the budget of one pass over D^0, so the small subsets are over-fitted.
4. Predict Θ̂^{-1}, Θ̂^{-2}, Θ̂^{-3} (×2, ×4, ×8) with KNOWN and every baseline.
5. Linear probes (:mod:`know_kernels.research.probe`) of every starting point on two data-scarce
   downstream tasks over paired seeds (:mod:`know_kernels.research.transfer`): scikit-learn's digits
   (resized to 28×28) and the held-out Fashion-MNIST classes 5–9.
6. Write results.json, results.md (opening with a verdict computed from the numbers) and
   results.png into the output directory, atomically.

Everything is seeded: the same configuration, seed and thread count give the same numbers.
"""
from __future__ import annotations

import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import torch
from torch.utils.data import TensorDataset

from .data import load_dataset
from ..fileio import PathLike, atomic_path, write_json
from .forgetting import check_r, check_stages, derive_seed, progressive_forgetting
from ..known.heads import KNOWN
from .more_data import PretrainRecipe, more_data_candidates, nested_prefixes
from ..pipeline.plan import group_by_head
from .probe import LinearProbe
from ..known.routing import route_state
from .report import format_table, plot_results
from .transfer import (PAPER_ORDER, Candidate, FineTune, check_input_shape,
                       check_methods, check_seeds, know_candidates, select_classes, transfer)
from .verdict import verdict
from .zoo import build_model, count_parameters

FORMAT = "know-kernels/demo/2"
ARCH = "resnet"
# Fashion-MNIST: 0 T-shirt/top, 1 Trouser, 2 Pullover, 3 Dress, 4 Coat | 5 Sandal, 6 Shirt,
# 7 Sneaker, 8 Bag, 9 Ankle boot.  Θ^0 never sees the second half, which makes it a
# downstream task of the same image statistics but new classes.
SOURCE_CLASSES = (0, 1, 2, 3, 4)
HELDOUT_CLASSES = (5, 6, 7, 8, 9)
TASKS = ("digits", "fashion-heldout")
OUTPUTS = ("results.json", "results.md", "results.png")
ABLATION_S = (3, 4)


@dataclass(frozen=True)
class DemoConfig:
    seeds: int = 20                  # paired downstream seeds per task
    tasks: tuple[str, ...] = TASKS
    methods: tuple[str, ...] = PAPER_ORDER
    seed: int = 0                    # D^0, Θ^0's init, the forgetting subsets and batches
    width: int = 16                  # ResNet base width (77k parameters at 16)
    source_size: int = 2000          # |D^0|
    val_size: int = 1000             # held-out source images for the convergence check
    source_test_size: int = 2000
    heldout_test_size: int = 1000
    pretrain: PretrainRecipe = field(default_factory=PretrainRecipe)
    more_data: tuple[float, ...] = (2.0, 4.0)
    r: float = 0.5
    stages: int = 5                  # S snapshots Θ^0 … Θ^{S-1}
    steps: int = 3                   # predictions ×1/r … ×1/r^steps
    stage_budget: float = 1.0        # samples per forgetting stage / |D^0|
    forget_lr: float = 1e-3
    forget_batch_size: int = 32
    # The probe, not fine-tuning, on measurement: with 10 images per class, fine-tuning
    # the whole network scored Θ^1 (half the data) above Θ^0 on the held-out classes, a
    # task that cannot see knowledge (docs/demo.md); 20-shot probes see 2× more data.
    protocol: Union[LinearProbe, FineTune] = field(default_factory=LinearProbe)
    s_ablation: bool = False         # also KNOWN with S = 3 and 4 (the paper's Table 6)

    def check(self) -> "DemoConfig":
        check_seeds(self.seeds)
        check_methods(self.methods)
        check_r(self.r)
        check_stages(self.stages)
        unknown = [t for t in self.tasks if t not in TASKS]
        if not self.tasks or unknown:
            raise ValueError(f"tasks: unknown {unknown or 'empty list'}; choose from {TASKS}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.s_ablation and ("known" not in self.methods or self.stages < max(ABLATION_S)):
            raise ValueError("the S ablation needs the KNOWN method and >= "
                             f"{max(ABLATION_S)} stages")
        return self


PRESETS = {
    # About 7 minutes on the project's 2-core machine (measured in docs/demo.md).
    "default": DemoConfig(),
    # A smoke run (CI): every stage of the pipeline on a fraction of the data, ~1.5 minutes.
    "quick": DemoConfig(seeds=5, source_size=500, val_size=300, source_test_size=400,
                        heldout_test_size=200, pretrain=PretrainRecipe(samples=6000),
                        forget_batch_size=16, protocol=LinearProbe(shots=10)),
}


def load_tasks(config: DemoConfig, data_dir: Optional[PathLike]):
    """(source split, {task name: downstream split}); Fashion-MNIST from Debian's package or
    ``data_dir``."""
    fashion = load_dataset("fashion-mnist", data_dir)
    source = select_classes(fashion, SOURCE_CLASSES, name="fashion-mnist[0-4]",
                            test_size=config.source_test_size, seed=config.seed)
    tasks = {}
    for name in config.tasks:
        if name == "digits":
            # The deliberate adapter: 8x8 digits resized to the network's input size.
            tasks[name] = load_dataset("digits", digits_size=source.in_shape[-1])
        else:
            tasks[name] = select_classes(fashion, HELDOUT_CLASSES, name=name,
                                         test_size=config.heldout_test_size, seed=config.seed)
        check_input_shape(source.in_shape, tasks[name])
    return source, tasks


def check_known(known: Optional[KNOWN], model, config: DemoConfig, source: str) -> None:
    """Before any training: the KNOWN must have the heads and S the network needs."""
    try:
        group_by_head(route_state(model.state_dict()), "known", known, config.stages)
    except ValueError as exc:
        raise ValueError(f"{source}: {exc}") from exc


def ablation_candidates(snapshots, config: DemoConfig, knowns: dict[int, KNOWN]):
    """KNOWN with fewer snapshots (S = 3, 4: Θ^0 … Θ^{S-1}, the most-data end), as rows
    ``known-S3``/``known-S4``."""
    out = []
    for S, known in knowns.items():
        for c in know_candidates(snapshots[:S], r=config.r, methods=("known",),
                                 steps=config.steps, known=known, forgotten=False)[1:]:
            out.append(Candidate(f"known-S{S}", c.step, c.factor, c.weights))
    return out


def run_demo(config: DemoConfig, known: Optional[KNOWN], *, known_source: str = "KNOWN",
             ablation: Optional[dict[int, KNOWN]] = None,
             data_dir: Optional[PathLike] = None, progress: bool = True,
             log: Callable[[str], None] = print) -> dict:
    """Run the pipeline; returns what results.json holds.  ``ablation``: the KNOWNs for
    S = 3 and 4 when ``config.s_ablation`` (default: the shipped ones)."""
    config.check()
    methods = check_methods(config.methods)
    load_start = os.getloadavg()
    started = time.perf_counter()
    timing = {}

    log("[1/5] loading Fashion-MNIST and the downstream tasks")
    source, tasks = load_tasks(config, data_dir)
    timing["data_s"] = time.perf_counter() - started

    def model_fn(num_classes=source.num_classes):
        return build_model(ARCH, source.in_shape, num_classes, config.width)

    init_seed = derive_seed(config.seed, 0)
    torch.manual_seed(init_seed)
    model = model_fn()
    if "known" in methods:
        check_known(known, model, config, known_source)
    if config.s_ablation:
        ablation = ablation or {S: KNOWN.pretrained(S) for S in ABLATION_S}
    # One seeded order of the source pool: D^0 and the more-data sets are its prefixes,
    # the held-out images for the convergence check its tail.
    order = torch.from_numpy(np.random.default_rng(derive_seed(config.seed, 1)).permutation(
        len(source.train)))
    sets = nested_prefixes(order[:len(order) - config.val_size], config.source_size,
                           config.more_data)
    x, y = source.train.tensors
    held = order[len(order) - config.val_size:]
    val = TensorDataset(x[held], y[held])
    forget_seed = derive_seed(config.seed, 2)

    log(f"[2/5] pretraining Θ^0 ({ARCH}, width {config.width}) on {len(sets[0])} images of "
        f"{source.name} to convergence, then progressive forgetting (r = {config.r}, "
        f"S = {config.stages})")
    t = time.perf_counter()
    recipe = config.pretrain
    schedule = progressive_forgetting(
        model, source.train, indices=sets[0], r=config.r, stages=config.stages,
        stage_samples=round(config.stage_budget * config.source_size),
        batch_size=config.forget_batch_size, lr=config.forget_lr, optimizer=recipe.optimizer,
        seed=forget_seed, pretrain_epochs=recipe.epochs(config.source_size),
        pretrain_lr=recipe.lr, pretrain_batch_size=recipe.batch_size, val_dataset=val,
        convergence=recipe.convergence, test_dataset=source.test, progress=progress)
    timing["forgetting_s"] = time.perf_counter() - t
    pre = schedule.info["pretrain"]
    log("      Θ^0: {} epochs, last-quarter gain {:+.2f} points, converged: {}; source test "
        "accuracy per stage (Θ^0 … Θ^{}): {}".format(
            pre["epochs"], pre["gain_last_quarter"], pre["converged"], config.stages - 1,
            " ".join(f"{100 * a:.1f}" for a in schedule.test_acc)))

    log(f"[3/5] the yardstick: the same recipe on {', '.join(str(len(s)) for s in sets[1:])} "
        "images")
    t = time.perf_counter()
    more, more_records = more_data_candidates(
        model_fn, source.train, sets, recipe, init_seed=init_seed,
        order_seed=derive_seed(forget_seed, 1), val_dataset=val, test_dataset=source.test,
        progress=lambda line: log("      " + line))
    timing["more_data_s"] = time.perf_counter() - t

    log(f"[4/5] predicting ×{1 / config.r:.3g} … ×{config.r ** -config.steps:.3g} with "
        f"{', '.join(methods)}")
    t = time.perf_counter()
    candidates = know_candidates(schedule.snapshots, r=config.r, methods=methods,
                                 steps=config.steps, known=known)
    candidates[2:2] = more   # after naive ×1 and Θ^1
    if config.s_ablation:
        candidates += ablation_candidates(schedule.snapshots, config, ablation)
    timing["predict_s"] = time.perf_counter() - t

    calibration = x[sets[0]] if isinstance(config.protocol, LinearProbe) else None
    results = {}
    for i, (name, task) in enumerate(tasks.items(), 1):
        log(f"[5/5] task {i}/{len(tasks)}: {len(candidates)} starting points × "
            f"{config.seeds} seeds on {name}")
        t = time.perf_counter()
        result = transfer(candidates, lambda task=task: model_fn(task.num_classes), task,
                          in_shape=source.in_shape, seeds=config.seeds,
                          recipe=config.protocol, calibration=calibration,
                          progress=progress)
        timing[f"transfer_{name}_s"] = time.perf_counter() - t
        results[name] = result.to_dict()
    timing["total_s"] = time.perf_counter() - started

    out = {
        "format": FORMAT,
        "config": {**asdict(config), "arch": ARCH, "source_classes": list(SOURCE_CLASSES),
                   "heldout_classes": list(HELDOUT_CLASSES),
                   "protocol_name": "linear-probe" if isinstance(config.protocol, LinearProbe)
                   else "fine-tune"},
        "known": {"source": known_source, "provenance": known.provenance}
        if "known" in methods else None,
        "source": {"dataset": source.name, "num_params": count_parameters(model),
                   "subset_sizes": schedule.sizes,
                   "test_acc": [100 * a for a in schedule.test_acc],
                   "forgot": schedule.test_acc[-1] < schedule.test_acc[0],
                   "pretrain": pre, "more_data": more_records,
                   "stage_seconds": schedule.seconds},
        "tasks": results,
        "timing": timing,
        "machine": {"threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                    "loadavg_start": list(load_start), "loadavg_end": list(os.getloadavg()),
                    "torch": torch.__version__, "python": platform.python_version()},
    }
    out["verdict"] = verdict(out)
    return out


def format_markdown(results: dict) -> str:
    cfg, src = results["config"], results["source"]
    pre = src["pretrain"]
    more = "; ".join(f"×{m['factor']:.3g} ({m['images']} images): {m['epochs']} epochs, "
                     f"converged {m['converged']}, source test accuracy {m['test_acc']:.1f} %"
                     for m in src["more_data"])
    lines = ["# KNOW demo", "", "**Verdict.** " + results["verdict"]["text"], "",
             f"Θ^0: {cfg['arch']} (width {cfg['width']}, {src['num_params']:,} parameters) "
             f"pretrained on {src['subset_sizes'][0]} images of {src['dataset']} for "
             f"{pre['epochs']} epochs (last-quarter gain {pre['gain_last_quarter']:+.2f} "
             f"points, converged: {pre['converged']}); progressive forgetting r = {cfg['r']}, "
             f"S = {cfg['stages']} (subsets {src['subset_sizes']}, "
             f"{round(cfg['stage_budget'] * src['subset_sizes'][0])} samples per stage); "
             f"source test accuracy per stage: {', '.join(f'{a:.1f}' for a in src['test_acc'])} %"
             f" (forgot: {src['forgot']}).",
             f"More data, same recipe: {more}.",
             f"Downstream protocol: {cfg['protocol_name']}.",
             f"KNOWN: {results['known']['source'] if results['known'] else 'not used'}.", ""]
    for name, res in results["tasks"].items():
        lines += [f"## {name}", "", format_table(res), ""]
    lines.append("Wall time: " + ", ".join(f"{k[:-2]} {v:.0f} s"
                                           for k, v in results["timing"].items()) +
                 f"; {results['machine']['threads']} torch thread(s), load average "
                 f"{results['machine']['loadavg_start'][0]:.1f} at the start.")
    return "\n".join(lines) + "\n"


def write_outputs(results: dict, out: PathLike) -> list[Path]:
    """results.json, results.md and results.png in ``out``, each written atomically."""
    out = Path(out)
    paths = [out / name for name in OUTPUTS]
    write_json(results, paths[0])
    with atomic_path(paths[1]) as tmp:
        tmp.write_text(format_markdown(results), encoding="utf-8")
    plot_results(list(results["tasks"].values()), paths[2],
                 title=f"KNOW demo: transfer from {results['source']['dataset']}")
    return paths
