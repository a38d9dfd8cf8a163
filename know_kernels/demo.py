"""The KNOW pipeline end to end on small embedded data (``know demo``).

1. Pretrain Θ^0, a small ResNet, on Fashion-MNIST's classes 0–4 (a random D^0).
2. Progressive forgetting, r = 0.5, S = 5 snapshots: Θ^1 … Θ^4 on D^1 ⊃ … ⊃ D^4.
3. Predict Θ̂^{-1}, Θ̂^{-2}, Θ̂^{-3} (×2, ×4, ×8) with KNOWN and every baseline.
4. Fine-tune Θ^0, Θ^1 and every prediction on data-scarce downstream tasks over paired
   seeds (:mod:`know_kernels.transfer`): scikit-learn's digits (resized to 28×28) and the
   held-out Fashion-MNIST classes 5–9.
5. Write results.json, results.md and results.png into the output directory, atomically.

Everything is seeded: the same configuration, seed and thread count give the same numbers.
"""
from __future__ import annotations

import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from .data import load_dataset
from .fileio import PathLike, atomic_path
from .forgetting import check_r, check_stages, derive_seed, progressive_forgetting
from .heads import KNOWN
from .predict import group_by_head
from .routing import route_state
from .store import _write_json
from .transfer import (PAPER_ORDER, FineTune, check_input_shape, check_methods, check_seeds,
                       format_table, know_candidates, plot_results, select_classes, transfer)
from .zoo import build_model, count_parameters

FORMAT = "know-kernels/demo/1"
ARCH = "resnet"
# Fashion-MNIST: 0 T-shirt/top, 1 Trouser, 2 Pullover, 3 Dress, 4 Coat | 5 Sandal, 6 Shirt,
# 7 Sneaker, 8 Bag, 9 Ankle boot.  Θ^0 never sees the second half, which makes it a
# downstream task of the same image statistics but new classes.
SOURCE_CLASSES = (0, 1, 2, 3, 4)
HELDOUT_CLASSES = (5, 6, 7, 8, 9)
TASKS = ("digits", "fashion-heldout")
OUTPUTS = ("results.json", "results.md", "results.png")


@dataclass(frozen=True)
class DemoConfig:
    seeds: int = 5                   # paired fine-tuning seeds per task
    tasks: tuple[str, ...] = TASKS
    methods: tuple[str, ...] = PAPER_ORDER
    seed: int = 0                    # D^0, Θ^0's init, the forgetting subsets and batches
    width: int = 16                  # ResNet base width (77k parameters at 16)
    source_size: int = 10000         # |D^0|
    source_test_size: int = 2000
    heldout_test_size: int = 1000
    pretrain_epochs: int = 3
    pretrain_lr: float = 2e-3
    pretrain_batch_size: int = 64
    r: float = 0.5
    stages: int = 5                  # S snapshots Θ^0 … Θ^{S-1}
    steps: int = 3                   # predictions ×1/r … ×1/r^steps
    forget_epochs: int = 1
    forget_lr: float = 1e-3
    forget_batch_size: int = 32
    finetune: FineTune = field(default_factory=lambda: FineTune(shots=10, epochs=15,
                                                                batch_size=25, lr=1e-3))

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
        return self


PRESETS = {
    # 8-12 minutes on the project's shared 2-core machine (measured in docs/demo.md).
    "default": DemoConfig(),
    # A smoke run (CI): every stage of the pipeline on a fraction of the data, ≈ 1 minute.
    "quick": DemoConfig(seeds=2, source_size=1600, source_test_size=400, heldout_test_size=200,
                        pretrain_epochs=2, forget_batch_size=16,
                        finetune=FineTune(shots=5, epochs=4, batch_size=10, lr=1e-3)),
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


def run_demo(config: DemoConfig, known: Optional[KNOWN], *, known_source: str = "KNOWN",
             data_dir: Optional[PathLike] = None, progress: bool = True,
             log: Callable[[str], None] = print) -> dict:
    """Run the pipeline; returns what results.json holds."""
    config.check()
    methods = check_methods(config.methods)
    load_start = os.getloadavg()
    started = time.perf_counter()
    timing = {}

    log("[1/4] loading Fashion-MNIST and the downstream tasks")
    source, tasks = load_tasks(config, data_dir)
    timing["data_s"] = time.perf_counter() - started

    log(f"[2/4] pretraining Θ^0 ({ARCH}, width {config.width}) on {source.name}, then "
        f"progressive forgetting (r = {config.r}, S = {config.stages})")
    t = time.perf_counter()
    torch.manual_seed(derive_seed(config.seed, 0))
    model = build_model(ARCH, source.in_shape, source.num_classes, config.width)
    if "known" in methods:
        # Before any training: the KNOWN must have the heads and S the network needs.
        try:
            group_by_head(route_state(model.state_dict()), "known", known, config.stages)
        except ValueError as exc:
            raise ValueError(f"{known_source}: {exc}") from exc
    d0 = np.random.default_rng(derive_seed(config.seed, 1)).choice(
        len(source.train), size=min(config.source_size, len(source.train)), replace=False)
    schedule = progressive_forgetting(
        model, source.train, indices=np.sort(d0), r=config.r, stages=config.stages,
        epochs_per_stage=config.forget_epochs, batch_size=config.forget_batch_size,
        lr=config.forget_lr, seed=derive_seed(config.seed, 2),
        pretrain_epochs=config.pretrain_epochs, pretrain_lr=config.pretrain_lr,
        pretrain_batch_size=config.pretrain_batch_size, test_dataset=source.test,
        progress=progress)
    timing["forgetting_s"] = time.perf_counter() - t
    log("      source test accuracy per stage (Θ^0 … Θ^{}): {}".format(
        config.stages - 1, " ".join(f"{100 * a:.1f}" for a in schedule.test_acc)))

    log(f"[3/4] predicting ×{1 / config.r:.3g} … ×{config.r ** -config.steps:.3g} with "
        f"{', '.join(methods)}")
    t = time.perf_counter()
    candidates = know_candidates(schedule.snapshots, r=config.r, methods=methods,
                                 steps=config.steps, known=known)
    timing["predict_s"] = time.perf_counter() - t

    results = {}
    for i, (name, task) in enumerate(tasks.items(), 1):
        log(f"[4/4] task {i}/{len(tasks)}: fine-tuning {len(candidates)} starting points × "
            f"{config.seeds} seeds on {name}")
        t = time.perf_counter()
        result = transfer(candidates,
                          lambda task=task: build_model(ARCH, source.in_shape, task.num_classes,
                                                        config.width),
                          task, in_shape=source.in_shape, seeds=config.seeds,
                          recipe=config.finetune, progress=progress)
        timing[f"finetune_{name}_s"] = time.perf_counter() - t
        results[name] = result.to_dict()
    timing["total_s"] = time.perf_counter() - started

    return {
        "format": FORMAT,
        "config": {**asdict(config), "arch": ARCH, "source_classes": list(SOURCE_CLASSES),
                   "heldout_classes": list(HELDOUT_CLASSES)},
        "known": {"source": known_source, "provenance": known.provenance}
        if "known" in methods else None,
        "source": {"dataset": source.name, "num_params": count_parameters(model),
                   "subset_sizes": schedule.sizes,
                   "test_acc": [100 * a for a in schedule.test_acc],
                   "stage_seconds": schedule.seconds},
        "tasks": results,
        "timing": timing,
        "machine": {"threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                    "loadavg_start": list(load_start), "loadavg_end": list(os.getloadavg()),
                    "torch": torch.__version__, "python": platform.python_version()},
    }


def format_markdown(results: dict) -> str:
    cfg, src = results["config"], results["source"]
    lines = ["# KNOW demo", "",
             f"Θ^0: {cfg['arch']} (width {cfg['width']}, {src['num_params']:,} parameters) "
             f"pretrained on {src['dataset']}; progressive forgetting r = {cfg['r']}, "
             f"S = {cfg['stages']} (subsets {src['subset_sizes']}); source test accuracy per "
             f"stage: {', '.join(f'{a:.1f}' for a in src['test_acc'])} %.",
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
    _write_json(results, paths[0])
    with atomic_path(paths[1]) as tmp:
        tmp.write_text(format_markdown(results), encoding="utf-8")
    plot_results(list(results["tasks"].values()), paths[2],
                 title=f"KNOW demo: transfer from {results['source']['dataset']}")
    return paths
