"""Progressive forgetting: the trajectories KNOWN learns from.

Two ways in:

* :class:`ForgettingSchedule`, for any training code: it draws the nested random subsets
  D^0 ⊃ D^1 ⊃ … ⊃ D^{S-1} (|D^{i+1}| = ⌊r·|D^i|⌋, seeded, indices kept) and records a
  snapshot after each stage; you keep your own loop::

      schedule = ForgettingSchedule(len(train_set), r=0.5, stages=5, seed=0)
      for stage, indices in schedule:
          if stage > 0:                     # Θ^0 is the model you start from
              my_fine_tune(model, torch.utils.data.Subset(train_set, indices))
          schedule.record(stage, model, test_acc=my_eval(model))
      trajectory = schedule.trajectory()    # -> know_kernels.io.store.Trajectory

* :func:`progressive_forgetting`, a ready plain-PyTorch loop that (optionally) trains Θ^0 on
  D^0 with a cosine schedule, then fine-tunes Θ^{i-1} on D^i for every later stage.

Stage i's cost is proportional to |D^i|; :meth:`ForgettingSchedule.time_report` compares the
measured time of stages 1..S-1, relative to training Θ^0, with the paper's estimate
(1 − r^{S−1})/(1 − r).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F
from torch.utils.data import Dataset, default_collate

from ..known.routing import Route
from ..io.store import Trajectory

OPTIMIZERS = ("adam", "sgd")


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss; the run cannot go on."""

    def __init__(self, stage: int, step: int, loss: float):
        super().__init__(f"non-finite loss {loss} at stage {stage}, step {step}")
        self.stage, self.step, self.loss = stage, step, loss


def check_r(r: float) -> float:
    r = float(r)
    if not (0.0 < r < 1.0):  # also rejects NaN
        raise ValueError(f"r must lie in (0, 1), got {r}")
    return r


def check_stages(stages: int) -> int:
    if isinstance(stages, bool) or int(stages) != stages or stages < 2:
        raise ValueError(f"stages must be an integer >= 2 (Θ^0 and at least one "
                         f"forgetting stage), got {stages}")
    return int(stages)


def subset_sizes(n0: int, r: float, stages: int) -> list[int]:
    """|D^0|, |D^1|, … with |D^{i+1}| = ⌊r·|D^i|⌋."""
    sizes = [int(n0)]
    for _ in range(check_stages(stages) - 1):
        sizes.append(math.floor(check_r(r) * sizes[-1]))
    return sizes


def derive_seed(seed: int, *path: int) -> int:
    """An independent 63-bit seed for a named purpose, so neighbouring seeds never share
    random streams (seed s's shuffles are not seed s+1's subsets)."""
    return int(np.random.SeedSequence([int(seed), *map(int, path)]).generate_state(1,
                                                                                    np.uint64)[0]
               >> np.uint64(1))


def state_refs(model_or_state) -> Mapping[str, torch.Tensor]:
    """The module's state dict (its own tensors, not copies) or the given mapping."""
    state = (model_or_state.state_dict() if isinstance(model_or_state, nn.Module)
             else model_or_state)
    if not isinstance(state, Mapping):
        raise TypeError(f"record() takes an nn.Module or a state dict, got "
                        f"{type(model_or_state).__name__}")
    return state


def _state_of(model_or_state) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in state_refs(model_or_state).items()}


class ForgettingSchedule:
    """Nested random subsets of D^0 and the snapshots Θ^0..Θ^{S-1} taken after each stage.

    ``data``: |D^0| (D^0 = 0..n-1) or the dataset indices making up D^0.  Iterating yields
    ``(stage, indices)`` for every stage, 0 first.  ``info`` is a free dict for the run's
    settings; it is merged into :meth:`metadata`.
    """

    def __init__(self, data: Union[int, Sequence[int], torch.Tensor], r: float, stages: int,
                 seed: int = 0):
        self.r = check_r(r)
        self.stages = check_stages(stages)
        self.seed = int(seed)
        if isinstance(data, (int, np.integer)):
            d0 = torch.arange(int(data))
        else:
            d0 = torch.as_tensor(data, dtype=torch.int64).reshape(-1)
            if torch.unique(d0).numel() != d0.numel():
                raise ValueError("the D^0 indices contain duplicates")
        sizes = subset_sizes(d0.numel(), self.r, self.stages)
        if sizes[-1] < 1:
            raise ValueError(f"|D^0| = {sizes[0]} is too small for r={self.r} and "
                             f"{self.stages} stages: the subsets would be {sizes}")
        self.d0_indices = d0
        generator = torch.Generator().manual_seed(derive_seed(self.seed, 0))
        # positions into D^0; each subset is a random subset of the previous one.
        self._positions = [torch.arange(d0.numel())]
        for size in sizes[1:]:
            prev = self._positions[-1]
            keep = torch.randperm(prev.numel(), generator=generator)[:size]
            self._positions.append(prev[keep.sort().values])
        self.snapshots: list[dict[str, torch.Tensor]] = []
        self.test_acc: list[Optional[float]] = []
        self.seconds: list[Optional[float]] = []
        self.samples: list[Optional[int]] = []
        self.info: dict[str, Any] = {}

    @property
    def sizes(self) -> list[int]:
        return [p.numel() for p in self._positions]

    def subset(self, stage: int) -> torch.Tensor:
        """Dataset indices of D^stage (sorted as in D^0)."""
        if not 0 <= stage < self.stages:
            raise IndexError(f"stage {stage} out of range 0..{self.stages - 1}")
        return self.d0_indices[self._positions[stage]]

    def depth(self) -> torch.Tensor:
        """For each element of D^0, the last stage whose subset holds it (uint8)."""
        depth = torch.zeros(self.d0_indices.numel(), dtype=torch.uint8)
        for stage, positions in enumerate(self._positions[1:], 1):
            depth[positions] = stage
        return depth

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor]]:
        for stage in range(self.stages):
            yield stage, self.subset(stage)

    def check_batch_size(self, batch_size: int, stages: Optional[Sequence[int]] = None) -> None:
        """The subsets of ``stages`` (default: the forgetting stages 1..S-1) must each hold
        at least one full batch."""
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        for stage in range(1, self.stages) if stages is None else stages:
            if self.sizes[stage] < batch_size:
                raise ValueError(
                    f"stage {stage}'s subset has {self.sizes[stage]} samples, fewer than one "
                    f"batch of {batch_size} (subset sizes {self.sizes}); use a larger D^0, a "
                    f"larger r, fewer stages or a smaller batch size")

    def record(self, stage: int, model_or_state, *, test_acc: Optional[float] = None,
               seconds: Optional[float] = None, samples: Optional[int] = None) -> None:
        """Keep a CPU copy of Θ^stage (stages are recorded in order, 0 first)."""
        if stage != len(self.snapshots):
            raise ValueError(f"expected stage {len(self.snapshots)} to be recorded next, "
                             f"got {stage}")
        if stage >= self.stages:
            raise ValueError(f"all {self.stages} stages are already recorded")
        state = _state_of(model_or_state)
        if self.snapshots:
            ref = self.snapshots[0]
            if list(state) != list(ref) or any(state[k].shape != ref[k].shape for k in ref):
                raise ValueError(f"stage {stage}'s state dict differs in names or shapes from "
                                 "stage 0's")
        self.snapshots.append(state)
        self.test_acc.append(None if test_acc is None else float(test_acc))
        self.seconds.append(None if seconds is None else float(seconds))
        self.samples.append(None if samples is None else int(samples))

    @property
    def complete(self) -> bool:
        return len(self.snapshots) == self.stages

    def time_report(self) -> dict[str, Optional[float]]:
        """Measured cost of the forgetting stages relative to training Θ^0, beside the
        paper's (1 − r^{S−1})/(1 − r) and the ratio of samples processed."""
        paper = (1 - self.r ** (self.stages - 1)) / (1 - self.r)
        t, n = self.seconds, self.samples
        have_t = len(t) == self.stages and all(v is not None for v in t) and t[0] > 0
        have_n = len(n) == self.stages and all(v is not None for v in n) and n[0] > 0
        return {"stage0_s": t[0] if t else None,
                "forgetting_s": sum(t[1:]) if have_t else None,
                "measured_ratio": sum(t[1:]) / t[0] if have_t else None,
                "sample_ratio": sum(n[1:]) / n[0] if have_n else None,
                "paper_ratio": paper}

    def metadata(self) -> dict[str, Any]:
        return {**self.info, "r": self.r, "stages": self.stages, "seed": self.seed,
                "subset_sizes": self.sizes, "test_acc": list(self.test_acc),
                "stage_seconds": list(self.seconds), "stage_samples": list(self.samples),
                "time": self.time_report()}

    def trajectory(self, route: Route = None, dtype=torch.float32) -> Trajectory:
        """The recorded snapshots flattened per KNOWN head, with the run's metadata and the
        subset indices (column i = Θ^i, see :mod:`know_kernels.io.store`)."""
        if not self.complete:
            raise ValueError(f"only {len(self.snapshots)} of {self.stages} stages recorded")
        traj = Trajectory.from_snapshots(self.snapshots, route, dtype, self.metadata())
        traj.d0_indices, traj.subset_depth = self.d0_indices, self.depth()
        return traj


# --------------------------------------------------------------------------- training loop

def _batches(dataset: Dataset, indices: torch.Tensor, batch_size: int,
             generator: torch.Generator, device: torch.device):
    """Full batches of a fresh shuffle of ``indices``; a trailing partial batch is dropped
    (it reappears in other epochs' shuffles) so every step sees ``batch_size`` samples."""
    order = indices[torch.randperm(indices.numel(), generator=generator)]
    tensors = getattr(dataset, "tensors", None)
    for start in range(0, order.numel() - batch_size + 1, batch_size):
        chunk = order[start:start + batch_size]
        if tensors is not None:
            x, y = tensors[0][chunk], tensors[1][chunk]
        else:
            x, y = default_collate([dataset[int(i)] for i in chunk])[:2]
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, batch_size: int = 1024) -> float:
    """Top-1 accuracy of ``model`` on ``dataset`` (in eval mode; the mode is restored)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = total = 0
    indices = torch.arange(len(dataset))
    tensors = getattr(dataset, "tensors", None)
    for start in range(0, len(indices), batch_size):
        chunk = indices[start:start + batch_size]
        if tensors is not None:
            x, y = tensors[0][chunk], tensors[1][chunk]
        else:
            x, y = default_collate([dataset[int(i)] for i in chunk])[:2]
        correct += (model(x.to(device)).argmax(1).cpu() == y).sum().item()
        total += chunk.numel()
    model.train(was_training)
    return correct / max(total, 1)


def make_optimizer(name: str, params, lr: float, momentum: float, weight_decay: float):
    """A fresh optimizer of :data:`OPTIMIZERS` (momentum for SGD only)."""
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def check_positive(name: str, value, integer: bool = False):
    """Refuse anything but a positive finite number (``integer``: a positive int), naming
    ``name`` in the error."""
    ok = (isinstance(value, (int, np.integer)) and not isinstance(value, bool)) if integer \
        else isinstance(value, (int, float)) and math.isfinite(value)
    if not ok or value <= 0:
        raise ValueError(f"{name} must be a positive {'integer' if integer else 'number'}, "
                         f"got {value!r}")


def train_steps(model, dataset, indices, *, stage, steps, batch_size, optimizer, cosine,
                generator, device, bar=None, epoch_end=None) -> int:
    """``steps`` optimizer steps of cross-entropy on full batches of ``indices``, reshuffled
    at every pass (a budget larger than one pass revisits the subset), cosine-annealed to 0
    when ``cosine``.  ``bar.update(1)`` after each step; ``epoch_end()`` after each complete
    pass.  A NaN/inf loss raises :class:`NonFiniteLossError` (``stage`` names it).  Returns
    the number of samples seen."""
    if steps > 0 and indices.numel() < batch_size:
        # No full batch: the loop below would never make a step.
        raise ValueError(f"{indices.numel()} samples hold no full batch of {batch_size}")
    scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(steps, 1))
                 if cosine else None)
    model.train()
    step = 0
    while step < steps:
        for x, y in _batches(dataset, indices, batch_size, generator, device):
            if step == steps:
                break
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            if not torch.isfinite(loss):
                raise NonFiniteLossError(stage, step, loss.item())
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            step += 1
            if bar is not None:
                bar.update(1)
        else:
            if epoch_end is not None:
                epoch_end()
                model.train()
    return step * batch_size


@dataclass(frozen=True)
class Convergence:
    """When Θ^0 counts as trained to convergence.

    Θ^0 trains in cosine cycles that each end at a learning rate of 0; after every epoch
    its accuracy on held-out source images (never part of D^0) is measured.  The criterion
    holds when the last quarter of the epochs gained less than ``tol`` points of held-out
    accuracy over the best epoch before it: a model that still improves while its learning
    rate runs out was stopped too early.  Until it holds, another cycle of the same length
    starts at half the previous peak rate, up to ``max_cycles`` cycles; the record says
    whether it held in the end.
    """
    tol: float = 0.5          # accuracy points
    max_cycles: int = 3

    def __post_init__(self):
        check_positive("tol", self.tol)
        check_positive("max_cycles", self.max_cycles, integer=True)

    def gain(self, history: Sequence[float]) -> float:
        """Points gained by the last quarter of ``history`` (held-out accuracy per epoch, as
        fractions) over the best epoch before it."""
        if len(history) < 4:
            raise ValueError(f"the criterion needs >= 4 epochs, got {len(history)}")
        head = len(history) - len(history) // 4
        return 100.0 * (max(history[head:]) - max(history[:head]))

    def holds(self, history: Sequence[float]) -> bool:
        return self.gain(history) < self.tol


def pretrain(model: nn.Module, dataset: Dataset, indices: torch.Tensor, *, epochs: int,
             lr: float, batch_size: int, optimizer: str = "adam", momentum: float = 0.9,
             weight_decay: float = 0.0, generator: torch.Generator,
             val_dataset: Optional[Dataset] = None,
             convergence: Convergence = Convergence(), eval_batch_size: int = 1024,
             bar=None) -> dict[str, Any]:
    """Train ``model`` on ``indices`` in cosine cycles of ``epochs`` epochs (see
    :class:`Convergence`; without ``val_dataset`` one cycle and no check).  Returns the
    record kept in a run's metadata: samples, epochs, cycles, the held-out accuracy per
    epoch, the last quarter's gain and whether the criterion held (None: not checked)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    device = trainable[0].device
    history: list[float] = []
    on_epoch = None if val_dataset is None else \
        (lambda: history.append(evaluate(model, val_dataset, eval_batch_size)))
    steps = epochs * (indices.numel() // batch_size)
    samples = cycles = 0
    peak = lr
    while True:
        opt = make_optimizer(optimizer, trainable, peak, momentum, weight_decay)
        samples += train_steps(model, dataset, indices, stage=0, steps=steps,
                               batch_size=batch_size, optimizer=opt, cosine=True,
                               generator=generator, device=device, bar=bar,
                               epoch_end=on_epoch)
        cycles += 1
        if val_dataset is None or convergence.holds(history) \
                or cycles == convergence.max_cycles:
            break
        peak /= 2
    return {"samples": samples, "epochs": epochs * cycles, "cycles": cycles,
            "val_acc": history,
            "gain_last_quarter": convergence.gain(history) if val_dataset is not None else None,
            "tol": convergence.tol if val_dataset is not None else None,
            "converged": convergence.holds(history) if val_dataset is not None else None}


def progressive_forgetting(model: nn.Module, dataset: Dataset, *, r: float, stages: int = 7,
                           epochs_per_stage: int = 1, stage_samples: Optional[int] = None,
                           batch_size: int = 64, lr: float = 1e-3,
                           optimizer: str = "adam", momentum: float = 0.9,
                           weight_decay: float = 0.0, seed: int = 0,
                           indices: Optional[Sequence[int]] = None,
                           pretrain_epochs: int = 0, pretrain_lr: Optional[float] = None,
                           pretrain_batch_size: Optional[int] = None,
                           val_dataset: Optional[Dataset] = None,
                           convergence: Convergence = Convergence(),
                           test_dataset: Optional[Dataset] = None,
                           eval_batch_size: int = 1024,
                           progress: bool = False) -> ForgettingSchedule:
    """Run progressive forgetting on ``model`` (modified in place: it ends as Θ^{S-1}).

    ``dataset`` is a map-style dataset of (input, label) pairs (a ``TensorDataset`` takes a
    fast path); D^0 is ``indices`` (default: all of it).  With ``pretrain_epochs > 0``, Θ^0
    is first trained on D^0 (:func:`pretrain`: optimizer ``optimizer`` at ``pretrain_lr``
    (default ``lr``), cosine cycles of ``pretrain_epochs`` epochs, batch
    ``pretrain_batch_size`` (default ``batch_size``)); given ``val_dataset`` (held-out source
    images, outside D^0), until ``convergence`` holds, and the record of that check is kept
    in ``schedule.info["pretrain"]``.  Otherwise the given model is Θ^0.

    Each later stage i fine-tunes Θ^{i-1} on D^i with a fresh optimizer at the constant rate
    ``lr``: for ``stage_samples`` samples when given (a budget that does not shrink with the
    subset, so the small late subsets are revisited many times and over-fitted: the model
    forgets what lies outside them), else for ``epochs_per_stage`` epochs of D^i.
    Cross-entropy loss; every step sees a full batch.

    Returns the :class:`ForgettingSchedule` holding the subsets, the snapshots Θ^0..Θ^{S-1},
    the test accuracy after each stage (``test_dataset``, else None), seconds and samples
    per stage.  All settings are checked before any training; a NaN/inf loss raises
    :class:`NonFiniteLossError`.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    for name, value in (("epochs_per_stage", epochs_per_stage), ("batch_size", batch_size),
                        ("eval_batch_size", eval_batch_size)):
        check_positive(name, value, integer=True)
    if stage_samples is not None:
        check_positive("stage_samples", stage_samples, integer=True)
        if stage_samples < batch_size:
            raise ValueError(f"stage_samples={stage_samples} is less than one batch of "
                             f"{batch_size}")
    check_positive("lr", lr)
    if pretrain_lr is not None:
        check_positive("pretrain_lr", pretrain_lr)
    if pretrain_batch_size is not None:
        check_positive("pretrain_batch_size", pretrain_batch_size, integer=True)
    if isinstance(pretrain_epochs, bool) or int(pretrain_epochs) != pretrain_epochs \
            or pretrain_epochs < 0:
        raise ValueError(f"pretrain_epochs must be an integer >= 0, got {pretrain_epochs!r}")
    if val_dataset is not None and 0 < pretrain_epochs < 4:
        raise ValueError(f"pretrain_epochs={pretrain_epochs}: the convergence check needs "
                         f">= 4 epochs per cycle (it compares the last quarter with the rest)")
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("model has no trainable parameters (all requires_grad=False)")

    schedule = ForgettingSchedule(len(dataset) if indices is None else indices, r, stages, seed)
    if schedule.d0_indices.numel() and (schedule.d0_indices.min() < 0
                                        or schedule.d0_indices.max() >= len(dataset)):
        raise ValueError(f"indices must lie in 0..{len(dataset) - 1}")
    schedule.check_batch_size(batch_size)
    pretrain_bs = pretrain_batch_size or batch_size
    if pretrain_epochs:
        schedule.check_batch_size(pretrain_bs, stages=[0])
    schedule.info.update(
        optimizer=optimizer, lr=float(lr), batch_size=int(batch_size),
        momentum=float(momentum) if optimizer == "sgd" else None,
        weight_decay=float(weight_decay), epochs_per_stage=int(epochs_per_stage),
        stage_budget_samples=None if stage_samples is None else int(stage_samples),
        pretrain_epochs=int(pretrain_epochs),
        pretrain_lr=float(pretrain_lr or lr) if pretrain_epochs else None,
        pretrain_batch_size=int(pretrain_bs) if pretrain_epochs else None)

    device = trainable[0].device
    generator = torch.Generator().manual_seed(derive_seed(schedule.seed, 1))

    def accuracy():
        return evaluate(model, test_dataset, eval_batch_size) if test_dataset is not None \
            else None

    sizes = schedule.sizes
    stage_steps = [stage_samples // batch_size if stage_samples is not None
                   else epochs_per_stage * (n // batch_size) for n in sizes[1:]]
    total_steps = pretrain_epochs * (sizes[0] // pretrain_bs) + sum(stage_steps)
    from tqdm.auto import tqdm
    with tqdm(total=total_steps, disable=not progress, leave=False, unit="step",
              desc="forgetting") as bar:
        seconds = samples = None
        if pretrain_epochs:
            started = time.perf_counter()
            record = pretrain(model, dataset, schedule.subset(0), epochs=pretrain_epochs,
                              lr=pretrain_lr or lr, batch_size=pretrain_bs,
                              optimizer=optimizer, momentum=momentum,
                              weight_decay=weight_decay, generator=generator,
                              val_dataset=val_dataset, convergence=convergence,
                              eval_batch_size=eval_batch_size, bar=bar)
            samples = record["samples"]
            schedule.info["pretrain"] = record
            seconds = time.perf_counter() - started
        schedule.record(0, model, test_acc=accuracy(), seconds=seconds, samples=samples)
        for stage, steps in enumerate(stage_steps, 1):
            started = time.perf_counter()
            opt = make_optimizer(optimizer, trainable, lr, momentum, weight_decay)
            samples = train_steps(model, dataset, schedule.subset(stage), stage=stage,
                                   steps=steps, batch_size=batch_size, optimizer=opt,
                                   cosine=False, generator=generator, device=device, bar=bar)
            seconds = time.perf_counter() - started
            bar.set_postfix(stage=stage)
            schedule.record(stage, model, test_acc=accuracy(), seconds=seconds,
                            samples=samples)
    return schedule
