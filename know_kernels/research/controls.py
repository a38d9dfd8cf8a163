"""Matched-noise controls: does a method's change from Θ^0 carry knowledge, or would any
change of that size do as well?

For a predicted starting point Θ̂, its control is Θ^0 + a random direction with, tensor by
tensor, the norm of Θ̂ − Θ^0.  A downstream gain that the control also gets comes from
moving the weights off Θ^0 (a converged network pushed off its minimum can probe better on
a new task), not from what the prediction knows.  Tensors that are not floating point
(counters, integer buffers) are copied from Θ^0, as are tensors the prediction left equal.
"""
from __future__ import annotations

from typing import Mapping

import torch

from .forgetting import derive_seed
from .transfer import Candidate

NOISE_PREFIX = "noise:"


def noise_method(method: str) -> str:
    """The control's method name for ``method``'s rows."""
    return NOISE_PREFIX + method


def control_of(method: str):
    """The method a control row stands beside, or None for a row that is no control."""
    return method[len(NOISE_PREFIX):] if method.startswith(NOISE_PREFIX) else None


def matched_noise(theta0: Mapping[str, torch.Tensor], predicted: Mapping[str, torch.Tensor],
                  seed: int) -> dict[str, torch.Tensor]:
    """Θ^0 + a Gaussian direction per tensor scaled to ‖predicted − Θ^0‖ of that tensor;
    ``seed`` and the tensor's position fix the direction."""
    if list(theta0) != list(predicted):
        raise ValueError("Θ^0 and the prediction must hold the same tensors in the same order")
    out = {}
    for i, (name, base) in enumerate(theta0.items()):
        pred = predicted[name]
        if pred.shape != base.shape:
            raise ValueError(f"{name}: prediction shape {tuple(pred.shape)} differs from "
                             f"Θ^0's {tuple(base.shape)}")
        if not base.is_floating_point():
            out[name] = base.clone()
            continue
        norm = torch.linalg.vector_norm((pred - base).double())
        if norm == 0:
            out[name] = base.clone()
            continue
        generator = torch.Generator().manual_seed(derive_seed(seed, i))
        z = torch.randn(base.shape, generator=generator, dtype=torch.float64)
        out[name] = (base.double() + z * (norm / torch.linalg.vector_norm(z))).to(base.dtype)
    return out


def noise_candidates(candidates, theta0: Mapping[str, torch.Tensor], seed: int) -> list:
    """One control per candidate, ``noise:<method>`` at the same step and factor, each with
    its own direction (seeded by ``seed`` and the candidate's position)."""
    return [Candidate(noise_method(c.method), c.step, c.factor,
                      matched_noise(theta0, c.weights, derive_seed(seed, k)))
            for k, c in enumerate(candidates)]
