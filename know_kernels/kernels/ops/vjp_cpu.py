"""The ``cpu`` backend of the nowcast step's VJP: the fused C++ kernel in ``know_kernels._C``
(csrc/cpu/vjp_kernel.cpp), on the instruction set ``nowcast_cpu.isa()`` picks
(``KNOW_KERNELS_ISA`` forces one), with ``torch.get_num_threads()`` OpenMP threads.

For a given instruction set the result does not depend on the number of threads: the head's
gradient is summed over fixed blocks of rows that are added in order, and each row's
gradient is its own.  Its forward is nowcast's on the same instruction set, instruction for
instruction.
"""
from __future__ import annotations

from typing import Optional

import torch

from ... import _ext
from . import check_vjp_call, dtype_code
from .nowcast_cpu import extension_status, isa

MAX_WINDOW = None


def available(device: torch.device) -> tuple[bool, str]:
    return extension_status(device, "vjp")


def run(rows: torch.Tensor, packed: torch.Tensor, upstream: torch.Tensor, *, S: int, norm: str,
        grad_packed: torch.Tensor, grad_rows: Optional[torch.Tensor]) -> None:
    """Backend entry point (the contract: ``know_kernels.kernels.nowcast``): overwrites
    ``grad_packed`` and, unless it is None, ``grad_rows``."""
    check_vjp_call(rows, packed, upstream, grad_packed, grad_rows, S=S, device_type="cpu")
    C = _ext.require_C()
    C.vjp(rows.data_ptr(), dtype_code(C, rows.dtype), packed.data_ptr(), upstream.data_ptr(),
          grad_packed.data_ptr(), 0 if grad_rows is None else grad_rows.data_ptr(),
          rows.shape[0], S, norm == "wnn", torch.get_num_threads(), isa())
