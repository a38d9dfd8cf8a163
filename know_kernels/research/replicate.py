"""One pretraining replicate of ``know demo``: its own D^0 draw, initialisation, Θ^0,
forgetting stages and more-data models, every starting point predicted from them, and
every starting point scored on source generalisation and on each downstream task.

A replicate depends only on the configuration and its index (every seed derives from
:func:`~know_kernels.research.demo_config.replicate_seed`), so replicates can run in any
process, in any order, and give the same numbers.  It returns numbers only: the weights
stay in the worker.
"""
from __future__ import annotations

import time
from typing import Callable, Optional

import numpy as np
import torch
from torch.utils.data import TensorDataset

from .controls import noise_candidates
from .demo_config import ARCH, SOURCE_TASK, DemoConfig, replicate_seed
from .forgetting import derive_seed, progressive_forgetting
from ..known.heads import KNOWN
from ..known.routing import route_state
from .lincomb import LinComb
from .more_data import more_data_candidates, nested_prefixes
from .probe import LinearProbe
from .source_eval import source_generalisation
from .transfer import Candidate, know_candidates, transfer
from .zoo import build_model


def ablation_candidates(snapshots, config: DemoConfig, knowns: dict[int, KNOWN]):
    """KNOWN with fewer snapshots (S = 3, 4: Θ^0 … Θ^{S-1}, the most-data end), as rows
    ``known-S3``/``known-S4``."""
    out = []
    for S, known in knowns.items():
        for c in know_candidates(snapshots[:S], r=config.r, methods=("known",),
                                 steps=config.steps, known=known, forgotten=False)[1:]:
            out.append(Candidate(f"known-S{S}", c.step, c.factor, c.weights))
    return out


def lincomb_candidates(snapshots, lincomb: LinComb, steps: int, r: float) -> list[Candidate]:
    """The lincomb rival's Θ̂^{-1} … Θ̂^{-steps} from Θ^0 … Θ^{S-1} (its S), as rows
    ``lincomb``; parameters routed to a head it lacks, and unrouted ones, keep Θ^0's values
    (as ``predict`` does)."""
    states = snapshots[:lincomb.S]
    if len(states) < lincomb.S:
        raise ValueError(f"lincomb reads {lincomb.S} snapshots, the run has {len(states)}")
    predicted = [dict(states[0]) for _ in range(steps)]
    with torch.no_grad():
        for name, head in route_state(states[0]).items():
            if head is None or head not in lincomb:
                continue
            ref = states[0][name]
            rows = torch.stack([s[name].reshape(-1).float() for s in reversed(states)], 1)
            ahead = lincomb.predict(head, rows, steps)
            for k in range(steps):
                predicted[k][name] = ahead[:, k].reshape(ref.shape).to(ref.dtype)
    return [Candidate("lincomb", k, r ** -k, w) for k, w in enumerate(predicted, 1)]


def downstream_seeds(config: DemoConfig, replicate: int) -> list[int]:
    """Replicate ``replicate``'s downstream seeds: its own draws, shared by all its rows."""
    base = replicate_seed(config, replicate)
    return [int(derive_seed(base, 4, s) % 2 ** 31) for s in range(config.seeds)]


def source_rows(candidates, model_fn, source, calibration) -> dict:
    """Source generalisation of every candidate, shaped like a transfer result of one seed."""
    x, y = source.test.tensors
    rows = []
    for c in candidates:
        score = source_generalisation(c.weights, model_fn, x, y, calibration)
        rows.append({"method": c.method, "step": c.step, "factor": c.factor,
                     "acc": [score["acc"]], "ce": [score["ce"]], "diverged": []})
    return {"task": SOURCE_TASK, "num_classes": source.num_classes,
            "train_images_per_seed": None, "test_images": len(y), "seeds": [0],
            "protocol": "held-out source images", "rows": rows}


def run_replicate(config: DemoConfig, replicate: int, source, tasks: dict,
                  known: Optional[KNOWN], ablation: Optional[dict[int, KNOWN]] = None,
                  lincomb: Optional[LinComb] = None,
                  log: Callable[[str], None] = lambda line: None,
                  progress: bool = False) -> dict:
    """Everything replicate ``replicate`` measures (see the module doc); ``lincomb`` adds
    the lincomb rival's rows."""
    base = replicate_seed(config, replicate)
    timing = {}

    def model_fn(num_classes=source.num_classes):
        return build_model(ARCH, source.in_shape, num_classes, config.width)

    init_seed = derive_seed(base, 0)
    torch.manual_seed(init_seed)
    model = model_fn()
    # One seeded order of the source pool: D^0 and the more-data sets are its prefixes,
    # the held-out images for the convergence check its tail.
    order = torch.from_numpy(np.random.default_rng(derive_seed(base, 1)).permutation(
        len(source.train)))
    pool = order[:len(order) - config.val_size]
    sets = nested_prefixes(pool, config.source_size, config.more_data)
    x, y = source.train.tensors
    held = order[len(order) - config.val_size:]
    val = TensorDataset(x[held], y[held])
    forget_seed = derive_seed(base, 2)
    recipe = config.pretrain

    log(f"replicate {replicate}: Θ^0 on {config.source_size} images to convergence, then "
        f"forgetting")
    t = time.perf_counter()
    schedule = progressive_forgetting(
        model, source.train, indices=sets[0], r=config.r, stages=config.stages,
        stage_samples=round(config.stage_budget * config.source_size),
        batch_size=config.forget_batch_size, lr=config.forget_lr,
        stage_warmup=config.forget_warmup, stage_cosine=config.forget_cosine,
        optimizer=recipe.optimizer, seed=forget_seed,
        pretrain_epochs=recipe.epochs(config.source_size), pretrain_lr=recipe.lr,
        pretrain_batch_size=recipe.batch_size, val_dataset=val,
        convergence=recipe.convergence, test_dataset=source.test, progress=progress)
    timing["forgetting_s"] = time.perf_counter() - t

    log(f"replicate {replicate}: the real-data ladder on "
        f"{', '.join(str(len(s)) for s in sets[1:])} images")
    t = time.perf_counter()
    more, more_records = more_data_candidates(
        model_fn, source.train, sets, recipe, init_seed=init_seed,
        order_seed=derive_seed(forget_seed, 1), val_dataset=val, test_dataset=source.test)
    timing["more_data_s"] = time.perf_counter() - t

    t = time.perf_counter()
    predicted = know_candidates(schedule.snapshots, r=config.r, methods=config.methods,
                                steps=config.steps, known=known)
    real, predicted = predicted[:2] + more, predicted[2:]
    if config.s_ablation:
        predicted += ablation_candidates(schedule.snapshots, config, ablation)
    if lincomb is not None:
        predicted += lincomb_candidates(schedule.snapshots, lincomb, config.steps, config.r)
    controls = noise_candidates(predicted, schedule.snapshots[0], derive_seed(base, 3))
    candidates = real + predicted + controls
    timing["predict_s"] = time.perf_counter() - t

    calibration = x[sets[0]]
    log(f"replicate {replicate}: scoring {len(candidates)} starting points")
    t = time.perf_counter()
    results = {SOURCE_TASK: source_rows(candidates, model_fn, source, calibration)}
    timing["source_s"] = time.perf_counter() - t
    seeds = downstream_seeds(config, replicate)
    for name, task in tasks.items():
        t = time.perf_counter()
        result = transfer(candidates, lambda task=task: model_fn(task.num_classes), task,
                          in_shape=source.in_shape, seeds=seeds, recipe=config.protocol,
                          calibration=calibration if isinstance(config.protocol, LinearProbe)
                          else None, progress=progress)
        timing[f"transfer_{name}_s"] = time.perf_counter() - t
        results[name] = result.to_dict()
    pre = schedule.info["pretrain"]
    return {"replicate": replicate, "seed": base,
            "source": {"subset_sizes": schedule.sizes,
                       "test_acc": [100 * a for a in schedule.test_acc],
                       "forgot_every_stage": all(b < a for a, b in zip(schedule.test_acc,
                                                                      schedule.test_acc[1:])),
                       "pretrain": pre, "more_data": more_records,
                       "stage_seconds": schedule.seconds},
            "tasks": results, "timing": timing}
