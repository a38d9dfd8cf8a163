"""The ``cuda`` backend of ``l1_loss``: the fused training step of ``know_kernels._cuda``
(csrc/cuda/l1.cu).  That module links no torch: this wrapper validates the tensors, sizes
the kernel's workspace (one row of partial gradients per block of the kernel) and hands
over device pointers and the current torch stream.

All matrix products are 3xTF32 tensor-core products (float32-level accuracy); the rest is
float32.  The gradient is reduced over the kernel's blocks in a fixed order, so the same
call gives the same bits every time on the same device.
"""
from __future__ import annotations

import torch

from ..l1 import check_loss_space, check_run_args
from ..reference import check_norm
from . import nowcast_cuda, require_runnable
from .nowcast_cuda import DTYPE_NAMES, check_tensors, module


def available(device: torch.device) -> tuple[bool, str]:
    ok, why = nowcast_cuda.available(device)
    if ok and not hasattr(module(), "l1_loss"):
        return False, "know_kernels._cuda was built without the L1 kernel; rebuild it"
    return ok, why


def run(rows: torch.Tensor, target: torch.Tensor, packed: torch.Tensor, *, S: int, norm: str,
        loss_space: str, grad: torch.Tensor) -> torch.Tensor:
    """Backend entry point (see ``know_kernels.l1_loss``): overwrites ``grad`` with
    d(sum |e|)/d(packed) and returns the sum of |e| as a 0-d float32 tensor."""
    C = module()
    check_norm(norm)
    check_loss_space(loss_space)
    check_tensors(rows, S, target=target, packed=packed, grad=grad)
    check_run_args(rows, target, packed, grad, S)
    n = rows.shape[0]
    if n == 0:
        grad.zero_()
        return torch.zeros((), dtype=torch.float32, device=rows.device)
    require_runnable("cuda", available, rows.device)
    device = rows.device.index
    floats = C.l1_workspace_floats(n, S, device)
    workspace = torch.empty(floats, dtype=torch.float32, device=rows.device)
    loss = torch.empty((), dtype=torch.float32, device=rows.device)
    C.l1_loss(rows.data_ptr(), C.DTYPE_CODES[DTYPE_NAMES[rows.dtype]], target.data_ptr(),
              packed.data_ptr(), grad.data_ptr(), loss.data_ptr(), workspace.data_ptr(), floats,
              n, S, norm == "wnn", loss_space == "normalised",
              torch.cuda.current_stream(rows.device).cuda_stream, device)
    return loss
