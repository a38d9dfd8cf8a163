"""Linear probes: how good are a starting point's features, with the backbone frozen?

A linear probe fits a multinomial logistic regression on the frozen network's penultimate
features (the input of the classifier layer) from a few labelled images per class and
scores it on the task's test set.  It measures what the pretrained weights *know* about
the new task without the noise of fine-tuning a whole network on a handful of images,
and it costs one forward pass per image and candidate: the features are computed once per
candidate, and each seed only refits the regression on its own training images.

The regression is convex and solved to convergence (L-BFGS, float64, features
standardised with the training images' mean and deviation), so a seed's result depends
only on the features and the images it drew: the pairing of candidates is exact.

BatchNorm running statistics belong to the weights they were measured with; a predicted
Θ̂ carries Θ^0's.  Given ``calibration`` images (from the source task), every candidate's
statistics are first re-estimated on them, identically for all rows.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Optional

import torch
from torch import nn
import torch.nn.functional as F

from .backbone import load_backbone
from .training import check_positive


@dataclass(frozen=True)
class LinearProbe:
    """One probing recipe, applied identically to every candidate: ``shots`` training
    images per class (drawn per seed), L2 penalty ``l2`` on the weights, at most
    ``max_iter`` L-BFGS iterations; ``classifier`` is the state-dict prefix of the layer
    whose input is the feature vector."""
    shots: Optional[int] = 20
    l2: float = 1e-3
    max_iter: int = 200
    classifier: str = "fc"

    def __post_init__(self):
        if self.shots is not None:
            check_positive("shots", self.shots, integer=True)
        check_positive("l2", self.l2)
        check_positive("max_iter", self.max_iter, integer=True)


def _classifier_module(model: nn.Module, prefix: str) -> nn.Module:
    try:
        return model.get_submodule(prefix)
    except AttributeError as exc:
        raise ValueError(f"classifier={prefix!r} names no submodule of the network") from exc


def batchnorm_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@contextlib.contextmanager
def cumulative_batchnorm(model: nn.Module) -> Iterator[None]:
    """Inside, every BatchNorm layer averages over all the batches it sees (momentum None),
    as if it had always seen them; their momenta are restored on leaving."""
    norms = batchnorm_layers(model)
    saved = [m.momentum for m in norms]
    for m in norms:
        m.momentum = None
    try:
        yield
    finally:
        for m, momentum in zip(norms, saved):
            m.momentum = momentum


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, images: torch.Tensor,
                          batch_size: int = 500) -> None:
    """Re-estimate every BatchNorm layer's running mean and variance on ``images`` (a
    cumulative average over the batches, as if the layer had always seen them)."""
    norms = batchnorm_layers(model)
    if not norms:
        return
    was_training = model.training
    for m in norms:
        m.reset_running_stats()
    model.train()
    device = next(model.parameters()).device
    with cumulative_batchnorm(model):
        for start in range(0, images.shape[0], batch_size):
            model(images[start:start + batch_size].to(device))
    model.train(was_training)


@torch.no_grad()
def features(model: nn.Module, images: torch.Tensor, classifier: str = "fc",
             batch_size: int = 1000) -> torch.Tensor:
    """The inputs of ``classifier`` for ``images`` (model in eval mode), float64."""
    layer = _classifier_module(model, classifier)
    out = []
    hook = layer.register_forward_hook(lambda mod, inp, res: out.append(inp[0].flatten(1)))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for start in range(0, images.shape[0], batch_size):
            model(images[start:start + batch_size].to(device))
    finally:
        hook.remove()
        model.train(was_training)
    return torch.cat(out).to("cpu", torch.float64) if out else \
        torch.zeros(0, 0, dtype=torch.float64)


def fit_probe(train_x: torch.Tensor, train_y: torch.Tensor, num_classes: int,
              recipe: LinearProbe) -> Callable[[torch.Tensor], torch.Tensor]:
    """Fit the regression on (features, labels); returns a function from features to
    predicted labels."""
    mean = train_x.mean(0)
    std = train_x.std(0).nan_to_num(0.0).clamp_min(1e-6)
    a = (train_x - mean) / std
    weight = torch.zeros(a.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], max_iter=recipe.max_iter,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-9,
                            tolerance_change=1e-12)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(a @ weight + bias, train_y) + recipe.l2 * weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    weight, bias = weight.detach(), bias.detach()
    return lambda x: (((x - mean) / std) @ weight + bias).argmax(1)


def candidate_features(weights: Mapping[str, torch.Tensor], model_fn: Callable[[], nn.Module],
                       head: Mapping[str, torch.Tensor], images: torch.Tensor,
                       recipe: LinearProbe, calibration: Optional[torch.Tensor] = None,
                       device="cpu") -> torch.Tensor:
    """Features of ``images`` under ``weights`` (the classifier replaced by ``head``, which
    the features do not depend on), after BatchNorm recalibration on ``calibration``."""
    model = model_fn()
    load_backbone(model, weights, head, recipe.classifier)
    model.to(device)
    if calibration is not None:
        recalibrate_batchnorm(model, calibration)
    return features(model, images, recipe.classifier)
