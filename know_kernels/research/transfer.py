"""Transfer evaluation: is a KNOW prediction a better starting point than Θ^0?

Every candidate (Θ^0 = naive transfer, Θ^1 and each method's Θ̂^{-k}) gets its classifier
replaced for the downstream task and is fine-tuned with one recipe (:class:`FineTune`);
its test accuracy is then compared with naive transfer's **seed by seed**.  Seed s fixes,
identically for every candidate,

* the downstream training subset (``shots`` images per class),
* the new classifier's initial weights,
* the batch order (and torch's global random stream during fine-tuning),

so the paired difference candidate − naive cancels the seed-to-seed spread of subsets and
head inits (about 2 points on data-scarce tasks) and keeps the effect of the starting
weights (a few tenths of a point).  The report is the mean paired difference with its
standard error s_d / √n over n ≥ 2 seeds (:mod:`know_kernels.research.stats`), printed
by :mod:`know_kernels.research.report`::

    candidates = know_candidates([theta0, theta1, theta2, theta3, theta4], r=0.5, known=known)
    result = transfer(candidates, lambda: build_model("resnet", (1, 28, 28), 10), digits,
                      in_shape=(1, 28, 28), seeds=5)
    print(format_table(result))

"×n" is the amount of data a candidate stands for, as a multiple of |D^0|: Θ̂^{-k} ≈
trained on r^{-k}·|D^0| (×2, ×4, ×8 for r = 0.5), Θ^1 on r·|D^0| (×0.5).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from .backbone import classifier_keys, load_backbone
from ..kernels.baselines import DEFAULT_LAMBDA
from .data import DataSplit
from .forgetting import check_r, derive_seed
from ..known.heads import KNOWN
from ..pipeline.options import METHODS
from ..pipeline.predict import Checkpoint, load_checkpoints, predict
from .probe import LinearProbe, candidate_features, fit_probe
from .stats import MIN_SEEDS, mean_std, paired_difference, t_critical
from .training import (OPTIMIZERS, NonFiniteLossError, check_positive, make_optimizer,
                       top1_accuracy, train_steps)

NAIVE = "naive"
MORE_DATA = "more-data"
DISPLAY = {NAIVE: "Naive transfer", MORE_DATA: "More data (real)", "known": "KNOWN",
           "known-S3": "KNOWN (S = 3)", "known-S4": "KNOWN (S = 4)",
           "taskvector": "TaskVector", "linear": "LinearFit", "log": "LogFit", "exp": "ExpFit",
           "lincomb": "lincomb"}
# The paper's Table 1 order.
PAPER_ORDER = ("known", "taskvector", "linear", "log", "exp")


def check_methods(methods: Union[str, Sequence[str]]) -> tuple[str, ...]:
    """``"known,exp"`` or a sequence -> the names in paper order, each checked."""
    names = [m.strip() for m in (methods.split(",") if isinstance(methods, str) else methods)]
    names = [m for m in names if m]
    unknown = [m for m in names if m not in METHODS]
    if not names or unknown:
        raise ValueError(f"unknown method(s) {unknown or 'none given'}; valid methods are "
                         f"{', '.join(PAPER_ORDER)}")
    return tuple(m for m in PAPER_ORDER if m in names)


def check_seeds(seeds: Union[int, Sequence[int]]) -> list[int]:
    """A count n (seeds 0..n-1) or explicit seeds; at least two, since a paired standard
    error needs two differences."""
    if isinstance(seeds, (int, np.integer)) and not isinstance(seeds, bool):
        if seeds < MIN_SEEDS:
            raise ValueError(f"seeds must be >= {MIN_SEEDS} (a paired standard error needs at "
                             f"least {MIN_SEEDS} differences), got {seeds}")
        return list(range(int(seeds)))
    seeds = [int(s) for s in seeds]
    if len(seeds) < MIN_SEEDS or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must hold >= {MIN_SEEDS} distinct values, got {seeds}")
    return seeds


def check_input_shape(in_shape: Sequence[int], task: DataSplit) -> None:
    """The downstream images must have the shape the network was trained on: a silent
    mismatch could still run (global pooling accepts any size) and measure nonsense."""
    in_shape = tuple(int(v) for v in in_shape)
    if task.in_shape != in_shape:
        raise ValueError(
            f"downstream dataset {task.name!r} has input shape {task.in_shape} (C, H, W) but "
            f"the network takes {in_shape}; adapt the data deliberately, e.g. "
            f"load_dataset('digits', digits_size={in_shape[-1]}) resizes the 8x8 digits")


def factor_label(factor: float) -> str:
    return f"×{factor:.3g}"


@dataclass(frozen=True)
class Entry:
    """Which weights: ``method`` (``"naive"`` or a predict method) and ``step`` k, standing
    for r^{-k}·|D^0| data: Θ̂^{-k} for k >= 1, Θ^0 for k = 0, Θ^1 for k = -1."""
    method: str
    step: int
    factor: float

    @property
    def label(self) -> str:
        return factor_label(self.factor)

    @property
    def name(self) -> str:
        return f"{DISPLAY.get(self.method, self.method)} {self.label}"

    @property
    def is_baseline(self) -> bool:
        return self.method == NAIVE and self.step == 0


@dataclass(frozen=True)
class Candidate(Entry):
    weights: Mapping[str, torch.Tensor] = field(repr=False)


def know_candidates(checkpoints: Sequence[Checkpoint], *, r: float,
                    methods: Union[str, Sequence[str]] = PAPER_ORDER, steps: int = 3,
                    known: Optional[KNOWN] = None, lam: float = DEFAULT_LAMBDA,
                    forgotten: bool = True) -> list[Candidate]:
    """Θ^0 (naive transfer), Θ^1 (with ``forgotten``: r·|D^0| data, to show what less data
    costs) and every method's Θ̂^{-1} … Θ̂^{-steps}, from [Θ^0, …, Θ^{S-1}] (paper order).
    ``known=None`` predicts with the shipped KNOWN, as :func:`~know_kernels.pipeline.predict.predict`."""
    r = check_r(r)
    methods = check_methods(methods)
    states, _ = load_checkpoints(checkpoints)
    candidates = [Candidate(NAIVE, 0, 1.0, states[0])]
    if forgotten:
        candidates.append(Candidate(NAIVE, -1, r, states[1]))
    for method in methods:
        predicted = predict(states, known, steps=steps, method=method, lam=lam)
        candidates += [Candidate(method, k, r ** -k, w) for k, w in enumerate(predicted, 1)]
    return candidates


# ------------------------------------------------------------------------ downstream data

def select_classes(split: DataSplit, classes: Sequence[int], *, name: Optional[str] = None,
                   train_size: Optional[int] = None, test_size: Optional[int] = None,
                   seed: int = 0) -> DataSplit:
    """The images of ``classes`` only, relabelled 0..len(classes)-1 in the given order
    (a class split: pretrain on some classes, transfer to the others); optionally a seeded
    random subset of at most ``train_size``/``test_size`` images of each part."""
    classes = [int(c) for c in classes]
    bad = [c for c in classes if not 0 <= c < split.num_classes]
    if len(classes) < 2 or bad or len(set(classes)) != len(classes):
        raise ValueError(f"classes must be >= 2 distinct labels of {split.name!r} "
                         f"(0..{split.num_classes - 1}), got {classes}")
    generator = torch.Generator().manual_seed(derive_seed(seed, 0))
    relabel = torch.full((split.num_classes,), -1, dtype=torch.int64)
    relabel[classes] = torch.arange(len(classes))
    parts = []
    for part, size in ((split.train, train_size), (split.test, test_size)):
        x, y = part.tensors
        keep = torch.nonzero(relabel[y] >= 0).flatten()
        if size is not None and size < keep.numel():
            keep = keep[torch.randperm(keep.numel(), generator=generator)[:size]].sort().values
        parts.append(TensorDataset(x[keep], relabel[y[keep]]))
    return DataSplit(name or f"{split.name}{classes}", parts[0], parts[1], len(classes))


# --------------------------------------------------------------------------- fine-tuning

@dataclass(frozen=True)
class FineTune:
    """One downstream fine-tuning recipe, applied identically to every candidate.

    ``shots`` training images per class are drawn per seed (None: the whole training
    split); the whole network is trained for ``epochs`` with ``optimizer`` at ``lr``,
    cosine-annealed to 0, full batches of ``batch_size``.  ``classifier`` is the
    state-dict prefix of the layer replaced for the downstream task.
    """
    shots: Optional[int] = 10
    epochs: int = 20
    batch_size: int = 25
    lr: float = 1e-3
    optimizer: str = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    classifier: str = "fc"

    def __post_init__(self):
        if self.shots is not None:
            check_positive("shots", self.shots, integer=True)
        check_positive("epochs", self.epochs, integer=True)
        check_positive("batch_size", self.batch_size, integer=True)
        check_positive("lr", self.lr)
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")


@dataclass(frozen=True)
class SeedPlan:
    """What seed ``seed`` fixes for every candidate."""
    seed: int
    indices: torch.Tensor           # the downstream training subset
    head: dict[str, torch.Tensor]   # the new classifier's initial weights
    order_seed: int                 # batch order
    torch_seed: int                 # torch's global stream while fine-tuning


Recipe = Union[FineTune, LinearProbe]


def plan_seed(seed: int, task: DataSplit, model_fn: Callable[[], nn.Module],
              recipe: Recipe) -> SeedPlan:
    labels = task.train.tensors[1].cpu().numpy()
    if recipe.shots is None:
        indices = np.arange(len(labels))
    else:
        rng = np.random.default_rng(derive_seed(seed, 0))
        picks = []
        for c in range(task.num_classes):
            pool = np.flatnonzero(labels == c)
            if len(pool) < recipe.shots:
                raise ValueError(f"shots={recipe.shots}: class {c} of {task.name!r} has only "
                                 f"{len(pool)} training images")
            picks.append(rng.choice(pool, recipe.shots, replace=False))
        indices = np.sort(np.concatenate(picks))
    if isinstance(recipe, FineTune) and len(indices) < recipe.batch_size:
        raise ValueError(f"batch_size={recipe.batch_size} exceeds the {len(indices)} training "
                         f"images of {task.name!r} per seed; lower it or raise shots")
    # fork_rng: seeding here must not change the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, 1))
        state = model_fn().state_dict()
    keys = classifier_keys(state, recipe.classifier)
    if not keys:
        raise ValueError(f"classifier={recipe.classifier!r} names no entry of the network's "
                         f"state dict (it has {list(state)[:4]} … {list(state)[-2:]})")
    return SeedPlan(seed, torch.from_numpy(indices), {k: state[k] for k in keys},
                    derive_seed(seed, 2), derive_seed(seed, 3))


def fine_tune(weights: Mapping[str, torch.Tensor], model_fn: Callable[[], nn.Module],
              task: DataSplit, plan: SeedPlan, recipe: FineTune, *, device="cpu",
              bar=None) -> tuple[float, Optional[int]]:
    """Test accuracy (%) after fine-tuning ``weights`` as ``plan`` says, and the step at
    which the loss became NaN/inf (None if it never did).  A diverged run stops there and
    is judged by the accuracy of the weights it has then, as a user would find them."""
    model = model_fn()
    load_backbone(model, weights, plan.head, recipe.classifier)
    model.to(device)
    diverged = None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(plan.torch_seed)
        optimizer = make_optimizer(recipe.optimizer, model.parameters(), recipe.lr,
                                    recipe.momentum, recipe.weight_decay)
        try:
            train_steps(model, task.train, plan.indices, stage=0,
                         steps=recipe.epochs * (plan.indices.numel() // recipe.batch_size),
                         batch_size=recipe.batch_size, optimizer=optimizer, cosine=True,
                         generator=torch.Generator().manual_seed(plan.order_seed),
                         device=torch.device(device), bar=bar)
        except NonFiniteLossError as exc:
            diverged = exc.step
    return 100.0 * top1_accuracy(model, task.test), diverged


# ------------------------------------------------------------------------------ results

@dataclass(frozen=True)
class Row(Entry):
    acc: tuple[float, ...] = ()       # per seed, %
    base: tuple[float, ...] = ()      # naive transfer's, same seeds
    diverged: tuple[int, ...] = ()    # seeds whose fine-tuning hit a NaN/inf loss

    def summary(self) -> dict:
        acc_mean, acc_std = mean_std(self.acc)
        diff_mean, diff_se = paired_difference(self.acc, self.base)
        half = t_critical(len(self.acc)) * diff_se
        return {"method": self.method, "name": DISPLAY.get(self.method, self.method),
                "step": self.step, "factor": self.factor, "label": self.label,
                "acc": list(self.acc), "acc_mean": acc_mean, "acc_std": acc_std,
                "diff": [a - b for a, b in zip(self.acc, self.base)],
                "diff_mean": diff_mean, "diff_se": diff_se,
                "diff_ci95": [diff_mean - half, diff_mean + half],
                # A zero standard error (identical differences on every seed) measures no
                # spread, so it supports no interval either way.
                "significant": bool(diff_se > 0 and abs(diff_mean) > half),
                "diverged": list(self.diverged)}


@dataclass(frozen=True)
class TransferResult:
    task: str
    num_classes: int
    train_images: int    # per seed
    test_images: int
    seeds: tuple[int, ...]
    rows: tuple[Row, ...]
    recipe: Recipe

    def to_dict(self) -> dict:
        return {"task": self.task, "num_classes": self.num_classes,
                "train_images_per_seed": self.train_images, "test_images": self.test_images,
                "seeds": list(self.seeds), "baseline": Entry(NAIVE, 0, 1.0).name,
                "protocol": "linear-probe" if isinstance(self.recipe, LinearProbe)
                else "fine-tune", "recipe": asdict(self.recipe),
                "rows": [row.summary() for row in self.rows]}


def _probe_accuracies(candidates, model_fn, task, plans, recipe: LinearProbe, calibration,
                      device, bar) -> list[list[float]]:
    """Per candidate, per seed: test accuracy (%) of a linear probe (features once per
    candidate, one regression per seed)."""
    train_x, train_y = task.train.tensors
    test_x, test_y = task.test.tensors
    # Only the images some seed trains on need features.
    used = torch.unique(torch.cat([p.indices for p in plans]))
    position = torch.full((len(train_y),), -1, dtype=torch.int64)
    position[used] = torch.arange(used.numel())
    out = []
    for c in candidates:
        f = candidate_features(c.weights, model_fn, plans[0].head,
                               torch.cat([train_x[used], test_x]), recipe, calibration, device)
        f_train, f_test = f[:used.numel()], f[used.numel():]
        row = []
        for plan in plans:
            rows = position[plan.indices]
            classify = fit_probe(f_train[rows], train_y[plan.indices], task.num_classes, recipe)
            row.append(100.0 * float((classify(f_test) == test_y).double().mean()))
            bar.update(1)
        out.append(row)
    return out


def transfer(candidates: Sequence[Candidate], model_fn: Callable[[], nn.Module],
             task: DataSplit, *, in_shape: Sequence[int], seeds: Union[int, Sequence[int]] = 5,
             recipe: Recipe = FineTune(), calibration: Optional[torch.Tensor] = None,
             device="cpu", progress: bool = False) -> TransferResult:
    """Fine-tune (:class:`FineTune`) or linearly probe (:class:`~know_kernels.research.probe.LinearProbe`)
    every candidate on ``task`` with every seed (paired, see the module doc).

    ``model_fn()`` builds the downstream network (``task.num_classes`` outputs) whose
    classifier ``recipe.classifier`` is replaced; ``in_shape`` is the (C, H, W) the weights
    were trained on.  Exactly one candidate must be naive transfer (method "naive",
    step 0): the paired differences are taken against it.  ``calibration``: source images
    on which a probe re-estimates every candidate's BatchNorm statistics first.
    """
    check_input_shape(in_shape, task)
    seeds = check_seeds(seeds)
    if not isinstance(recipe, (FineTune, LinearProbe)):
        raise TypeError(f"recipe must be a FineTune or a LinearProbe, got "
                        f"{type(recipe).__name__}")
    if calibration is not None and not isinstance(recipe, LinearProbe):
        raise ValueError("calibration images are used by a LinearProbe only; fine-tuning "
                         "re-estimates BatchNorm statistics as it trains")
    keys = [(c.method, c.step) for c in candidates]
    if len(set(keys)) != len(keys):
        raise ValueError(f"candidates repeat a (method, step): {keys}")
    if sum(c.is_baseline for c in candidates) != 1:
        raise ValueError("exactly one candidate must be naive transfer (method 'naive', "
                         "step 0: Θ^0)")
    plans = [plan_seed(s, task, model_fn, recipe) for s in seeds]
    probing = isinstance(recipe, LinearProbe)
    steps_per_run = 1 if probing else \
        recipe.epochs * (plans[0].indices.numel() // recipe.batch_size)
    acc = {k: [] for k in keys}
    diverged = {k: [] for k in keys}
    from tqdm.auto import tqdm
    with tqdm(total=len(seeds) * len(candidates) * steps_per_run, disable=not progress,
              desc=f"{'probe' if probing else 'fine-tune'} {task.name}", unit="step",
              leave=False) as bar:
        if probing:
            for key, values in zip(keys, _probe_accuracies(candidates, model_fn, task, plans,
                                                           recipe, calibration, device, bar)):
                acc[key] = values
        else:
            for plan in plans:
                for c, key in zip(candidates, keys):
                    bar.set_postfix_str(f"seed {plan.seed}, {c.name}")
                    value, step = fine_tune(c.weights, model_fn, task, plan, recipe,
                                            device=device, bar=bar)
                    acc[key].append(value)
                    if step is not None:
                        diverged[key].append(plan.seed)
    base = tuple(acc[(NAIVE, 0)])
    rows = tuple(Row(c.method, c.step, c.factor, tuple(acc[k]), base, tuple(diverged[k]))
                 for c, k in zip(candidates, keys))
    return TransferResult(task.name, task.num_classes, plans[0].indices.numel(),
                          len(task.test), tuple(seeds), rows, recipe)
