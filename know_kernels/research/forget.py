"""Forget, then predict: KNOW around any training loop.

You bring the model (already trained: it is Θ^0), its training set and a function that
trains the model on a subset, in whatever loop you like; this module draws the nested
subsets D^1 ⊃ … ⊃ D^{S-1} of D^0 (:class:`ForgettingSchedule`: ``r``, ``stages``, ``seed``),
calls ``train_fn(model, subset)`` once per stage, snapshots Θ^0 … Θ^{S-1} and predicts
Θ̂^{-1} … Θ̂^{-steps} (``know_kernels.predict``)::

    def train_fn(model, subset):            # subset: torch.utils.data.Subset (+ .stage)
        fine_tune(model, DataLoader(subset, batch_size=64, shuffle=True))

    result = forget_and_predict(model, train_set, train_fn, r=0.5, stages=5, steps=2)
    model.load_state_dict(result.predictions[0])      # Θ̂^{-1}: "trained on 2× the data"

``stages`` is S, the number of snapshots KNOWN reads, so it must equal the S of its heads:
the shipped KNOWN exists for S = 3, 4 and 5 (``known=None`` picks it); any other S needs a
KNOWN meta-trained for it (``know meta-train --S …``).

Snapshots live in memory by default.  With ``out_dir`` each is written to
``out_dir/theta{i}.safetensors`` as its stage ends and dropped, and ``predict_files`` streams
those files a chunk at a time into ``out_dir/know_step{k}.safetensors``: memory then holds
the model and a few chunks, never S copies.
"""
from __future__ import annotations

import numbers
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import nn
from torch.utils.data import IterableDataset, Subset

from ..fileio import PathLike, refuse_existing, save_safetensors
from ..io.recorder import state_refs
from ..known.heads import KNOWN, PRETRAINED_S
from ..known.routing import Route, route_state
from ..pipeline.options import Options
from ..pipeline.predict import predict, predict_files
from .forgetting import ForgettingSchedule, check_stages

TrainFn = Callable[[nn.Module, "StageSubset"], Any]
StateOrPath = Union[dict[str, torch.Tensor], Path]


class StageSubset(Subset):
    """The subset D^stage of the dataset, as a ``torch.utils.data.Subset`` (indices are a
    list of ints, so any indexable dataset accepts them) that also says its ``stage``."""

    def __init__(self, dataset, indices: Sequence[int], stage: int):
        super().__init__(dataset, indices)
        self.stage = stage


def snapshot_names(stages: int) -> list[str]:
    """``theta0`` … ``theta{S-1}``: how snapshots are named in files and directories."""
    return [f"theta{i}" for i in range(stages)]


def prediction_names(steps: int) -> list[str]:
    """``know_step1`` … ``know_step{steps}``: Θ̂^{-1} … Θ̂^{-steps}."""
    return [f"know_step{k}" for k in range(1, steps + 1)]


@dataclass
class ForgetResult:
    """What a run produced, Θ^0 first.  ``snapshots`` and ``predictions`` are state dicts in
    memory mode and file (or, from the adapters, directory) paths otherwise;
    ``predictions`` is empty after :func:`forget`.  ``schedule`` holds the draw (subset
    indices, sizes, settings) and, in memory mode, the snapshots and per-stage records too."""
    schedule: ForgettingSchedule
    snapshots: list[StateOrPath] = field(default_factory=list)
    predictions: list[StateOrPath] = field(default_factory=list)
    test_acc: list[Optional[float]] = field(default_factory=list)
    seconds: list[Optional[float]] = field(default_factory=list)
    samples: list[Optional[int]] = field(default_factory=list)

    @property
    def sizes(self) -> list[int]:
        """|D^0|, |D^1|, …, |D^{S-1}|."""
        return self.schedule.sizes

    @property
    def named(self) -> dict[str, StateOrPath]:
        """``theta0``…, then ``know_step1``…, each with its state dict or path."""
        names = snapshot_names(len(self.snapshots)) + prediction_names(len(self.predictions))
        return dict(zip(names, self.snapshots + self.predictions))

    def data_sizes(self) -> dict[str, float]:
        """For each name of :attr:`named`, the training-set size it stands for: |D^i| for
        Θ^i, |D^0|/r^k for Θ̂^{-k} (the model KNOW's prediction imitates)."""
        sizes = self.sizes + [self.sizes[0] / self.schedule.r ** k
                              for k in range(1, len(self.predictions) + 1)]
        return dict(zip(self.named, sizes))


def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def _check_callable(name: str, fn, optional: bool = False) -> None:
    if (fn is None and not optional) or (fn is not None and not callable(fn)):
        raise TypeError(f"{name} must be a callable (model, subset)"
                        f"{' or None' if optional else ''}, got {type(fn).__name__}")


def _output_paths(out_dir: Optional[PathLike], names: Sequence[str],
                  force: bool) -> Optional[list[Path]]:
    """``out_dir/<name>.safetensors`` for each name, refused if one exists (unless
    ``force``) before any training can be lost to the clash."""
    if out_dir is None:
        return None
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"out_dir {out_dir} exists and is not a directory")
    paths = [out_dir / f"{name}.safetensors" for name in names]
    refuse_existing(paths, force)
    return paths


def known_for_stages(known: Union[None, KNOWN, PathLike], stages: int) -> KNOWN:
    """The KNOWN for S = ``stages`` snapshots: the shipped one when ``known`` is None, else
    ``known`` (a KNOWN or a KNOWN file), whose every head must read ``stages`` snapshots."""
    stages = check_stages(stages)
    if known is None:
        if stages not in PRETRAINED_S:
            raise ValueError(
                f"stages={stages}, but KNOWN reads exactly S snapshots and the shipped KNOWN "
                f"exists for S in {PRETRAINED_S}: use stages in {PRETRAINED_S}, or pass "
                f"known= meta-trained for S={stages} (know meta-train --S {stages})")
        return KNOWN.pretrained(stages)
    if not isinstance(known, KNOWN):
        known = KNOWN.load(known)
    wrong = {name: head.S for name, head in known.items() if head.S != stages}
    if wrong:
        raise ValueError(f"stages={stages}, but the known= heads {wrong} read a different "
                         f"number of snapshots: stages must equal the KNOWN heads' S")
    return known


def forget(model: nn.Module, dataset, train_fn: TrainFn, *, r: float, stages: int = 5,
           seed: int = 0, indices: Optional[Sequence[int]] = None,
           out_dir: Optional[PathLike] = None, pretrain_fn: Optional[TrainFn] = None,
           evaluate_fn: Optional[Callable[[nn.Module], float]] = None,
           force: bool = False) -> ForgetResult:
    """Progressive forgetting with your training code; ``model`` ends as Θ^{S-1}.

    ``dataset``: any map-style dataset (``len`` and integer indexing); D^0 is ``indices``
    (default: all of it).  ``train_fn(model, subset)`` trains ``model`` in place on
    ``subset``, a :class:`StageSubset` of D^stage, once for each stage 1 … S-1, each
    subset a random ⌊r·|previous|⌋ of the one before (seeded by ``seed``); give it a fresh
    optimizer each time.  It may return the number of samples it trained on (kept in
    ``samples`` for :meth:`ForgettingSchedule.time_report`).  ``pretrain_fn``, called the
    same way with D^0 before Θ^0 is taken, trains Θ^0 first; without it the model as given
    is Θ^0.  ``evaluate_fn(model)`` is called after every stage and its number kept in
    ``test_acc``.  ``out_dir``: see the module docstring; existing snapshot files there
    are refused unless ``force``.  Every argument is checked before any training.
    """
    _check_model(model)
    if isinstance(dataset, IterableDataset) or not (hasattr(dataset, "__len__")
                                                    and hasattr(dataset, "__getitem__")):
        raise TypeError(f"dataset must be a map-style dataset (len() and integer indexing), "
                        f"got {type(dataset).__name__}")
    _check_callable("train_fn", train_fn)
    _check_callable("pretrain_fn", pretrain_fn, optional=True)
    if evaluate_fn is not None and not callable(evaluate_fn):
        raise TypeError(f"evaluate_fn must be a callable (model) -> float or None, got "
                        f"{type(evaluate_fn).__name__}")
    schedule = ForgettingSchedule(len(dataset) if indices is None else indices, r, stages, seed)
    d0 = schedule.d0_indices
    if d0.numel() and (d0.min() < 0 or d0.max() >= len(dataset)):
        raise ValueError(f"indices must lie in 0..{len(dataset) - 1}")
    paths = _output_paths(out_dir, snapshot_names(schedule.stages), force)

    result = ForgetResult(schedule)
    for stage, subset_indices in schedule:
        fn = train_fn if stage else pretrain_fn
        seconds = samples = None
        if fn is not None:
            started = time.perf_counter()
            returned = fn(model, StageSubset(dataset, subset_indices.tolist(), stage))
            seconds = time.perf_counter() - started
            if isinstance(returned, numbers.Integral) and not isinstance(returned, bool):
                samples = int(returned)
        test_acc = None if evaluate_fn is None else float(evaluate_fn(model))
        if paths is None:
            schedule.record(stage, model, test_acc=test_acc, seconds=seconds, samples=samples)
        else:
            # A CPU copy: it may live on a GPU, and tied weights share storage, which
            # safetensors refuses to write.
            save_safetensors({k: v.detach().to("cpu", copy=True)
                              for k, v in state_refs(model).items()}, paths[stage])
        result.test_acc.append(test_acc)
        result.seconds.append(seconds)
        result.samples.append(samples)
    result.snapshots = list(schedule.snapshots) if paths is None else paths
    return result


def forget_and_predict(model: nn.Module, dataset, train_fn: TrainFn, *, r: float,
                       stages: int = 5, seed: int = 0, steps: int = 1,
                       known: Union[None, KNOWN, PathLike] = None, route: Route = None,
                       indices: Optional[Sequence[int]] = None,
                       out_dir: Optional[PathLike] = None,
                       pretrain_fn: Optional[TrainFn] = None,
                       evaluate_fn: Optional[Callable[[nn.Module], float]] = None,
                       force: bool = False) -> ForgetResult:
    """:func:`forget`, then KNOW's Θ̂^{-1} … Θ̂^{-steps} (``steps`` ≥ 1) from its snapshots.

    ``known``: a KNOWN or KNOWN file whose heads read S = ``stages`` snapshots; None takes
    the shipped one (S in 3, 4, 5).  ``route``: which head predicts which parameter
    (``know_kernels.known.routing``; None: the default rule).  In memory mode the
    predictions are state dicts; with ``out_dir`` they are ``know_step{k}.safetensors``
    there (existing ones refused unless ``force``).  The other arguments are
    :func:`forget`'s; all are checked before any training.
    """
    Options(steps=steps, route=route)  # the prediction's options, checked before training
    known = known_for_stages(known, stages)
    _check_model(model)
    # A route to an unknown head, or a head this KNOWN lacks, fails now, not after training.
    lacking = sorted({head for head in route_state(state_refs(model), route).values()
                      if head is not None and head not in known})
    if lacking:
        raise ValueError(f"the model has parameters routed to KNOWN head(s) {lacking}, which "
                         f"known= lacks (it has {list(known)}); pass route= to send them to "
                         f"another head or to None (copy Θ^0's values)")
    out_paths = _output_paths(out_dir, prediction_names(steps), force)
    result = forget(model, dataset, train_fn, r=r, stages=stages, seed=seed, indices=indices,
                    out_dir=out_dir, pretrain_fn=pretrain_fn, evaluate_fn=evaluate_fn,
                    force=force)
    if out_paths is None:
        result.predictions = predict(result.snapshots, known, steps=steps, route=route)
    else:
        # file to file, a chunk at a time: no state is ever held whole
        result.predictions = predict_files(result.snapshots, out_dir, known, steps=steps,
                                           route=route, force=force)
    return result
