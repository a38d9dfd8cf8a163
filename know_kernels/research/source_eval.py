"""Source generalisation: how well a starting point does on the task it was trained for,
on images it never saw.

"As if trained on more data" reads most directly here: a network trained on more images of
the source distribution classifies new images of it better, with no downstream sampling in
between.  Every starting point is scored by its own classifier on held-out source images
(never in D^0 nor in any more-data set) after its BatchNorm statistics are re-estimated on
D^0, as the linear probe does (a prediction carries Θ^0's statistics, which belong to Θ^0's
weights).  Accuracy is the headline; the mean cross-entropy beside it also moves with
calibration (a shrunken classifier lowers it without knowing more), so it is read second.
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch
from torch import nn
import torch.nn.functional as F

from .probe import recalibrate_batchnorm


@torch.no_grad()
def source_generalisation(weights: Mapping[str, torch.Tensor], model_fn: Callable[[], nn.Module],
                          images: torch.Tensor, labels: torch.Tensor,
                          calibration: torch.Tensor, batch_size: int = 1000) -> dict:
    """``{"acc": %, "ce": mean cross-entropy (nats)}`` of ``weights`` on (images, labels)."""
    model = model_fn()
    model.load_state_dict(dict(weights))
    recalibrate_batchnorm(model, calibration)
    model.eval()
    correct, loss = 0, 0.0
    for start in range(0, images.shape[0], batch_size):
        logits = model(images[start:start + batch_size]).double()
        y = labels[start:start + batch_size]
        correct += int((logits.argmax(1) == y).sum())
        loss += float(F.cross_entropy(logits, y, reduction="sum"))
    n = max(int(images.shape[0]), 1)
    return {"acc": 100.0 * correct / n, "ce": loss / n}
