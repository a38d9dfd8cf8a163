"""Backend dispatch for the public ops, ``nowcast`` and ``l1_loss``: which backends there
are, whether one can run on a device here, which one ``auto`` picks, the module of a fused
one (``ops/<op>_<backend>.py``), and the checks of the rows both ops make before choosing.

Besides its op's ``run`` (contract: the op's module), a fused backend's module provides

    available(device: torch.device) -> tuple[bool, str]   # usable here?, why not
    MAX_WINDOW: Optional[int]                              # largest S it takes; None: any
"""
from __future__ import annotations

import importlib

import torch

from .ops import KERNEL_DTYPES

BACKENDS = ("reference", "cpu", "triton", "cuda")
# The reference backend also computes in float64, for float64 rows.
REFERENCE_DTYPES = KERNEL_DTYPES + (torch.float64,)


def backend_module(name: str, op: str):
    """``ops/<op>_<name>.py``, imported on first use: a backend's libraries may be missing
    or slow to import."""
    return importlib.import_module(f"{__package__}.ops.{op}_{name}")


def backend_status(name: str, device: torch.device | str = "cpu", *,
                   op: str = "nowcast") -> tuple[bool, str]:
    """Whether backend ``name`` of ``op`` can run on ``device`` here, and if not, why."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose from {BACKENDS + ('auto',)}")
    if name == "reference":
        if torch.device(device).type == "cuda" and not torch.cuda.is_available():
            return False, "no CUDA device visible to torch"
        return True, "plain PyTorch"
    try:
        module = backend_module(name, op)
    except ImportError as exc:
        return False, f"not importable: {exc}"
    return module.available(torch.device(device))


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype, *,
                    op: str = "nowcast") -> str:
    """``auto``: cuda, then triton for CUDA tensors; cpu for CPU tensors; reference when
    none is usable or for float64 rows (the fused kernels compute in float32)."""
    if backend != "auto":
        ok, why = backend_status(backend, device, op=op)
        if not ok:
            raise RuntimeError(f"backend {backend!r} is not usable on {device}: {why}")
        return backend
    if dtype == torch.float64:
        return "reference"
    order = ("cuda", "triton") if device.type == "cuda" else ("cpu",)
    for name in order:
        if backend_status(name, device, op=op)[0]:
            return name
    return "reference"


def check_rows(rows, head) -> None:
    """rows: a 2-D (N, head.S) tensor of a dtype some backend takes."""
    if not isinstance(rows, torch.Tensor) or rows.dim() != 2:
        raise ValueError(f"rows must be a 2-D (N, S) tensor, got "
                         f"{tuple(rows.shape) if isinstance(rows, torch.Tensor) else type(rows)}")
    if rows.shape[1] != head.S:
        raise ValueError(f"rows have {rows.shape[1]} snapshots per row but the head expects "
                         f"S={head.S}")
    if rows.dtype not in REFERENCE_DTYPES:
        raise TypeError(f"rows dtype {rows.dtype} not supported; use one of {REFERENCE_DTYPES}")


def check_kernel_dtype(name: str, dtype: torch.dtype) -> None:
    """Fused backend ``name`` reads rows of ``dtype``."""
    if dtype not in KERNEL_DTYPES:
        raise TypeError(f"backend {name!r} takes rows of {KERNEL_DTYPES}, got {dtype}; "
                        f"use backend='reference' for float64")


def fused_module(name: str, op: str, S: int):
    """The module of fused backend ``name`` of ``op``, which must take windows of S."""
    module = backend_module(name, op)
    if module.MAX_WINDOW is not None and S > module.MAX_WINDOW:
        raise ValueError(f"backend {name!r} takes windows of up to {module.MAX_WINDOW} "
                         f"snapshots, got S={S}")
    return module
