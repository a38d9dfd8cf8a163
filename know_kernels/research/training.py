"""Training primitives shared by progressive forgetting, the more-data yardstick and
downstream fine-tuning: full-batch cross-entropy steps, Θ^0's pretraining to convergence,
top-1 accuracy and the checks of their settings.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F
from torch.utils.data import Dataset, default_collate

OPTIMIZERS = ("adam", "sgd")


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss; the run cannot go on."""

    def __init__(self, stage: int, step: int, loss: float):
        super().__init__(f"non-finite loss {loss} at stage {stage}, step {step}")
        self.stage, self.step, self.loss = stage, step, loss


def check_positive(name: str, value, integer: bool = False):
    """Refuse anything but a positive finite number (``integer``: a positive int), naming
    ``name`` in the error."""
    ok = (isinstance(value, (int, np.integer)) and not isinstance(value, bool)) if integer \
        else isinstance(value, (int, float)) and math.isfinite(value)
    if not ok or value <= 0:
        raise ValueError(f"{name} must be a positive {'integer' if integer else 'number'}, "
                         f"got {value!r}")


def make_optimizer(name: str, params, lr: float, momentum: float, weight_decay: float):
    """A fresh optimizer of :data:`OPTIMIZERS` (momentum for SGD only)."""
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def _gather(dataset: Dataset, chunk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and labels of the samples ``chunk``; a ``TensorDataset`` is indexed at once
    rather than collated sample by sample, which dominates the cost of small models."""
    tensors = getattr(dataset, "tensors", None)
    if tensors is not None:
        return tensors[0][chunk], tensors[1][chunk]
    x, y = default_collate([dataset[int(i)] for i in chunk])[:2]
    return x, y


def _batches(dataset: Dataset, indices: torch.Tensor, batch_size: int,
             generator: torch.Generator, device: torch.device):
    """Full batches of a fresh shuffle of ``indices``; a trailing partial batch is dropped
    (it reappears in other epochs' shuffles) so every step sees ``batch_size`` samples."""
    order = indices[torch.randperm(indices.numel(), generator=generator)]
    for start in range(0, order.numel() - batch_size + 1, batch_size):
        x, y = _gather(dataset, order[start:start + batch_size])
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


@torch.no_grad()
def top1_accuracy(model: nn.Module, dataset: Dataset, batch_size: int = 1024) -> float:
    """Top-1 accuracy of ``model`` on ``dataset`` (in eval mode; the mode is restored)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = total = 0
    indices = torch.arange(len(dataset))
    for start in range(0, len(indices), batch_size):
        chunk = indices[start:start + batch_size]
        x, y = _gather(dataset, chunk)
        correct += (model(x.to(device)).argmax(1).cpu() == y).sum().item()
        total += chunk.numel()
    model.train(was_training)
    return correct / max(total, 1)


def _schedule(optimizer, steps: int, cosine: bool, warmup: int):
    """Linear warm-up over ``warmup`` steps, then cosine annealing to 0 or a constant rate."""
    if not warmup:
        return (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(steps, 1))
                if cosine else None)
    rest = max(steps - warmup, 1)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / rest)) if cosine else 1.0
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_steps(model, dataset, indices, *, stage, steps, batch_size, optimizer, cosine,
                generator, device, bar=None, epoch_end=None, warmup: int = 0) -> int:
    """``steps`` optimizer steps of cross-entropy on full batches of ``indices``, reshuffled
    at every pass (a budget larger than one pass revisits the subset), after a linear
    warm-up of ``warmup`` steps, cosine-annealed to 0 when ``cosine``.  ``bar.update(1)``
    after each step; ``epoch_end()`` after each complete pass.  A NaN/inf loss raises
    :class:`NonFiniteLossError` (``stage`` names it).  Returns the number of samples seen."""
    if steps > 0 and indices.numel() < batch_size:
        # No full batch: the loop below would never make a step.
        raise ValueError(f"{indices.numel()} samples hold no full batch of {batch_size}")
    if isinstance(warmup, bool) or int(warmup) != warmup or not 0 <= warmup <= steps:
        raise ValueError(f"warmup must be an integer in [0, steps={steps}], got {warmup!r}")
    scheduler = _schedule(optimizer, steps, cosine, int(warmup))
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
        (lambda: history.append(top1_accuracy(model, val_dataset, eval_batch_size)))
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
