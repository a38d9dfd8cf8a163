"""``nowcast_step``: one fused prediction step as a differentiable custom op.

``torch.ops.know_kernels.nowcast_step(rows, packed, S, norm, backend)`` returns the (N,)
float32 one-step predictions of the fused nowcast kernel of ``backend`` (``nowcast``'s with
``steps=1``).  Its backward is that backend's fused vector-Jacobian product
(``ops/vjp_<backend>.py``), so ``nowcast`` under autograd unrolls several steps of it and
``l1_loss`` puts an L1 loss on one.  ``packed`` is ``packing.pack`` of the head, which is
differentiable: gradients go on to the head's own parameters.  Being a custom op, it is
opaque to torch.compile, which sees its fake (meta) implementation.

VJP backend contract (op name ``vjp``; ``backends.py`` lists what else a backend module
provides):

    run(rows, packed, upstream, *, S, norm, grad_packed, grad_rows) -> None

``rows``: contiguous (N, S), N >= 0, of a dtype in ``KERNEL_DTYPES``, oldest value first;
``packed``: the float32 vector of ``packing.pack``; ``upstream``: contiguous (N,) float32,
dL/d(pred_i) with pred_i the one-step prediction of row i in original units
(``reference.step_ref``); ``grad_packed``: contiguous float32, ``packing.packed_size(S)``
elements, OVERWRITTEN with sum_i upstream_i d pred_i / d packed (zeros for N = 0);
``grad_rows``: None (no row gradient: cheaper) or contiguous (N, S) float32, every element
OVERWRITTEN with upstream_i d pred_i / d rows_i; all on one device.

Sub-gradients are torch autograd's on ``reference.step_ref``: relu'(z) = 0 for z <= 0;
leaky_relu'(v) = 1 for v > 0, else the slope (0.3); the amax / amin of WNN's scale share
their gradient evenly among tied maxima / minima (constant rows, e.g. frozen parameters,
are common).  The result must not depend on the number of threads: fixed-size row blocks
summed in a fixed order.
"""
from __future__ import annotations

import torch

from .backends import fused_module
from .packing import packed_size


@torch.library.custom_op("know_kernels::nowcast_step", mutates_args=())
def nowcast_step(rows: torch.Tensor, packed: torch.Tensor, S: int, norm: str,
                 backend: str) -> torch.Tensor:
    """(N,) float32 one-step predictions of the contiguous (N, S) ``rows``."""
    # Imported here: nowcast.py imports this module, and importing is opaque to Dynamo.
    from .nowcast import PRECISION_ARGS

    out = torch.empty(rows.shape[0], dtype=torch.float32, device=rows.device)
    if rows.shape[0]:
        fused_module(backend, "nowcast", S).run(rows, packed, S=S, norm=norm, steps=1, out=out,
                                                threads=None,
                                                **PRECISION_ARGS[backend]["float32"])
    return out


@nowcast_step.register_fake
def _(rows, packed, S, norm, backend):
    return rows.new_empty(rows.shape[0], dtype=torch.float32)


@torch.library.custom_op("know_kernels::nowcast_step_vjp", mutates_args=())
def nowcast_step_vjp(rows: torch.Tensor, packed: torch.Tensor, upstream: torch.Tensor, S: int,
                     norm: str, backend: str, with_rows: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_packed, grad_rows) of ``nowcast_step`` for ``upstream``: the backend's fused VJP.
    grad_rows is float32 (N, S), or (0, S) and not computed unless ``with_rows``.  An op of
    its own, so that torch.compile's traced backward calls it rather than the kernel."""
    grad_packed = torch.empty(packed_size(S), dtype=torch.float32, device=packed.device)
    grad_rows = torch.empty((rows.shape[0] if with_rows else 0, S), dtype=torch.float32,
                            device=rows.device)
    fused_module(backend, "vjp", S).run(rows, packed, upstream, S=S, norm=norm,
                                        grad_packed=grad_packed,
                                        grad_rows=grad_rows if with_rows else None)
    return grad_packed, grad_rows


@nowcast_step_vjp.register_fake
def _(rows, packed, upstream, S, norm, backend, with_rows):
    return (packed.new_empty(packed_size(S)),
            rows.new_empty((rows.shape[0] if with_rows else 0, S), dtype=torch.float32))


def _setup_context(ctx, inputs, output) -> None:
    rows, packed, ctx.S, ctx.norm, ctx.backend = inputs
    ctx.save_for_backward(rows, packed)


def _backward(ctx, grad):
    rows, packed = ctx.saved_tensors
    want_rows, want_packed = ctx.needs_input_grad[:2]
    grad_packed, grad_rows = nowcast_step_vjp(rows, packed, grad.to(torch.float32).contiguous(),
                                              ctx.S, ctx.norm, ctx.backend, want_rows)
    return (grad_rows.to(rows.dtype) if want_rows else None,
            grad_packed if want_packed else None, None, None, None)


nowcast_step.register_autograd(_backward, setup_context=_setup_context)
