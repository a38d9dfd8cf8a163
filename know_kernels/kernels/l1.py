"""``l1_loss``: the meta-training objective (paper Eq. 6) with its gradient, fused.

``l1_loss(rows, target, head)`` is the mean over rows of |e_i|, where e_i is the head's
one-step prediction for row i minus ``target[i]`` (``loss_space="original"``), or that
difference divided by the row's normalisation scale (``"normalised"``; the scale is 1 for
``raw``).  ``.backward()`` fills the head's parameter gradients.

One entry point, several backends, dispatched like ``nowcast`` (``backends.py``).
``reference`` is plain torch autograd on ``reference.py``.  On a fused backend the loss is
the VJP of one nowcast step with a sign upstream: the prediction is the custom op
``know_kernels::nowcast_step`` (``step.py``: the backend's fused nowcast kernel), e and |e|
are computed in torch, and autograd hands the step's backward, the backend's fused VJP
(``ops/vjp_<name>.py``, looked up by name), the upstream sign(e_i) / N (sign(e_i) / (scale_i
N) for ``"normalised"``).  The VJP returns the gradient with respect to the packed head
(``packing.pack``); ``pack`` is differentiable, so autograd carries it on to the head's own
parameters.  Optimisers, gradient clipping, DDP and torch.compile see an ordinary
differentiable function.

Sub-gradients are torch autograd's, so every backend agrees with ``reference``:
d|e|/de = sign(e) with sign(0) = 0 (and sign(NaN) = 0, as torch's ``sgn``);
relu'(z) = 0 for z <= 0; leaky_relu'(v) = 1 for v > 0, else the slope (0.3), so
leaky_relu'(0) = 0.3.

Zero rows: ``l1_loss`` of an empty batch is 0 with zero gradients (not NaN, torch's mean of
nothing), so that a data-parallel rank with no rows can still take part in a step.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import backends
from .backends import check_kernel_dtype, check_rows
from .packing import pack
from .reference import check_norm, normalise, residual_ref
from .step import nowcast_step

LOSS_SPACES = ("original", "normalised")
OP = "vjp"  # a fused backend's l1_loss is its nowcast step's VJP


def backend_status(name: str, device: torch.device | str = "cpu") -> tuple[bool, str]:
    """Whether backend ``name`` of ``l1_loss`` can run on ``device`` here, and if not, why."""
    return backends.backend_status(name, device, op=OP)


# Constant for torch.compile: the choice depends on its arguments and on what is installed,
# and finding that out imports modules, which Dynamo cannot trace.
@torch.compiler.assume_constant_result
def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """``auto``: cuda, then triton for CUDA tensors; cpu for CPU tensors; reference when
    none is usable or for float64 rows (the fused kernels compute in float32)."""
    return backends.resolve_backend(backend, device, dtype, op=OP)


def check_loss_space(loss_space: str) -> str:
    if loss_space not in LOSS_SPACES:
        raise ValueError(f"loss_space must be one of {LOSS_SPACES}, got {loss_space!r}")
    return loss_space


def l1_reference(rows: torch.Tensor, target: torch.Tensor, head, *, norm: Optional[str] = None,
                 loss_space: str = "original") -> torch.Tensor:
    """The mean L1 by plain autograd on the reference model, in float64 for float64 rows and
    float32 otherwise (whatever the head's dtype)."""
    return _reference_mean(rows, target, head, check_norm(norm or head.norm),
                           check_loss_space(loss_space))


def _reference_mean(rows: torch.Tensor, target: torch.Tensor, head, norm: str,
                    loss_space: str) -> torch.Tensor:
    dtype = torch.float64 if rows.dtype == torch.float64 else torch.float32
    params = {k: v.to(device=rows.device, dtype=dtype) for k, v in head.params_dict().items()}
    x, scale, shift = normalise(rows.to(dtype), norm)
    pred = x[:, -1] + residual_ref(x, params)
    target = target.to(dtype)
    if loss_space == "normalised":
        e = pred - (target - shift) / scale
    else:
        e = pred * scale + shift - target
    return e.abs().sum() / max(rows.shape[0], 1)


def _check_inputs(rows, target, head) -> None:
    check_rows(rows, head)
    if not isinstance(target, torch.Tensor):
        raise ValueError(f"target must be a ({rows.shape[0]},) tensor, got {type(target)}")
    if tuple(target.shape) != (rows.shape[0],):
        raise ValueError(f"target must be a ({rows.shape[0]},) tensor, one value per row, got "
                         f"shape {tuple(target.shape)}")
    if not target.is_floating_point():
        raise TypeError(f"target must be a floating-point tensor, got {target.dtype}")
    if target.device != rows.device:
        raise ValueError(f"target is on {target.device} but rows are on {rows.device}")


def l1_loss(rows: torch.Tensor, target: torch.Tensor, head, *, backend: str = "auto",
            loss_space: str = "original", norm: Optional[str] = None) -> torch.Tensor:
    """Mean |e| over the (N, S) ``rows`` (oldest value first) against the (N,) ``target``,
    as a 0-d float32 tensor (float64 on the reference backend for float64 rows).

    Differentiable with respect to the head's parameters; ``rows`` and ``target`` are data
    (only ``backend="reference"`` differentiates with respect to them).  ``norm=None``
    uses the head's own normalisation.  N = 0 gives 0.
    """
    _check_inputs(rows, target, head)
    norm = check_norm(head.norm if norm is None else norm)
    check_loss_space(loss_space)
    name = resolve_backend(backend, rows.device, rows.dtype)
    if name == "reference":
        return _reference_mean(rows, target, head, norm, loss_space)
    check_kernel_dtype(name, rows.dtype)
    if rows.requires_grad or target.requires_grad:
        raise ValueError(f"backend {name!r} differentiates with respect to the head only, but "
                         f"rows or target require grad; use backend='reference'")
    packed = pack(head.params_dict(), head.S).to(rows.device)
    e = nowcast_step(rows.contiguous(), packed, head.S, norm, name) - target.to(torch.float32)
    if loss_space == "normalised":
        e = e / normalise(rows.to(torch.float32), norm)[1]
    return e.abs().sum() / max(rows.shape[0], 1)
