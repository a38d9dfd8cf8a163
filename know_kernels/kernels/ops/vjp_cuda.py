"""The ``cuda`` backend of ``vjp``: the fused VJP of one nowcast step in
``know_kernels._cuda`` (csrc/cuda/vjp.cu).  Contract: ``vjp_triton.py``'s docstring (the
same ``run``).  That module links no torch: this wrapper sizes the kernel's workspace (one
row of partial gradients per group of row tiles) and hands over device pointers and the
current torch stream.

All matrix products are 3xTF32 tensor-core products (float32-level accuracy); the rest is
float32.  The gradient is reduced over the groups in a fixed order, whatever the number of
blocks, so the same call gives the same bits every time.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import check_vjp_call, dtype_code, nowcast_cuda

MAX_WINDOW = nowcast_cuda.MAX_WINDOW


def available(device: torch.device) -> tuple[bool, str]:
    ok, why = nowcast_cuda.available(device)
    if ok and not hasattr(nowcast_cuda.module(), "vjp"):
        return False, "know_kernels._cuda was built without the VJP kernel; rebuild it"
    return ok, why


def run(rows: torch.Tensor, packed: torch.Tensor, upstream: torch.Tensor, *, S: int, norm: str,
        grad_packed: torch.Tensor, grad_rows: Optional[torch.Tensor]) -> None:
    """Backend entry point: overwrites ``grad_packed`` with sum_i u_i d pred_i / d packed
    and, unless None, ``grad_rows`` with u_i d pred_i / d rows_i."""
    check_vjp_call(rows, packed, upstream, grad_packed, grad_rows, S=S, device_type="cuda")
    C = nowcast_cuda.module()
    n = rows.shape[0]
    floats = C.vjp_workspace_floats(n, S, 0)
    workspace = torch.empty(floats, dtype=torch.float32, device=rows.device)
    C.vjp(rows.data_ptr(), dtype_code(C, rows.dtype), packed.data_ptr(), upstream.data_ptr(),
          grad_packed.data_ptr(), 0 if grad_rows is None else grad_rows.data_ptr(),
          workspace.data_ptr(), floats, n, S, norm == "wnn", 0, 0,
          torch.cuda.current_stream(rows.device).cuda_stream, rows.device.index)
