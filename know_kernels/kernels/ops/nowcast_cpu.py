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

ISA_ENV = "KNOW_KERNELS_ISA"
ISAS = ("avx512", "avx2", "portable")
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _module():
    C = _ext._C
    if C is None or not hasattr(C, "nowcast"):
        return None
    return C


def available(device: torch.device) -> tuple[bool, str]:
    if device.type != "cpu":
        return False, f"the cpu backend runs on CPU tensors, not {device.type}"
    if _ext._C is None:
        return False, f"know_kernels._C is not built ({_ext.IMPORT_ERROR})"
    if _module() is None:
        return False, "know_kernels._C was built without the fused kernel; rebuild it"
    return True, "fused C++ kernel, instruction sets here: " + ", ".join(_module().runnable_isas())


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


def check_tensors(rows: torch.Tensor, S: int, **others: torch.Tensor) -> None:
    """All contiguous CPU tensors, rows (N, S) of a dtype the kernels read."""
    for name, t in (("rows", rows), *others.items()):
        if t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous CPU tensor")
    if rows.dim() != 2 or rows.shape[1] != S:
        raise ValueError(f"rows must be (N, S={S}), got {tuple(rows.shape)}")
    if rows.dtype not in DTYPE_NAMES:
        raise TypeError(f"rows dtype {rows.dtype} is not one of {tuple(DTYPE_NAMES)}")


def run(rows: torch.Tensor, packed: torch.Tensor, *, S: int, norm: str, steps: int,
        out: torch.Tensor, threads: Optional[int]) -> None:
    C = _ext.require_C()
    check_tensors(rows, S, packed=packed, out=out)
    if out.dtype not in DTYPE_NAMES:
        raise TypeError(f"out dtype {out.dtype} is not one of {tuple(DTYPE_NAMES)}")
    if packed.dtype != torch.float32 or packed.dim() != 1:
        raise ValueError("packed must be the 1-D float32 vector of packing.pack")
    n = rows.shape[0]
    if tuple(out.shape) not in ((n, steps), (n,)):
        raise ValueError(f"out must be ({n}, {steps}) or ({n},), got {tuple(out.shape)}")
    if threads is None:
        threads = torch.get_num_threads()
    if not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive integer or None, got {threads!r}")
    C.nowcast(rows.data_ptr(), DTYPE_NAMES[rows.dtype], n, S, packed.data_ptr(),
              packed.numel(), norm, steps, out.dim() == 2, out.data_ptr(),
              DTYPE_NAMES[out.dtype], threads, isa())


def vec_math(fn: str, x: torch.Tensor, which: Optional[str] = None) -> torch.Tensor:
    """``fn`` ('exp', 'exp2' or 'tanh') of a float32 tensor with the kernel's own vector math."""
    C = _ext.require_C()
    if x.dtype != torch.float32 or x.device.type != "cpu":
        raise TypeError(f"x must be a float32 CPU tensor, got {x.dtype} on {x.device}")
    x = x.contiguous()
    y = torch.empty_like(x)
    C.vec_math(fn, x.data_ptr(), y.data_ptr(), x.numel(), which or isa())
    return y
