"""``nowcast``: predict the next value(s) of every row of an (N, S) trajectory tensor.

One entry point, several backends (dispatch: ``backends.py``).  The reference backend is
plain PyTorch and always works; the fused backends (``cpu``, ``triton``, ``cuda``) live in
``ops/nowcast_<name>.py``, one file each, and all read the head in the packed form of
``packing.py``.  ``nowcast`` validates every argument; the backends trust it.

Backend contract (``run``; ``backends.py`` lists what else a backend module provides):

    run(rows, packed, *, S, norm, steps, out, threads, **precision_args) -> None

``rows`` is a contiguous (N, S) tensor, N > 0, of a dtype in ``KERNEL_DTYPES``, ``packed``
the float32 packed head on the same device, ``out`` a contiguous tensor of a kernel dtype on
the same device, (N, steps) when every step is wanted or (N,) for the last step only; the
kernel writes every element.  ``norm`` is valid, ``steps`` >= 1, ``threads`` None or >= 1.

``precision`` is the lowest precision the matrix products may use, as torch's
``allow_tf32`` is a permission rather than an order: "float32" (default) keeps every
backend within the 1e-5 bound of the tests; "tf32" and "bf16" let the GPU backends round
the products' operands for tensor-core speed, and "bf16" the CPU backend too, with
VDPBF16PS where the processor has AVX512_BF16 (their errors: ``PRECISION_ARGS`` below and
bench/RESULTS.md; what bf16 rounds: ``reference_bf16.py``).  A backend without the mode
asked for uses its next more precise one: the CPU backend's "tf32" and the reference
backend compute in float32 (float64 for float64 rows), and the CUDA backend's products go
no lower than TF32.  The one exception: the CPU backend refuses "bf16" on a processor
without bfloat16 products (RuntimeError naming what is missing) rather than silently
run the slower float32 products.

Under autograd (grad mode on, and ``rows`` or a parameter of the head requiring grad)
``nowcast`` returns a differentiable tensor: gradients reach the head's parameters (through
``packing.pack``) and the rows.  The fused backends then unroll the steps in Python, each
one call of the custom op ``know_kernels::nowcast_step`` (``step.py``: forward the fused
kernel with ``steps=1``, backward the backend's fused VJP, ``ops/vjp_<name>.py``), sliding
the window by dropping its oldest value and appending the float32 prediction, as the
multi-step kernel does, so the values are the same; ``auto`` picks a backend that has a
VJP, else ``reference``, which is plain autograd on ``reference.nowcast_ref``.  The row
gradient is computed in float32 and handed to autograd in the rows' dtype.

``out=``, ``threads=`` and a ``precision`` other than "float32" are inference-only: a call
with any of them runs the fast multi-step kernel under ``torch.no_grad()``, as without
grad, and its result does not require grad (``backward`` through it says so).  A head's
parameters require grad by default, so this keeps every inference call that passes them
as fast as before.  Rows that require grad state the wish for a gradient, so with them
these arguments are refused (ValueError naming the argument).  Without grad (no_grad, or
nothing requiring grad) the fast path runs, unchanged.
"""
from __future__ import annotations

from typing import Optional

import torch

from .backends import (BACKENDS, REFERENCE_DTYPES, backend_module, backend_status,
                       check_kernel_dtype, check_rows, fused_module, resolve_backend)
from .ops import KERNEL_DTYPES
from .packing import pack
from .reference import check_norm, nowcast_ref
from .step import nowcast_step

__all__ = ["BACKENDS", "KERNEL_DTYPES", "PRECISIONS", "PRECISION_ARGS", "REFERENCE_DTYPES",
           "backend_status", "check_precision", "check_precision_here", "nowcast",
           "resolve_backend"]

PRECISIONS = ("float32", "tf32", "bf16")
# What each fused backend's ``run`` is passed for each precision.  Relative errors against
# float64 over 3 steps, emulated on the CPU (bench/bench_nowcast_gpu.py --tf32-estimate):
# triton tf32 up to 6e-4, cuda fast up to 6e-5, triton bf16 up to 1.1e-3 (2.6e-5 on
# weight-like rows with "wnn"); "float32" ≤ 1.4e-7.  cpu bf16 (VDPBF16PS, measured): up
# to 6.7e-3 (heads with random biases, randn rows), within 1.1e-5 of the float64 reference
# of the same rounding (reference_bf16.py; tests/kernels/test_nowcast_cpu_bf16.py).
PRECISION_ARGS = {
    "cpu": {"float32": {}, "tf32": {}, "bf16": {"products": "bf16"}},
    "triton": {"float32": {"input_precision": "ieee"}, "tf32": {"input_precision": "tf32"},
               "bf16": {"input_precision": "bf16"}},
    "cuda": {"float32": {"mode": "precise"}, "tf32": {"mode": "fast"}, "bf16": {"mode": "fast"}},
}


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


def check_precision_here(precision: str, backend: str, device: torch.device) -> None:
    """Refuses, before any work, a precision the backend (``auto``: the one it picks for
    float32 rows) would refuse on ``device``: the CPU backend's "bf16" on a processor
    without bfloat16 products (RuntimeError naming what is missing)."""
    device = torch.device(device)
    if check_precision(precision) != "bf16" or device.type != "cpu":
        return
    if resolve_backend(backend, device, torch.float32) == "cpu":
        backend_module("cpu", "nowcast").kernel_name("bf16")


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
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive integer or None, got {threads!r}")
    norm = check_norm(head.norm if norm is None else norm)
    out_dtype = out_dtype or (out.dtype if out is not None else rows.dtype)
    shape = (rows.shape[0], steps) if all_steps else (rows.shape[0],)
    if out is not None:
        if tuple(out.shape) != shape or out.dtype != out_dtype or out.device != rows.device:
            raise ValueError(f"out must be {shape} {out_dtype} on {rows.device}, got "
                             f"{tuple(out.shape)} {out.dtype} on {out.device}")

    params = head.params_dict()
    inference_only = {"out": out is not None, "threads": threads is not None,
                      "precision": precision != "float32"}
    if torch.is_grad_enabled() and rows.requires_grad and any(inference_only.values()):
        arg = next(k for k, given in inference_only.items() if given)
        raise ValueError(f"rows require grad, but {arg}= makes nowcast inference-only (no "
                         f"gradient); drop {arg}=, or detach the rows")
    if (torch.is_grad_enabled() and not any(inference_only.values())
            and (rows.requires_grad or any(p.requires_grad for p in params.values()))):
        return _differentiable(rows, head.S, params, norm, backend, steps, all_steps, out_dtype)
    with torch.no_grad():
        return _fast(rows, head.S, params, norm, backend, steps, all_steps, out_dtype, out,
                     threads, precision, shape)


def _check_out_dtype(name: str, rows: torch.Tensor, out_dtype: torch.dtype) -> None:
    check_kernel_dtype(name, rows.dtype)
    if out_dtype not in (torch.float32, rows.dtype):
        raise TypeError(f"backend {name!r} writes float32 or the input dtype ({rows.dtype}), "
                        f"not {out_dtype}")


def _differentiable(rows, S, params, norm, backend, steps, all_steps, out_dtype):
    name = resolve_backend(backend, rows.device, rows.dtype, op="vjp")
    if name == "reference":
        return nowcast_ref(rows, params, norm, steps=steps, all_steps=all_steps).to(out_dtype)
    _check_out_dtype(name, rows, out_dtype)
    packed = pack(params, S).to(rows.device)
    window, preds = rows.contiguous(), []
    for k in range(steps):
        preds.append(nowcast_step(window, packed, S, norm, name))
        if k + 1 < steps:
            window = torch.cat([window[:, 1:].to(torch.float32), preds[-1][:, None]], dim=1)
    return (torch.stack(preds, dim=1) if all_steps else preds[-1]).to(out_dtype)


def _fast(rows, S, params, norm, backend, steps, all_steps, out_dtype, out, threads, precision,
          shape):
    name = resolve_backend(backend, rows.device, rows.dtype)
    if name == "reference":
        result = nowcast_ref(rows, params, norm, steps=steps, all_steps=all_steps)
        if out is None:
            return result.to(out_dtype)
        out.copy_(result)
        return out

    _check_out_dtype(name, rows, out_dtype)
    module = fused_module(name, "nowcast", S)
    packed = pack({k: v.detach() for k, v in params.items()}, S).to(rows.device)
    target = out if out is not None and out.is_contiguous() else torch.empty(
        shape, dtype=out_dtype, device=rows.device)
    if rows.shape[0]:
        module.run(rows.contiguous(), packed, S=S, norm=norm, steps=steps, out=target,
                   threads=threads, **PRECISION_ARGS[name][precision])
    if out is not None and target is not out:
        out.copy_(target)
        return out
    return target
