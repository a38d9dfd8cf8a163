"""One module per op and backend: ``<op>_<backend>.py`` holds the wrapper and the kernel;
``triton_common.py`` holds what the two Triton kernels share.

The public entry points (``kernels/nowcast.py``, ``kernels/l1.py``) validate what users pass
and call a backend's ``run`` only as its contract allows.  ``run`` does not check that
again: with the ``check_*_call`` helpers below it asserts the layout its kernel indexes by
(a broken promise would read or write out of bounds), and with ``invariant`` its own knobs,
which no public entry point takes (``input_precision``, ``programs``, ``mode``,
``blocks_per_sm``).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..packing import packed_size

# The storage dtypes the fused kernels read and write, by the names under which both
# compiled modules export their codes (DTYPE_CODES, from csrc/kernel_abi.h).
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
KERNEL_DTYPES = tuple(DTYPE_NAMES)


def invariant(ok: bool, broken: str) -> None:
    """``assert`` for the backend contract that also holds under ``python -O``: a broken
    promise is a bug in the caller, and one about the layout would send the kernel out of
    bounds."""
    if not ok:
        raise AssertionError(f"backend contract broken: {broken}")


def dtype_code(module, dtype: torch.dtype) -> int:
    """The code of kernel dtype ``dtype`` in a compiled module."""
    return module.DTYPE_CODES[DTYPE_NAMES[dtype]]


def _check_layout(device_type: Optional[str], rows: torch.Tensor, S: int,
                  packed: torch.Tensor, **others: torch.Tensor) -> None:
    invariant(device_type in (None, rows.device.type), f"rows on {rows.device}")
    invariant(rows.dim() == 2 and rows.shape[1] == S and rows.dtype in DTYPE_NAMES,
              f"rows {tuple(rows.shape)} {rows.dtype} for S={S}")
    invariant(packed.dtype == torch.float32 and packed.numel() == packed_size(S),
              f"packed {packed.numel()} {packed.dtype} for S={S}")
    for name, t in (("rows", rows), ("packed", packed), *others.items()):
        invariant(t.is_contiguous() and t.device == rows.device,
                  f"{name} not contiguous on {rows.device}")


def check_nowcast_call(rows: torch.Tensor, packed: torch.Tensor, out: torch.Tensor, *, S: int,
                       steps: int, device_type: Optional[str] = None) -> None:
    """What a nowcast kernel indexes by: contiguous tensors on the rows' device (of type
    ``device_type`` when given), rows (N, S) and out (N, steps) or (N,), both of kernel
    dtypes, and the float32 packed head for S."""
    _check_layout(device_type, rows, S, packed, out=out)
    n = rows.shape[0]
    invariant(tuple(out.shape) in ((n,), (n, steps)) and out.dtype in DTYPE_NAMES,
              f"out {tuple(out.shape)} {out.dtype} for {n} rows and {steps} steps")


def check_vjp_call(rows: torch.Tensor, packed: torch.Tensor, upstream: torch.Tensor,
                   grad_packed: torch.Tensor, grad_rows: Optional[torch.Tensor], *, S: int,
                   device_type: Optional[str] = None) -> None:
    """What a VJP kernel indexes by: contiguous tensors on the rows' device (of type
    ``device_type`` when given), rows (N, S) of a kernel dtype, and float32 upstream (N,),
    packed head and its gradient for S, and grad_rows (N, S) unless None."""
    others = {"upstream": upstream, "grad_packed": grad_packed}
    if grad_rows is not None:
        others["grad_rows"] = grad_rows
    _check_layout(device_type, rows, S, packed, **others)
    n = rows.shape[0]
    invariant(upstream.dtype == torch.float32 and tuple(upstream.shape) == (n,),
              f"upstream {tuple(upstream.shape)} {upstream.dtype} for {n} rows")
    invariant(grad_packed.dtype == torch.float32 and grad_packed.numel() == packed.numel(),
              f"grad_packed {grad_packed.numel()} {grad_packed.dtype} for S={S}")
    invariant(grad_rows is None or (grad_rows.dtype == torch.float32
                                    and tuple(grad_rows.shape) == (n, S)),
              f"grad_rows {None if grad_rows is None else tuple(grad_rows.shape)} for "
              f"{n} rows of S={S}")
