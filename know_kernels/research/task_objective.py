"""The task objective: score a predictor's Θ̂ by the loss of the network it makes, on
images the run never trained on.

The paper meta-trains KNOWN by L1 to the next snapshot; what a user wants from Θ̂^{-1} is
what weights trained on more data have, a lower loss outside D^0.  The meta-dataset's runs
are replayable (:mod:`know_kernels.research.replay`), so that is trained for directly.
For one run with T stages and a predictor reading S snapshots:

* **inference window** (what ``predict`` does at use): Θ^{S-1} … Θ^0 → Θ̂^{-1}, unrolled
  to Θ̂^{-2} … Θ̂^{-unroll}; each scored by cross-entropy on a batch of the extra pool E;
* **in-trajectory windows**, t = 1 … T-S: Θ^{t+S-1} … Θ^t → Θ̂^{t-1}, scored on a batch
  of D^{t-1} \\ D^t, the images stage t forgot (whose truth, Θ^{t-1}, knew them).

``task`` is the mean of these cross-entropies; ``l1`` the mean over heads of the mean
|Θ̂^{t-1} − Θ^{t-1}| of the in-trajectory windows (the paper's Eq. 6 on the same windows);
``mixed`` is l1 + β·task.

**BatchNorm, one stated way**: a predicted network's BatchNorm statistics are re-estimated
on a batch of the images its window's newest snapshot was trained on (D^0 for the
inference window, D^{t-1} for the in-trajectory one), without gradient through them, and
the scored batch then runs in eval mode, as the demo's evaluation does.

Weights enter the network by ``torch.func.functional_call``, so gradients reach the
predictor's parameters through the predicted rows (``nowcast`` under autograd: the fused
VJP kernels) and nothing of the run is modified.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ..kernels.nowcast import nowcast
from ..known.heads import KNOWN
from .lincomb import LinComb
from .probe import cumulative_batchnorm
from .replay import ReplayedRun

OBJECTIVES = ("l1", "task", "mixed")
Predictor = Union[KNOWN, LinComb]


def check_objective(objective: str) -> str:
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    return objective


def predict_rows(predictor: Predictor, head: str, rows: torch.Tensor, steps: int, *,
                 backend: str = "auto") -> torch.Tensor:
    """(N, steps) predictions of (N, S) time-ordered rows, differentiable with respect to
    the predictor's parameters."""
    if isinstance(predictor, LinComb):
        return predictor.predict(head, rows, steps)
    return nowcast(rows, predictor[head], steps=steps, all_steps=True, backend=backend)


@dataclass
class RunData:
    """One replayed run held in memory: its rows per head (stage order) and network."""
    run: ReplayedRun
    rows: dict[str, torch.Tensor]
    skeleton: nn.Module
    buffers: dict[str, torch.Tensor]

    @classmethod
    def of(cls, run: ReplayedRun) -> "RunData":
        rows = {h: t.to(torch.float32) for h, t in run.trajectory.heads.items()}
        skeleton = run.network(0)
        for p in skeleton.parameters():
            p.requires_grad_(False)
        return cls(run, rows, skeleton, dict(skeleton.named_buffers()))

    @property
    def stages(self) -> int:
        return self.run.stages

    def window(self, head: str, newest: int, S: int) -> torch.Tensor:
        """Θ^{newest+S-1} … Θ^{newest} as (N, S) time-ordered rows (least data first)."""
        return self.rows[head][:, newest:newest + S].flip(1)

    def weights(self, predicted: Mapping[str, torch.Tensor],
                newest: int) -> dict[str, torch.Tensor]:
        """Parameter name -> tensor: the routed ones cut out of one predicted column per
        head, the others (e.g. BatchNorm's scale and shift, which no head predicts) those of
        Θ^newest, the window's newest snapshot, as ``predict`` copies Θ^0's."""
        traj = self.run.trajectory
        weights = {p["name"]: predicted[p["head"]][p["offset"]:p["offset"]
                                                   + math.prod(p["shape"])].reshape(p["shape"])
                   for p in traj.params}
        if traj.unrouted:
            params = dict(self.skeleton.named_parameters())
            weights.update({k: v for k, v in traj.unrouted[newest].items() if k in params})
        return weights


def recalibrated_buffers(data: RunData, weights: Mapping[str, torch.Tensor],
                         calibration: torch.Tensor) -> dict[str, torch.Tensor]:
    """Fresh BatchNorm statistics of the run's network with ``weights``, estimated on
    ``calibration`` (one cumulative pass, no gradient), leaving the network in eval mode."""
    buffers = {name: (torch.ones_like(b) if name.endswith("running_var")
                      else torch.zeros_like(b)) for name, b in data.buffers.items()}
    model = data.skeleton
    if buffers:
        with torch.no_grad(), cumulative_batchnorm(model):
            model.train()
            functional_call(model, {**{k: w.detach() for k, w in weights.items()}, **buffers},
                            (calibration,))
    model.eval()
    return buffers


def network_logits(data: RunData, weights: Mapping[str, torch.Tensor], images: torch.Tensor,
                   calibration: torch.Tensor) -> torch.Tensor:
    """The run's network with ``weights`` on ``images``, BatchNorm statistics re-estimated
    on ``calibration``; differentiable with respect to ``weights``."""
    buffers = recalibrated_buffers(data, weights, calibration)
    return functional_call(data.skeleton, {**weights, **buffers}, (images,))


def network_loss(data: RunData, weights: Mapping[str, torch.Tensor], images: torch.Tensor,
                 labels: torch.Tensor, calibration: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of :func:`network_logits` against ``labels``."""
    return F.cross_entropy(network_logits(data, weights, images, calibration), labels)


def _batch(data: RunData, which: str, stage: Optional[int], size: int,
           gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = data.run.images(which, stage)
    if x.shape[0] > size:
        pick = torch.randperm(x.shape[0], generator=gen)[:size]
        x, y = x[pick], y[pick]
    return x, y


def run_objective(predictor: Predictor, data: RunData, *, S: int, objective: str,
                  beta: float = 1.0, unroll: int = 2, images: int = 256,
                  calibration: int = 256, gen: torch.Generator,
                  backend: str = "auto") -> dict[str, torch.Tensor]:
    """The objective's terms on one run: ``loss`` (what is minimised), ``task`` and
    ``l1`` (each present when the objective uses it)."""
    check_objective(objective)
    T = data.stages
    if T <= S:
        raise ValueError(f"run {data.run.run_id!r} has {T} stages: no window of {S} inputs "
                         f"and a target")
    heads = [h for h in data.rows if h in predictor]
    missing = sorted(set(data.rows) - set(heads))
    if missing:
        raise ValueError(f"the predictor has no head for the run's {missing} rows")
    terms: dict[str, torch.Tensor] = {}
    use_task = objective in ("task", "mixed")
    # In-trajectory windows: one step each, the truth known.
    l1_parts, ce_parts = [], []
    for t in range(1, T - S + 1):
        predicted = {h: predict_rows(predictor, h, data.window(h, t, S), 1,
                                     backend=backend)[:, 0] for h in heads}
        if objective in ("l1", "mixed"):
            l1_parts.append(torch.stack([(predicted[h] - data.rows[h][:, t - 1]).abs().mean()
                                         for h in heads]).mean())
        if use_task:
            x, y = _batch(data, "forgot", t, images, gen)
            calib, _ = _batch(data, "subset", t - 1, calibration, gen)
            ce_parts.append(network_loss(data, data.weights(predicted, t), x, y, calib))
    if use_task:
        # The inference window, unrolled as predict's steps are.
        ahead = {h: predict_rows(predictor, h, data.window(h, 0, S), unroll, backend=backend)
                 for h in heads}
        for k in range(unroll):
            x, y = _batch(data, "extra", None, images, gen)
            calib, _ = _batch(data, "d0", None, calibration, gen)
            column = {h: v[:, k] for h, v in ahead.items()}
            ce_parts.append(network_loss(data, data.weights(column, 0), x, y, calib))
        terms["task"] = torch.stack(ce_parts).mean()
    if l1_parts:
        terms["l1"] = torch.stack(l1_parts).mean()
    if objective == "mixed":
        terms["loss"] = terms["l1"] + beta * terms["task"]
    else:
        terms["loss"] = terms[objective]
    return terms


@torch.no_grad()
def evaluate_run(predictor: Optional[Predictor], data: RunData, *, S: int, steps: int = 2,
                 backend: str = "auto") -> list[dict]:
    """Accuracy (%) and mean cross-entropy on all of E, BatchNorm re-estimated on all of
    D^0, for Θ^0 (``predictor=None`` gives only that) and Θ̂^{-1} … Θ̂^{-steps}."""
    x, y = data.run.images("extra")
    calib, _ = data.run.images("d0")
    columns = [{h: data.rows[h][:, 0] for h in data.rows}]
    if predictor is not None:
        ahead = {h: predict_rows(predictor, h, data.window(h, 0, S), steps, backend=backend)
                 for h in data.rows}
        columns += [{h: v[:, k] for h, v in ahead.items()} for k in range(steps)]
    out = []
    for k, column in enumerate(columns):
        logits = network_logits(data, data.weights(column, 0), x, calib).double()
        out.append({"step": k, "acc": 100.0 * float((logits.argmax(1) == y).double().mean()),
                    "ce": float(F.cross_entropy(logits, y))})
    return out
