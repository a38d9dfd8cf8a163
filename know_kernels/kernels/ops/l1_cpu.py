"""The ``cpu`` backend of ``l1_loss``: the fused C++ training step in ``know_kernels._C``
(csrc/cpu/l1_kernel.cpp), on the instruction set ``nowcast_cpu.isa()`` picks
(``KNOW_KERNELS_ISA`` forces one), with ``torch.get_num_threads()`` OpenMP threads.

For a given instruction set the result does not depend on the number of threads: rows are
summed in fixed blocks that are added in order.
"""
from __future__ import annotations

import torch

from ... import _ext
from . import check_l1_call, dtype_code
from .nowcast_cpu import extension_status, isa

MAX_WINDOW = None


def available(device: torch.device) -> tuple[bool, str]:
    return extension_status(device, "l1_loss")


def run(rows: torch.Tensor, target: torch.Tensor, packed: torch.Tensor, *, S: int, norm: str,
        loss_space: str, grad: torch.Tensor) -> torch.Tensor:
    """Backend entry point (see ``know_kernels.kernels.l1``): overwrites ``grad`` with
    d(sum |e|)/d(packed) and returns the sum of |e| as a 0-d float32 tensor."""
    check_l1_call(rows, target, packed, grad, S=S, device_type="cpu")
    C = _ext.require_C()
    total = C.l1_loss(rows.data_ptr(), dtype_code(C, rows.dtype), target.data_ptr(),
                      packed.data_ptr(), grad.data_ptr(), rows.shape[0], S, norm == "wnn",
                      loss_space == "normalised", torch.get_num_threads(), isa())
    return torch.tensor(total, dtype=torch.float32)
