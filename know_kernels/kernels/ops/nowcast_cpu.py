"""The ``cpu`` backend of ``nowcast``: the fused C++ kernel in ``know_kernels._C``
(csrc/cpu/nowcast_kernel.cpp), OpenMP over tiles of rows, vectorised for the best
instruction set this processor runs.

The environment variable ``KNOW_KERNELS_ISA`` (``avx512``, ``avx2`` or ``portable``),
read at every call, forces one instruction set; unset or empty means the best one here.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from ... import _ext
from . import check_nowcast_call, dtype_code

ISA_ENV = "KNOW_KERNELS_ISA"
ISAS = ("avx512", "avx2", "portable")
MAX_WINDOW = None


def extension_status(device: torch.device, entry: str) -> tuple[bool, str]:
    """``available`` of the CPU backends: CPU tensors, and a build of know_kernels._C that
    has the backend's ``entry``."""
    if device.type != "cpu":
        return False, f"the cpu backend runs on CPU tensors, not {device.type}"
    if _ext._C is None:
        return False, f"know_kernels._C is not built ({_ext.IMPORT_ERROR})"
    if not hasattr(_ext._C, entry):
        return False, f"know_kernels._C was built without {entry}; rebuild it"
    return True, "fused C++ kernel, instruction sets here: " + ", ".join(_ext._C.runnable_isas())


def available(device: torch.device) -> tuple[bool, str]:
    return extension_status(device, "nowcast")


def isa() -> str:
    """The instruction set the next call will use (``KNOW_KERNELS_ISA`` or the best here)."""
    C = _ext.require_C()
    wanted = os.environ.get(ISA_ENV, "").strip().lower()
    if not wanted:
        return C.best_isa()
    if wanted not in ISAS:
        raise ValueError(f"{ISA_ENV}={os.environ[ISA_ENV]!r} is not an instruction set; use one "
                         f"of {', '.join(ISAS)} (or leave it unset for the best one here)")
    runnable = C.runnable_isas()
    if wanted not in runnable:
        raise RuntimeError(f"{ISA_ENV}={wanted} asks for a kernel this machine cannot run "
                           f"(compiled: {', '.join(C.compiled_isas())}; runnable here: "
                           f"{', '.join(runnable)})")
    return wanted


def tile_rows(which: Optional[str] = None) -> int:
    """Rows per tile of the kernel for instruction set ``which`` (default: ``isa()``)."""
    return _ext.require_C().nowcast_tile_rows(which or isa())


def run(rows: torch.Tensor, packed: torch.Tensor, *, S: int, norm: str, steps: int,
        out: torch.Tensor, threads: Optional[int]) -> None:
    """Backend entry point (see ``know_kernels.kernels.nowcast``)."""
    C = _ext.require_C()
    check_nowcast_call(rows, packed, out, S=S, steps=steps, device_type="cpu")
    C.nowcast(rows.data_ptr(), dtype_code(C, rows.dtype), packed.data_ptr(), out.data_ptr(),
              dtype_code(C, out.dtype), rows.shape[0], S, norm == "wnn", steps, out.dim() == 2,
              threads or torch.get_num_threads(), isa())


def vec_math(fn: str, x: torch.Tensor, which: Optional[str] = None) -> torch.Tensor:
    """``fn`` ('exp', 'exp2' or 'tanh') of a float32 tensor with the kernel's own vector math."""
    C = _ext.require_C()
    if x.dtype != torch.float32 or x.device.type != "cpu":
        raise TypeError(f"x must be a float32 CPU tensor, got {x.dtype} on {x.device}")
    x = x.contiguous()
    y = torch.empty_like(x)
    C.vec_math(fn, x.data_ptr(), y.data_ptr(), x.numel(), which or isa())
    return y
