"""The ``cuda`` backend of ``l1_loss``: the fused training step of ``know_kernels._cuda``
(csrc/cuda/l1.cu).  That module links no torch: this wrapper sizes the kernel's workspace
(one row of partial gradients per block of the kernel) and hands over device pointers and
the current torch stream.

All matrix products are 3xTF32 tensor-core products (float32-level accuracy); the rest is
float32.  The gradient is reduced over the kernel's blocks in a fixed order, so the same
call gives the same bits every time on the same device.
"""
from __future__ import annotations

import torch

from . import check_l1_call, dtype_code, nowcast_cuda

MAX_WINDOW = nowcast_cuda.MAX_WINDOW


def available(device: torch.device) -> tuple[bool, str]:
    ok, why = nowcast_cuda.available(device)
    if ok and not hasattr(nowcast_cuda.module(), "l1_loss"):
        return False, "know_kernels._cuda was built without the L1 kernel; rebuild it"
    return ok, why


def run(rows: torch.Tensor, target: torch.Tensor, packed: torch.Tensor, *, S: int, norm: str,
        loss_space: str, grad: torch.Tensor) -> torch.Tensor:
    """Backend entry point (see ``know_kernels.kernels.l1``): overwrites ``grad`` with
    d(sum |e|)/d(packed) and returns the sum of |e| as a 0-d float32 tensor."""
    check_l1_call(rows, target, packed, grad, S=S, device_type="cuda")
    C = nowcast_cuda.module()
    n = rows.shape[0]
    if n == 0:
        grad.zero_()
        return torch.zeros((), dtype=torch.float32, device=rows.device)
    device = rows.device.index
    floats = C.l1_workspace_floats(n, S, device)
    workspace = torch.empty(floats, dtype=torch.float32, device=rows.device)
    loss = torch.empty((), dtype=torch.float32, device=rows.device)
    C.l1_loss(rows.data_ptr(), dtype_code(C, rows.dtype), target.data_ptr(), packed.data_ptr(),
              grad.data_ptr(), loss.data_ptr(), workspace.data_ptr(), floats, n, S,
              norm == "wnn", loss_space == "normalised",
              torch.cuda.current_stream(rows.device).cuda_stream, device)
    return loss
