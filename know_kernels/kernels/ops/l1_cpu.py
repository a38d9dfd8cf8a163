"""The ``cpu`` backend of ``l1_loss``: the fused C++ training step in ``know_kernels._C``
(csrc/cpu/l1_kernel.cpp), on the instruction set ``nowcast_cpu.isa()`` picks
(``KNOW_KERNELS_ISA`` forces one), with ``torch.get_num_threads()`` OpenMP threads.

For a given instruction set the result does not depend on the number of threads: rows are
summed in fixed blocks that are added in order.
"""
from __future__ import annotations

import torch

from ... import _ext
from ..l1 import check_run_args
from .nowcast_cpu import DTYPE_NAMES, check_tensors, isa


def available(device: torch.device) -> tuple[bool, str]:
    if device.type != "cpu":
        return False, f"the cpu backend runs on CPU tensors, not {device.type}"
    if _ext._C is None:
        return False, f"know_kernels._C is not built ({_ext.IMPORT_ERROR})"
    if not hasattr(_ext._C, "l1"):
        return False, "know_kernels._C was built without the fused L1 kernel; rebuild it"
    return True, "fused C++ kernel, instruction sets here: " + ", ".join(_ext._C.runnable_isas())


def run(rows: torch.Tensor, target: torch.Tensor, packed: torch.Tensor, *, S: int, norm: str,
        loss_space: str, grad: torch.Tensor) -> torch.Tensor:
    """Overwrites ``grad`` with d(sum |e|)/d(packed); returns sum |e| (0-d float32)."""
    check_tensors(rows, S, target=target, packed=packed, grad=grad)
    check_run_args(rows, target, packed, grad, S)
    total = _ext.require_C().l1(rows.data_ptr(), DTYPE_NAMES[rows.dtype], rows.shape[0], S,
                                target.data_ptr(), packed.data_ptr(), packed.numel(), norm,
                                loss_space, grad.data_ptr(), torch.get_num_threads(), isa())
    return torch.tensor(total, dtype=torch.float32)
