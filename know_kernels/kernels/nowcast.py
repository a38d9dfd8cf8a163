"""``nowcast``: predict the next value(s) of every row of an (N, S) trajectory tensor.

One entry point, several backends.  The reference backend is plain PyTorch and always
works; the fused backends (``cpu``, ``triton``, ``cuda``) live in ``know_kernels/ops/``,
one file each, and all read the head in the packed form of ``packing.py``.

Backend contract (``ops/nowcast_<name>.py``):

    available(device: torch.device) -> tuple[bool, str]   # usable here?, why not
    run(rows, packed, *, S, norm, steps, out, threads, **precision_args) -> None

``rows`` is a contiguous (N, S) tensor of a supported dtype, ``packed`` the float32 packed
head on the same device, ``out`` a contiguous tensor on the same device, (N, steps) when
every step is wanted or (N,) for the last step only; the kernel writes every element.

``precision`` is the lowest precision the matrix products may use, as torch's
``allow_tf32`` is a permission rather than an order: "float32" (default) keeps every
backend within the 1e-5 bound of the tests; "tf32" and "bf16" let the GPU backends round
the products' operands for tensor-core speed (their errors: ``PRECISION_ARGS`` below and
bench/RESULTS.md).  A backend without the mode asked for uses its next more precise one:
the CPU and reference backends always compute in float32 (float64 for float64 rows), and
the CUDA backend's products go no lower than TF32.
"""
from __future__ import annotations

import importlib
from typing import Optional

import torch

from .packing import pack
from .reference import check_norm, nowcast_ref

BACKENDS = ("reference", "cpu", "triton", "cuda")
PRECISIONS = ("float32", "tf32", "bf16")
# What each fused backend's ``run`` is passed for each precision.  Relative errors against
# float64 over 3 steps, emulated on the CPU (bench/bench_nowcast_gpu.py --tf32-estimate):
# triton tf32 up to 6e-4, cuda fast up to 6e-5, triton bf16 up to 1.1e-3 (2.6e-5 on
# weight-like rows with "wnn"); "float32" ≤ 1.4e-7.
PRECISION_ARGS = {
    "cpu": {"float32": {}, "tf32": {}, "bf16": {}},
    "triton": {"float32": {"input_precision": "ieee"}, "tf32": {"input_precision": "tf32"},
               "bf16": {"input_precision": "bf16"}},
    "cuda": {"float32": {"mode": "precise"}, "tf32": {"mode": "fast"}, "bf16": {"mode": "fast"}},
}
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
REFERENCE_DTYPES = KERNEL_DTYPES + (torch.float64,)


def _kernel_module(name: str, op: str = "nowcast"):
    return importlib.import_module(f"know_kernels.kernels.ops.{op}_{name}")


def backend_status(name: str, device: torch.device | str = "cpu", *,
                   op: str = "nowcast") -> tuple[bool, str]:
    """Whether backend ``name`` of ``op`` (``ops/<op>_<name>.py``) can run on ``device``
    here, and if not, why."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose from {BACKENDS + ('auto',)}")
    if name == "reference":
        if torch.device(device).type == "cuda" and not torch.cuda.is_available():
            return False, "no CUDA device visible to torch"
        return True, "plain PyTorch"
    try:
        module = _kernel_module(name, op)
    except ImportError as exc:
        return False, f"not importable: {exc}"
    return module.available(torch.device(device))


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype, *,
                    op: str = "nowcast") -> str:
    if backend != "auto":
        ok, why = backend_status(backend, device, op=op)
        if not ok:
            raise RuntimeError(f"backend {backend!r} is not usable on {device}: {why}")
        return backend
    if dtype == torch.float64:
        return "reference"  # the fused kernels compute in float32; float64 asks for the truth
    order = ("cuda", "triton") if device.type == "cuda" else ("cpu",)
    for name in order:
        if backend_status(name, device, op=op)[0]:
            return name
    return "reference"


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


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


@torch.no_grad()
def nowcast(rows: torch.Tensor, head, *, steps: int = 1, norm: Optional[str] = None,
            backend: str = "auto", all_steps: bool = False,
            out_dtype: Optional[torch.dtype] = None, out: Optional[torch.Tensor] = None,
            threads: Optional[int] = None, precision: str = "float32") -> torch.Tensor:
    """Predict ``steps`` values ahead for each row of ``rows`` (N, S), oldest value first.

    Returns (N,) — the ``steps``-th prediction — or (N, steps) with ``all_steps=True``, in
    ``out_dtype`` (default: the rows' dtype), or writes into ``out`` when given.
    ``norm=None`` uses the head's own normalisation; ``precision`` is described in the
    module docstring.
    """
    check_rows(rows, head)
    check_precision(precision)
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    norm = check_norm(head.norm if norm is None else norm)
    out_dtype = out_dtype or (out.dtype if out is not None else rows.dtype)
    shape = (rows.shape[0], steps) if all_steps else (rows.shape[0],)
    if out is not None:
        if tuple(out.shape) != shape or out.dtype != out_dtype or out.device != rows.device:
            raise ValueError(f"out must be {shape} {out_dtype} on {rows.device}, got "
                             f"{tuple(out.shape)} {out.dtype} on {out.device}")

    name = resolve_backend(backend, rows.device, rows.dtype)
    params = head.params_dict()
    if name == "reference":
        result = nowcast_ref(rows, params, norm, steps=steps, all_steps=all_steps)
        if out is None:
            return result.to(out_dtype)
        out.copy_(result)
        return out

    if rows.dtype not in KERNEL_DTYPES:
        raise TypeError(f"backend {name!r} takes {KERNEL_DTYPES}, got {rows.dtype}; "
                        f"use backend='reference' for float64")
    if out_dtype not in (torch.float32, rows.dtype):
        raise TypeError(f"backend {name!r} writes float32 or the input dtype ({rows.dtype}), "
                        f"not {out_dtype}")
    packed = pack({k: v.detach() for k, v in params.items()}, head.S).to(rows.device)
    target = out if out is not None and out.is_contiguous() else torch.empty(
        shape, dtype=out_dtype, device=rows.device)
    if rows.shape[0]:
        _kernel_module(name).run(rows.contiguous(), packed, S=head.S, norm=norm, steps=steps,
                                 out=target, threads=threads,
                                 **PRECISION_ARGS[name][precision])
    if out is not None and target is not out:
        out.copy_(target)
        return out
    return target
