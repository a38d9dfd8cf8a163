"""The KNOW pipeline end to end on small embedded data (``know demo``), over independent
pretraining replicates.

Each replicate (:mod:`know_kernels.research.replicate`) draws its own D^0 of Fashion-MNIST's
classes 0–4, pretrains a small ResNet Θ^0 on it to convergence, trains the same recipe on
really ×0.5, ×2 and ×4 the images (the real-data ladder), lets Θ^0 forget (r = 0.5, S = 5),
predicts ×2/×4/×8 with KNOWN and every baseline, adds a matched-noise control per
prediction, and scores every starting point on held-out source images and by linear
probes on two data-scarce downstream tasks.  The driver runs the replicates in worker
processes, pools them with standard errors clustered by replicate
(:mod:`~know_kernels.research.pooling`), computes the verdict (ladder check first,
:mod:`~know_kernels.research.verdict`) and writes results.json, results.md and results.png
atomically.

Everything is seeded by the configuration: the same configuration gives the same numbers
for any number of worker processes.
"""
from __future__ import annotations

import multiprocessing
import os
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional

import torch

from ..fileio import PathLike, atomic_path, write_json
from .demo_config import (ABLATION_S, ARCH, HELDOUT_CLASSES, SOURCE_CLASSES, SOURCE_TASK,
                          DemoConfig, check_known, load_tasks)
from ..known.heads import KNOWN
from .lincomb import LinComb
from .pooling import pool_task
from .replicate import run_replicate
from .report import format_pooled_table, plot_results
from .verdict import verdict
from .zoo import build_model, count_parameters

FORMAT = "know-kernels/demo/3"
OUTPUTS = ("results.json", "results.md", "results.png")

# A worker process's data, loaded once per process by _init_worker.
_WORKER = {}


def _init_worker(config: DemoConfig, data_dir, threads: int) -> None:
    torch.set_num_threads(threads)
    _WORKER["data"] = load_tasks(config, data_dir)


def _replicate_job(config: DemoConfig, replicate: int, known, ablation, lincomb) -> dict:
    source, tasks = _WORKER["data"]
    return run_replicate(config, replicate, source, tasks, known, ablation, lincomb)


def run_replicates(config: DemoConfig, known: Optional[KNOWN], ablation, data_dir, *,
                   jobs: int, threads: int, progress: bool, log,
                   lincomb: Optional[LinComb] = None) -> list[dict]:
    """Every replicate's results in replicate order; ``jobs`` worker processes (1: in this
    process, with progress bars)."""
    if jobs == 1:
        source, tasks = load_tasks(config, data_dir)
        return [run_replicate(config, p, source, tasks, known, ablation, lincomb, log=log,
                              progress=progress) for p in range(config.replicates)]
    # spawn: a forked child would inherit the parent's torch thread pools.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_init_worker,
                             initargs=(config, data_dir, threads)) as pool:
        futures = [pool.submit(_replicate_job, config, p, known, ablation, lincomb)
                   for p in range(config.replicates)]
        out = []
        for p, future in enumerate(futures):
            out.append(future.result())
            log(f"      replicate {p} done ({sum(out[-1]['timing'].values()):.0f} s)")
        return out


def _pooled_source(replicates: list[dict]) -> dict:
    """The forgetting record over replicates: source test accuracy per stage, its mean and
    whether the mean falls at every stage."""
    acc = [rep["source"]["test_acc"] for rep in replicates]
    mean = [sum(a[i] for a in acc) / len(acc) for i in range(len(acc[0]))]
    return {"test_acc_mean": mean,
            "forgot_every_stage": all(b < a for a, b in zip(mean, mean[1:])),
            "replicates_forgetting_every_stage": sum(rep["source"]["forgot_every_stage"]
                                                     for rep in replicates),
            "drop_mean": mean[0] - mean[-1]}


def check_lincomb(lincomb: Optional[LinComb], config: DemoConfig) -> None:
    """A lincomb rival must read no more snapshots than the demo's forgetting makes."""
    if lincomb is not None and lincomb.S > config.stages:
        raise ValueError(f"the lincomb file reads S={lincomb.S} snapshots, more than the "
                         f"demo's {config.stages} stages")


def run_demo(config: DemoConfig, known: Optional[KNOWN], *, known_source: str = "KNOWN",
             ablation: Optional[dict[int, KNOWN]] = None,
             lincomb: Optional[LinComb] = None, lincomb_source: Optional[str] = None,
             data_dir: Optional[PathLike] = None, jobs: int = 1, threads: int = 1,
             progress: bool = True, log: Callable[[str], None] = print) -> dict:
    """Run the pipeline; returns what results.json holds.  ``ablation``: the KNOWNs for
    S = 3 and 4 when ``config.s_ablation`` (default: the shipped ones); ``lincomb``: the
    lincomb rival, whose rows are judged as a baseline's."""
    config.check()
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    load_start = os.getloadavg()
    started = time.perf_counter()
    # Before any training: the data must be there and the KNOWN must fit the network.
    source, tasks = load_tasks(config, data_dir)
    model = build_model(ARCH, source.in_shape, source.num_classes, config.width)
    if "known" in config.methods:
        check_known(known, model, config, known_source)
    if config.s_ablation:
        ablation = ablation or {S: KNOWN.pretrained(S) for S in ABLATION_S}
    jobs = min(jobs, config.replicates)
    log(f"{config.replicates} pretraining replicates ({ARCH}, width {config.width}, "
        f"|D^0| = {config.source_size}) in {jobs} worker process(es); per replicate: Θ^0 to "
        f"convergence, forgetting (r = {config.r}, S = {config.stages}), real data "
        f"×{', ×'.join(f'{f:g}' for f in config.more_data)}, predictions, "
        f"{config.protocol_name} on {', '.join(config.tasks)} × {config.seeds} seeds")
    check_lincomb(lincomb, config)
    replicates = run_replicates(config, known, ablation, data_dir, jobs=jobs,
                                threads=threads, progress=progress and jobs == 1, log=log,
                                lincomb=lincomb)
    names = [SOURCE_TASK, *config.tasks]
    pooled = {name: pool_task([rep["tasks"][name] for rep in replicates]) for name in names}
    phases = {k: sum(rep["timing"][k] for rep in replicates) for k in replicates[0]["timing"]}
    out = {
        "format": FORMAT,
        "config": {**asdict(config), "arch": ARCH, "source_classes": list(SOURCE_CLASSES),
                   "heldout_classes": list(HELDOUT_CLASSES),
                   "protocol_name": config.protocol_name},
        "known": {"source": known_source, "provenance": known.provenance}
        if "known" in config.methods else None,
        "lincomb": None if lincomb is None else
        {"source": lincomb_source, "coefficients": {h: c.tolist()
                                                    for h, c in lincomb.coef.items()}},
        "source": {"dataset": source.name, "num_params": count_parameters(model),
                   "subset_sizes": replicates[0]["source"]["subset_sizes"],
                   "forgetting": _pooled_source(replicates)},
        "tasks": pooled,
        "replicates": replicates,
        "timing": {"replicate_cpu_s": phases, "total_s": time.perf_counter() - started},
        "machine": {"jobs": jobs, "threads_per_job": threads, "cpus": os.cpu_count(),
                    "loadavg_start": list(load_start), "loadavg_end": list(os.getloadavg()),
                    "torch": torch.__version__, "python": platform.python_version(),
                    "processor": platform.processor() or platform.machine()},
    }
    out["verdict"] = verdict(out)
    return out


def format_markdown(results: dict) -> str:
    cfg, src = results["config"], results["source"]
    forgetting = src["forgetting"]
    reps = results["replicates"]
    lines = ["# KNOW demo", "", "**Verdict.** " + results["verdict"]["text"], "",
             f"{cfg['replicates']} independent pretraining replicates, each: Θ^0 "
             f"{cfg['arch']} (width {cfg['width']}, {src['num_params']:,} parameters) trained "
             f"to convergence on its own {src['subset_sizes'][0]} images of {src['dataset']}; "
             f"the same recipe on really ×{', ×'.join(f'{f:g}' for f in cfg['more_data'])} "
             f"the images; progressive forgetting r = {cfg['r']}, S = {cfg['stages']} (subsets "
             f"{src['subset_sizes']}, {round(cfg['stage_budget'] * src['subset_sizes'][0])} "
             f"samples per stage at lr {cfg['forget_lr']:g}, warm-up {cfg['forget_warmup']:g}, "
             f"{'cosine' if cfg['forget_cosine'] else 'constant'}).",
             "Source test accuracy per stage (Θ^0 … Θ^{}), mean over replicates: {} % "
             "(falls at every stage: {}; in {} of {} replicates).".format(
                 cfg["stages"] - 1, ", ".join(f"{a:.2f}" for a in forgetting["test_acc_mean"]),
                 forgetting["forgot_every_stage"],
                 forgetting["replicates_forgetting_every_stage"], len(reps)),
             "Θ^0 converged in {} of {} replicates.".format(
                 sum(bool(r["source"]["pretrain"]["converged"]) for r in reps), len(reps)),
             f"Downstream protocol: {cfg['protocol_name']}.",
             f"KNOWN: {results['known']['source'] if results['known'] else 'not used'}.", ""]
    for name, task in results["tasks"].items():
        title = "source generalisation (held-out source images)" if name == SOURCE_TASK \
            else name
        lines += [f"## {title}", "",
                  format_pooled_table(task, results["verdict"]["tasks"][name]["rows"]), ""]
    t = results["timing"]
    lines.append(f"Wall time {t['total_s']:.0f} s with {results['machine']['jobs']} worker "
                 f"process(es); CPU time per phase over all replicates: " +
                 ", ".join(f"{k[:-2]} {v:.0f} s" for k, v in t["replicate_cpu_s"].items()) +
                 f"; load average {results['machine']['loadavg_start'][0]:.1f} at the start.")
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
