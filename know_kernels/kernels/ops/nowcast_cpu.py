"""The ``cpu`` backend of ``nowcast``: the fused C++ kernel in ``know_kernels._C``
(csrc/cpu/nowcast_kernel.cpp), OpenMP over tiles of rows, vectorised for the best
instruction set this processor runs.

The environment variable ``KNOW_KERNELS_ISA`` (``avx512``, ``avx2`` or ``portable``),
read at every call, forces one instruction set; unset or empty means the best one here.

``products="bf16"`` (``precision="bf16"``) runs the copy of the kernel whose matrix
products take bfloat16 operands (``reference_bf16.py`` says which), chosen by
``bf16_kernel``: VDPBF16PS where the processor has AVX512_BF16.  AMX (TDPBF16PS) is
detected, with the OS's grant of its tile data, but this build has no AMX kernel: a
processor with AMX runs the VDPBF16PS copy, which every AMX processor also has.  Without
either the call is refused, naming what is missing; a ``KNOW_KERNELS_ISA`` other than
avx512 refuses it too, since the bf16 copy is AVX-512 code.
"""
from __future__ import annotations

import os
from typing import Mapping, Optional, Sequence

import torch

from ... import _ext
from . import check_nowcast_call, dtype_code, invariant

ISA_ENV = "KNOW_KERNELS_ISA"
ISAS = ("avx512", "avx2", "portable")
MAX_WINDOW = None
PRODUCTS = ("float32", "bf16")


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


def choose_bf16(features: Mapping[str, bool], compiled: Sequence[str],
                runnable: Sequence[str], forced_isa: str) -> tuple[Optional[str], str]:
    """The bf16 kernel to run given the processor's ``features`` (``_C.cpu_features()``),
    the bf16 kernels compiled and runnable here and the instruction set in force, and why;
    (None, what is missing) where there is none."""
    if forced_isa != "avx512":
        return None, (f"{ISA_ENV}={forced_isa} excludes the AVX-512 code the bf16 products "
                      f"run on")
    if features.get("amx_bf16"):
        granted = ("the OS granted its tile data" if features.get("amx_granted") else
                   "the OS did not grant its tile data (arch_prctl ARCH_REQ_XCOMP_PERM)")
        amx = f"amx_bf16 (TDPBF16PS) is present and {granted}, but this build has no AMX kernel"
    else:
        amx = "no amx_bf16 (TDPBF16PS) here"
    if "avx512_bf16" in runnable:
        return "avx512_bf16", f"VDPBF16PS (avx512_bf16); {amx}" + (
            " (VDPBF16PS runs instead)" if features.get("amx_bf16") else "")
    if "avx512_bf16" not in compiled:
        return None, (f"this build has no bf16 kernel (its compiler took no -mavx512bf16: "
                      f"GCC >= 10 or Clang >= 9 builds one); {amx}")
    return None, f"this processor lacks avx512_bf16 (VDPBF16PS); {amx}"


def bf16_kernel() -> tuple[Optional[str], str]:
    """The kernel ``products="bf16"`` runs here and why, or (None, why there is none)."""
    if _ext._C is None:
        return None, f"know_kernels._C is not built ({_ext.IMPORT_ERROR})"
    C = _ext._C
    if not hasattr(C, "compiled_bf16_kernels"):
        return None, "know_kernels._C was built without bf16 kernels; rebuild it"
    return choose_bf16(C.cpu_features(), C.compiled_bf16_kernels(), C.runnable_bf16_kernels(),
                       isa())


def kernel_name(products: str) -> str:
    """What the extension's ``isa`` argument is for ``products``; refuses "bf16" where no
    bf16 kernel can run (RuntimeError, naming what is missing)."""
    if products == "float32":
        return isa()
    name, why = bf16_kernel()
    if name is None:
        raise RuntimeError(f"precision='bf16' needs bfloat16 matrix products on the cpu "
                           f"backend, and {why}; use precision='float32'")
    return name


def tile_rows(which: Optional[str] = None) -> int:
    """Rows per tile of the kernel for instruction set ``which`` (default: ``isa()``)."""
    return _ext.require_C().nowcast_tile_rows(which or isa())


def run(rows: torch.Tensor, packed: torch.Tensor, *, S: int, norm: str, steps: int,
        out: torch.Tensor, threads: Optional[int], products: str = "float32") -> None:
    """Backend entry point (see ``know_kernels.kernels.nowcast``); ``products``: this
    backend's own knob, "float32" or "bf16" (the module docstring)."""
    C = _ext.require_C()
    invariant(products in PRODUCTS, f"products {products!r}")
    check_nowcast_call(rows, packed, out, S=S, steps=steps, device_type="cpu")
    C.nowcast(rows.data_ptr(), dtype_code(C, rows.dtype), packed.data_ptr(), out.data_ptr(),
              dtype_code(C, out.dtype), rows.shape[0], S, norm == "wnn", steps, out.dim() == 2,
              threads or torch.get_num_threads(), kernel_name(products))


def vec_math(fn: str, x: torch.Tensor, which: Optional[str] = None) -> torch.Tensor:
    """``fn`` ('exp', 'exp2' or 'tanh') of a float32 tensor with the kernel's own vector math."""
    C = _ext.require_C()
    if x.dtype != torch.float32 or x.device.type != "cpu":
        raise TypeError(f"x must be a float32 CPU tensor, got {x.dtype} on {x.device}")
    x = x.contiguous()
    y = torch.empty_like(x)
    C.vec_math(fn, x.data_ptr(), y.data_ptr(), x.numel(), which or isa())
    return y
