"""Timing of GPU work for the benchmarks, by CUDA events on the current stream."""
from __future__ import annotations

from typing import Callable

import torch


def cuda_ms(fn: Callable[[], None], repeats: int) -> float:
    """Best time of ``repeats`` calls of fn, in ms."""
    best = float("inf")
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end))
    return best
