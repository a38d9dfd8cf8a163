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
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from ..io.recorder import state_refs
from ..io.store import Trajectory
from ..known.routing import Route
from .training import (OPTIMIZERS, Convergence, check_positive, make_optimizer, pretrain,
                       top1_accuracy, train_steps)


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


def progressive_forgetting(model: nn.Module, dataset: Dataset, *, r: float, stages: int = 7,
                           epochs_per_stage: int = 1, stage_samples: Optional[int] = None,
                           batch_size: int = 64, lr: float = 1e-3,
                           optimizer: str = "adam", momentum: float = 0.9,
                           weight_decay: float = 0.0, seed: int = 0,
                           stage_warmup: float = 0.0, stage_cosine: bool = False,
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
    ``lr`` (after a linear warm-up over the fraction ``stage_warmup`` of its steps, and
    annealed to 0 by a cosine when ``stage_cosine``): for ``stage_samples`` samples when given (a budget that does not shrink with the
    subset, so the small late subsets are revisited many times and over-fitted: the model
    forgets what lies outside them), else for ``epochs_per_stage`` epochs of D^i.
    Cross-entropy loss; every step sees a full batch.

    Returns the :class:`ForgettingSchedule` holding the subsets, the snapshots Θ^0..Θ^{S-1},
    the test accuracy after each stage (``test_dataset``, else None), seconds and samples
    per stage.  All settings are checked before any training; a NaN/inf loss raises
    :class:`NonFiniteLossError`.  This is :func:`know_kernels.research.forget.forget` with
    these loops as its ``pretrain_fn`` and ``train_fn``.
    """
    # forget.py builds on ForgettingSchedule and so imports this module.
    from .forget import forget

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
    if not 0.0 <= stage_warmup < 1.0:  # also rejects NaN
        raise ValueError(f"stage_warmup must lie in [0, 1), got {stage_warmup!r}")
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

    # forget() draws these same seeded subsets again (and checks the indices); drawing them
    # here lets every batch size be checked before any training.
    schedule = ForgettingSchedule(len(dataset) if indices is None else indices, r, stages, seed)
    schedule.check_batch_size(batch_size)
    pretrain_bs = pretrain_batch_size or batch_size
    if pretrain_epochs:
        schedule.check_batch_size(pretrain_bs, stages=[0])
    schedule.info.update(
        optimizer=optimizer, lr=float(lr), batch_size=int(batch_size),
        momentum=float(momentum) if optimizer == "sgd" else None,
        weight_decay=float(weight_decay), stage_warmup=float(stage_warmup),
        stage_cosine=bool(stage_cosine), epochs_per_stage=int(epochs_per_stage),
        stage_budget_samples=None if stage_samples is None else int(stage_samples),
        pretrain_epochs=int(pretrain_epochs),
        pretrain_lr=float(pretrain_lr or lr) if pretrain_epochs else None,
        pretrain_batch_size=int(pretrain_bs) if pretrain_epochs else None)

    device = trainable[0].device
    generator = torch.Generator().manual_seed(derive_seed(schedule.seed, 1))

    def accuracy(model):
        return top1_accuracy(model, test_dataset, eval_batch_size)

    sizes = schedule.sizes
    stage_steps = [stage_samples // batch_size if stage_samples is not None
                   else epochs_per_stage * (n // batch_size) for n in sizes[1:]]
    total_steps = pretrain_epochs * (sizes[0] // pretrain_bs) + sum(stage_steps)
    from tqdm.auto import tqdm
    with tqdm(total=total_steps, disable=not progress, leave=False, unit="step",
              desc="forgetting") as bar:
        def pretrain_d0(model, subset):
            record = pretrain(model, dataset, torch.as_tensor(subset.indices),
                              epochs=pretrain_epochs, lr=pretrain_lr or lr,
                              batch_size=pretrain_bs, optimizer=optimizer, momentum=momentum,
                              weight_decay=weight_decay, generator=generator,
                              val_dataset=val_dataset, convergence=convergence,
                              eval_batch_size=eval_batch_size, bar=bar)
            schedule.info["pretrain"] = record
            return record["samples"]

        def fine_tune(model, subset):
            opt = make_optimizer(optimizer, trainable, lr, momentum, weight_decay)
            steps = stage_steps[subset.stage - 1]
            samples = train_steps(model, dataset, torch.as_tensor(subset.indices),
                                  stage=subset.stage, steps=steps,
                                  batch_size=batch_size, optimizer=opt, cosine=stage_cosine,
                                  generator=generator, device=device, bar=bar,
                                  warmup=round(stage_warmup * steps))
            bar.set_postfix(stage=subset.stage)
            return samples

        result = forget(model, dataset, fine_tune, r=r, stages=stages, seed=seed,
                        indices=schedule.d0_indices,
                        pretrain_fn=pretrain_d0 if pretrain_epochs else None,
                        evaluate_fn=None if test_dataset is None else accuracy)
    result.schedule.info.update(schedule.info)
    return result.schedule
