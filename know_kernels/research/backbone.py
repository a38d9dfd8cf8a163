"""Starting weights in a downstream network: everything but the classifier comes from the
pretrained weights, the classifier is replaced for the new task."""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn


def classifier_keys(state: Mapping[str, torch.Tensor], prefix: str) -> list[str]:
    """The state-dict entries of the layer ``prefix`` (its weight, bias, ...)."""
    return [k for k in state if k == prefix or k.startswith(prefix + ".")]


def load_backbone(model: nn.Module, weights: Mapping[str, torch.Tensor],
                  head: Mapping[str, torch.Tensor], classifier: str) -> None:
    """Load every entry of ``weights`` but the classifier, and ``head`` as the classifier;
    any other missing, extra or misshapen entry is an error naming it."""
    own = model.state_dict()
    backbone = {k: v for k, v in weights.items() if k not in classifier_keys(weights, classifier)}
    missing = [k for k in own if k not in head and k not in backbone]
    extra = [k for k in backbone if k not in own]
    if missing or extra:
        raise ValueError(f"the weights do not fit the network: missing {missing[:5]}, "
                         f"unexpected {extra[:5]} (classifier={classifier!r} is replaced)")
    for k, v in backbone.items():
        if v.shape != own[k].shape:
            raise ValueError(f"parameter {k!r}: the weights have shape {tuple(v.shape)}, the "
                             f"network {tuple(own[k].shape)}")
    model.load_state_dict({**backbone, **head})
