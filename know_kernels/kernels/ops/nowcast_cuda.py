"""The ``cuda`` backend of ``nowcast``: the tensor-core kernel of ``know_kernels._cuda``
(csrc/cuda/nowcast.cu).  That module links no torch: this wrapper hands over device
pointers and the current torch stream.

``mode`` picks the products' precision: ``"precise"`` (default) splits every float32
operand into two TF32 parts and sums three tensor-core products (3xTF32), which meets
the test suite's 1e-5 bound; ``"fast"`` uses one TF32 product (operands rounded to
nearest at 10 mantissa bits: relative error 1e-6 to 6e-5 against float64 when the
rounding is emulated on the CPU, ``bench/bench_nowcast_gpu.py --tf32-estimate``; the GPU
tests allow 1e-3).

``blocks_per_sm`` picks the kernel's register budget: 1 (up to 255 registers per thread,
8 warps per SM) or 2 (128 registers, 16 warps per SM to hide latency, a few spills).  The
same arithmetic runs either way, so the results are identical; only the speed differs, and
by card.  Left as None, the first call on a device with at least ``TUNE_MIN_ROWS`` rows
times both on its own rows (each run writes the same ``out``, which that call then
returns) and later calls reuse the faster; smaller calls before that, and calls during
CUDA graph capture, use 1.  ``mode`` and ``blocks_per_sm`` are this backend's own knobs:
``run`` checks them, as no public entry point takes them.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from . import check_nowcast_call, dtype_code, invariant

try:
    from ... import _cuda
    _IMPORT_ERROR = ""
except ImportError as exc:  # built without nvcc, or a broken build
    _cuda = None
    _IMPORT_ERROR = str(exc)

MODES = ("precise", "fast")
BLOCKS_PER_SM = (1, 2)
TUNE_MIN_ROWS = 1 << 20  # a launch on fewer rows is too short to time reliably
MIN_CAPABILITY = (8, 0)  # mma.sync with TF32 operands
MAX_WINDOW = _cuda.MAX_WINDOW if _cuda is not None else None


def module():
    """The compiled module, or a RuntimeError saying why there is none."""
    if _cuda is None:
        raise RuntimeError(f"know_kernels._cuda is not built ({_IMPORT_ERROR}); install with "
                           f"nvcc on PATH (or CUDA_HOME set) to build it")
    return _cuda


def available(device: torch.device) -> tuple[bool, str]:
    device = torch.device(device)
    if _cuda is None:
        return False, f"know_kernels._cuda is not built ({_IMPORT_ERROR})"
    if device.type != "cuda":
        return False, f"the cuda backend runs on CUDA tensors, not {device.type}"
    count, why = _cuda.runtime_status()
    if count == 0:
        return False, f"no CUDA device usable by know_kernels._cuda ({why})"
    if not torch.cuda.is_available():
        return False, "torch sees no CUDA device (a CPU-only torch build?)"
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index >= count:
        return False, f"device cuda:{index} does not exist ({count} device(s))"
    cc = _cuda.compute_capability(index)
    if cc < 10 * MIN_CAPABILITY[0] + MIN_CAPABILITY[1]:
        return False, (f"cuda:{index} has compute capability {cc // 10}.{cc % 10}; the kernel "
                       f"needs {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer")
    return True, f"tensor-core kernel ({_cuda.build_info()})"


# (device index, precise, S) -> the blocks_per_sm that timed faster there.
_tuned: dict[tuple[int, bool, int], int] = {}


def tuned() -> dict[tuple[int, bool, int], int]:
    """The choices made so far, keyed by (device index, precise, S)."""
    return dict(_tuned)


def _tuning_ms(launch: Callable[[], None]) -> float:
    """The faster of two launches timed by CUDA events on the current stream, after an
    untimed one (which pays for loading the kernel)."""
    launch()
    events = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
    events[0].record()
    launch()
    events[1].record()
    launch()
    events[2].record()
    events[2].synchronize()
    return min(events[0].elapsed_time(events[1]), events[1].elapsed_time(events[2]))


def launch_tuned(key: tuple[int, bool, int], launch: Callable[[int], None], can_time: bool,
                 timer: Callable[[Callable[[], None]], float] = _tuning_ms) -> None:
    """``launch(blocks_per_sm)`` with the register budget for this call (module docstring):
    a cached choice; else, when the call ``can_time``, every budget timed by ``timer``
    (whose runs of ``launch`` leave the output written) and the faster remembered; else 1."""
    if key in _tuned:
        launch(_tuned[key])
    elif can_time:
        times = {b: timer(lambda b=b: launch(b)) for b in BLOCKS_PER_SM}
        _tuned[key] = min(BLOCKS_PER_SM, key=times.__getitem__)
    else:
        launch(1)


def run(rows: torch.Tensor, packed: torch.Tensor, *, S: int, norm: str, steps: int,
        out: torch.Tensor, threads: Optional[int] = None, mode: str = "precise",
        blocks_per_sm: Optional[int] = None) -> None:
    """Backend entry point (see ``know_kernels.kernels.nowcast``); ``threads`` is a CPU-backend
    notion and is ignored; ``mode`` and ``blocks_per_sm`` are described in the module
    docstring."""
    del threads
    invariant(mode in MODES, f"mode {mode!r} not in {MODES}")
    invariant(blocks_per_sm in (None, *BLOCKS_PER_SM),
              f"blocks_per_sm {blocks_per_sm!r} not in {BLOCKS_PER_SM} or None")
    check_nowcast_call(rows, packed, out, S=S, steps=steps, device_type="cuda")
    C = module()
    n = rows.shape[0]

    def launch(blocks: int) -> None:
        C.nowcast(rows.data_ptr(), dtype_code(C, rows.dtype), packed.data_ptr(), out.data_ptr(),
                  dtype_code(C, out.dtype), n, S, norm == "wnn", steps, out.dim() == 2,
                  mode == "precise", blocks, torch.cuda.current_stream(rows.device).cuda_stream,
                  rows.device.index)

    with torch.cuda.device(rows.device):
        if blocks_per_sm is not None:
            launch(blocks_per_sm)
        else:
            can_time = n >= TUNE_MIN_ROWS and not torch.cuda.is_current_stream_capturing()
            launch_tuned((rows.device.index, mode == "precise", S), launch, can_time)
