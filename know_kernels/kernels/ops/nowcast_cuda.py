"""The ``cuda`` backend of ``nowcast``: the tensor-core kernel of ``know_kernels._cuda``
(csrc/cuda/nowcast.cu).  That module links no torch: this wrapper validates the tensors
and hands over device pointers and the current torch stream.

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
CUDA graph capture, use 1.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ..packing import packed_size
from ..reference import check_norm
from . import require_runnable

try:
    from ... import _cuda
    _IMPORT_ERROR = ""
except ImportError as exc:  # built without nvcc, or a broken build
    _cuda = None
    _IMPORT_ERROR = str(exc)

MODES = ("precise", "fast")
BLOCKS_PER_SM = (1, 2)
TUNE_MIN_ROWS = 1 << 20  # a launch on fewer rows is too short to time reliably
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
MIN_CAPABILITY = (8, 0)  # mma.sync with TF32 operands


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


def check_tensors(rows: torch.Tensor, S: int, **others: torch.Tensor) -> None:
    """All contiguous CUDA tensors on the rows' device, rows (N, S) of a dtype the kernels
    read, and S a window the kernels take."""
    for name, t in (("rows", rows), *others.items()):
        if t.device.type != "cuda" or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous CUDA tensor, got {t.device} "
                             f"(contiguous={t.is_contiguous()})")
        if t.device != rows.device:
            raise ValueError(f"{name} is on {t.device} but rows are on {rows.device}")
    if rows.dim() != 2 or rows.shape[1] != S:
        raise ValueError(f"rows must be (N, S={S}), got {tuple(rows.shape)}")
    if not 2 <= S <= module().MAX_WINDOW:
        raise ValueError(f"the cuda backend takes 2 <= S <= {module().MAX_WINDOW}, got S={S}")
    if rows.dtype not in DTYPE_NAMES:
        raise TypeError(f"rows dtype {rows.dtype} is not one of {tuple(DTYPE_NAMES)}")


# (device index, precise, S) -> the blocks_per_sm that timed faster there.
_tuned: dict[tuple[int, bool, int], int] = {}


def tuned() -> dict[tuple[int, bool, int], int]:
    """The choices made so far, keyed by (device index, precise, S): for benchmarks."""
    return dict(_tuned)


def cuda_ms(fn: Callable[[], None], repeats: int) -> float:
    """Best time of ``repeats`` calls of fn, in ms, by CUDA events on the current stream
    (the benchmarks use it too)."""
    best = float("inf")
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end))
    return best


def _tuning_ms(launch: Callable[[], None]) -> float:
    """Best of two timed launches, after one untimed."""
    launch()
    return cuda_ms(launch, 2)


def launch_tuned(key: tuple[int, bool, int], launch: Callable[[int], None], can_time: bool,
                 timer: Callable[[Callable[[], None]], float] = _tuning_ms) -> None:
    """``launch(blocks_per_sm)`` with the register budget for this call (module docstring):
    a cached choice; else, when the call ``can_time``, every budget timed with ``launch``
    (whose runs leave the output written) and the faster remembered; else 1."""
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
    C = module()
    check_norm(norm)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if blocks_per_sm is not None and blocks_per_sm not in BLOCKS_PER_SM:
        raise ValueError(f"blocks_per_sm must be one of {BLOCKS_PER_SM} or None, got "
                         f"{blocks_per_sm!r}")
    check_tensors(rows, S, packed=packed, out=out)
    if out.dtype not in DTYPE_NAMES:
        raise TypeError(f"out dtype {out.dtype} is not one of {tuple(DTYPE_NAMES)}")
    if packed.dtype != torch.float32 or packed.numel() != packed_size(S):
        raise ValueError(f"packed must be the float32 packed head ({packed_size(S)} values), "
                         f"got {packed.numel()} {packed.dtype}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    n = rows.shape[0]
    if tuple(out.shape) not in ((n, steps), (n,)):
        raise ValueError(f"out must be ({n}, {steps}) or ({n},), got {tuple(out.shape)}")
    if n == 0:
        return
    require_runnable("cuda", available, rows.device)
    codes = C.DTYPE_CODES

    def launch(blocks: int) -> None:
        C.nowcast(rows.data_ptr(), codes[DTYPE_NAMES[rows.dtype]], packed.data_ptr(),
                  out.data_ptr(), codes[DTYPE_NAMES[out.dtype]], n, S, norm == "wnn", steps,
                  out.dim() == 2, mode == "precise", blocks,
                  torch.cuda.current_stream(rows.device).cuda_stream, rows.device.index)

    with torch.cuda.device(rows.device):
        if blocks_per_sm is not None:
            launch(blocks_per_sm)
        else:
            can_time = n >= TUNE_MIN_ROWS and not torch.cuda.is_current_stream_capturing()
            launch_tuned((rows.device.index, mode == "precise", S), launch, can_time)
