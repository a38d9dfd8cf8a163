"""Meta-training by the task objective (:mod:`know_kernels.research.task_objective`).

Unlike the L1 trainer (:mod:`know_kernels.research.metatrain`), which trains each head on
its own rows, the network's loss depends on all heads at once, so the predictor's heads
train together: a meta-batch is ``runs_per_batch`` training runs, each replayed whole,
and the step minimises the mean of their objectives.  Runs are visited in a seeded order
per epoch and every image batch is drawn from (seed, epoch, batch), so a resumed run sees
what an uninterrupted one would.  Validation is by whole runs (held-out architectures and
datasets), as for L1.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ..fileio import PathLike
from ..kernels.nowcast import BACKENDS
from ..kernels.reference import check_norm
from ..known.heads import KNOWN, KNOWNHead, PRETRAINED_S
from ..known.routing import HEADS
from ..io.store import MetaDataset
from .forgetting import derive_seed
from .lincomb import LinComb
from .metatrain import resumed_state, split_runs, write_checkpoint
from .replay import check_replayable, replay
from .stats import mean_std
from .task_objective import Predictor, RunData, check_objective, evaluate_run, run_objective

PREDICTORS = ("known", "lincomb")
INITS = ("l1", "fresh")


@dataclass
class TaskTrainConfig:
    S: int = 5
    objective: str = "task"
    predictor: str = "known"
    # "l1": start from the shipped paper-objective KNOWN of this S; "fresh": the authors'
    # initialisation.  (lincomb always starts at copy-last.)
    init: str = "l1"
    beta: float = 1.0            # mixed: l1 + beta * task
    lr: float = 1e-4
    epochs: int = 5
    runs_per_batch: int = 4
    images: int = 256            # scored images per window
    calibration: int = 256       # images re-estimating BatchNorm per window
    unroll: int = 2              # Θ̂^{-1} … Θ̂^{-unroll} from the inference window
    norm: str = "wnn"
    seed: int = 0
    val_architectures: tuple = ("densenet",)
    val_datasets: tuple = ()
    checkpoint_every: int = 20
    backend: str = "auto"

    def check(self) -> "TaskTrainConfig":
        check_objective(self.objective)
        check_norm(self.norm)
        if self.predictor not in PREDICTORS:
            raise ValueError(f"predictor must be one of {PREDICTORS}, got {self.predictor!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if self.predictor == "known" and self.init == "l1" and self.S not in PRETRAINED_S:
            raise ValueError(f"init 'l1' needs a shipped KNOWN for S={self.S} (there are "
                             f"{PRETRAINED_S}); use init 'fresh'")
        if self.backend not in BACKENDS + ("auto",):
            raise ValueError(f"backend must be one of {BACKENDS + ('auto',)}, "
                             f"got {self.backend!r}")
        for name in ("epochs", "runs_per_batch", "images", "calibration", "unroll",
                     "checkpoint_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not self.lr > 0 or not self.beta >= 0:
            raise ValueError(f"need lr > 0 and beta >= 0, got {self.lr} and {self.beta}")
        return self


def build_predictor(cfg: TaskTrainConfig) -> Predictor:
    if cfg.predictor == "lincomb":
        return LinComb(cfg.S)
    if cfg.init == "l1":
        return KNOWN.pretrained(cfg.S)
    return KNOWN({h: KNOWNHead(cfg.S, cfg.norm, seed=cfg.seed + i)
                  for i, h in enumerate(HEADS)})


@dataclass
class TaskState:
    config: TaskTrainConfig
    predictor: dict = field(default_factory=dict)
    optimizer: dict = field(default_factory=dict)
    epoch: int = 0
    batch: int = 0
    step: int = 0
    history: list = field(default_factory=list)     # (step, loss, task, l1)
    seconds: float = 0.0


def save_task_state(state: TaskState, path: PathLike) -> None:
    write_checkpoint({"config": json.dumps(dataclasses.asdict(state.config)),
                      "predictor": state.predictor, "optimizer": state.optimizer,
                      "epoch": state.epoch, "batch": state.batch, "step": state.step,
                      "history": json.dumps(state.history), "seconds": state.seconds}, path)


def load_task_state(path: PathLike) -> TaskState:
    blob = torch.load(path, map_location="cpu", weights_only=True)
    cfg = json.loads(blob["config"])
    cfg = TaskTrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()})
    return TaskState(cfg, blob["predictor"], blob["optimizer"], int(blob["epoch"]),
                     int(blob["batch"]), int(blob["step"]), json.loads(blob["history"]),
                     float(blob["seconds"]))


def replayed_runs(store: MetaDataset, run_ids, *, extra_ratio: float,
                  data_dir: Optional[PathLike] = None) -> dict[str, RunData]:
    """Every run checked first (a store that cannot serve fails before any work), then
    rebuilt and held in memory."""
    for run_id in run_ids:
        check_replayable(store, run_id, extra_ratio=extra_ratio)
    datasets: dict = {}
    return {run_id: RunData.of(replay(store, run_id, data_dir=data_dir, datasets=datasets))
            for run_id in run_ids}


def meta_train_task(store: MetaDataset, cfg: TaskTrainConfig, *,
                    checkpoint: Optional[PathLike] = None, resume: bool = False,
                    data_dir: Optional[PathLike] = None,
                    progress: Optional[Callable[[int, int, float], None]] = None
                    ) -> tuple[Predictor, TaskState]:
    """Train ``cfg.predictor`` on the store's training runs; checkpoint every
    ``cfg.checkpoint_every`` steps and at the end; ``resume`` continues from it."""
    cfg.check()
    state = resumed_state(checkpoint, cfg, load_task_state) if resume else TaskState(cfg)
    train_ids, _ = split_runs(store, cfg.val_architectures, cfg.val_datasets)
    if not train_ids:
        raise ValueError("no training runs left after holding out the validation runs")
    runs = replayed_runs(store, train_ids,
                         extra_ratio=0.0 if cfg.objective == "l1" else 1.0, data_dir=data_dir)
    predictor = build_predictor(cfg)
    opt = torch.optim.Adam(predictor.parameters(), lr=cfg.lr)
    if state.predictor:
        predictor.load_state_dict(state.predictor)
        opt.load_state_dict(state.optimizer)
    per_epoch = -(-len(train_ids) // cfg.runs_per_batch)
    started = time.perf_counter()

    def save():
        nonlocal started
        state.predictor, state.optimizer = predictor.state_dict(), opt.state_dict()
        state.seconds += time.perf_counter() - started
        started = time.perf_counter()
        save_task_state(state, checkpoint)

    while state.epoch < cfg.epochs:
        order = torch.randperm(len(train_ids), generator=torch.Generator().manual_seed(
            derive_seed(cfg.seed, 2, state.epoch))).tolist()
        for b in range(state.batch, per_epoch):
            group = order[b * cfg.runs_per_batch:(b + 1) * cfg.runs_per_batch]
            gen = torch.Generator().manual_seed(derive_seed(cfg.seed, 3, state.epoch, b))
            terms = [run_objective(predictor, runs[train_ids[i]], S=cfg.S,
                                   objective=cfg.objective, beta=cfg.beta, unroll=cfg.unroll,
                                   images=cfg.images, calibration=cfg.calibration, gen=gen,
                                   backend=cfg.backend) for i in group]
            loss = torch.stack([t["loss"] for t in terms]).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            state.batch, state.step = b + 1, state.step + 1
            state.history.append([state.step, float(loss.detach()),
                                  *(_mean(terms, k) for k in ("task", "l1"))])
            if checkpoint is not None and state.step % cfg.checkpoint_every == 0:
                save()
            if progress is not None:
                progress(state.step, cfg.epochs * per_epoch, float(loss.detach()))
        state.epoch, state.batch = state.epoch + 1, 0
    if checkpoint is not None:
        save()
    else:
        state.seconds += time.perf_counter() - started
    return predictor, state


def _mean(terms, key) -> Optional[float]:
    values = [float(t[key].detach()) for t in terms if key in t]
    return sum(values) / len(values) if values else None


def validate(store: MetaDataset, predictors: dict[str, Predictor], run_ids, *, S: int,
             steps: int = 2, data_dir: Optional[PathLike] = None,
             backend: str = "auto") -> dict:
    """Per run and pooled: accuracy and cross-entropy on the extra pool E for Θ^0 and each
    predictor's Θ̂^{-1} … Θ̂^{-steps} (``evaluate_run``), and each one's difference from
    Θ^0 averaged over runs."""
    runs = replayed_runs(store, run_ids, extra_ratio=1.0, data_dir=data_dir)
    per_run = {}
    for run_id, data in runs.items():
        base = evaluate_run(None, data, S=S)[0]
        per_run[run_id] = {"theta0": base, **{name: evaluate_run(p, data, S=S, steps=steps,
                                                                  backend=backend)[1:]
                                              for name, p in predictors.items()}}
    pooled = {}
    for name in predictors:
        pooled[name] = []
        for k in range(steps):
            row = {"step": k + 1}
            for metric in ("acc", "ce"):
                diffs = [r[name][k][metric] - r["theta0"][metric] for r in per_run.values()]
                row[f"d_{metric}"], row[f"d_{metric}_se"] = _mean_se(diffs)
                row[f"{metric}_better"] = sum(d > 0 if metric == "acc" else d < 0
                                              for d in diffs)
            pooled[name].append(row)
    return {"runs": per_run, "pooled": pooled}


def _mean_se(values) -> tuple[float, float]:
    """Mean over runs and its standard error (0 for a single run)."""
    mean, sd = mean_std(values)
    return mean, sd / math.sqrt(len(values))
