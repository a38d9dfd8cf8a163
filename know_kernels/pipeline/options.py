"""The options of a prediction, shared by ``predict`` and ``predict_files`` and checked here
once, before any checkpoint is read or any file created."""
from __future__ import annotations

import fnmatch
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch

from ..kernels.baselines import DEFAULT_LAMBDA, METHODS as BASELINES
from ..kernels.nowcast import backend_status, check_precision, check_precision_here
from ..known.heads import KNOWN, PRETRAINED_S, pretrained_path
from ..known.routing import Route

NONFINITE = ("error", "passthrough")
METHODS = ("known",) + BASELINES
DEFAULT_CHUNK_ROWS = 1 << 20
OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@dataclass(frozen=True)
class Options:
    """How to predict.

    ``steps``: predictions Θ̂^{-1} … Θ̂^{-steps} (×1/r, ×1/r², …).  ``method``: ``"known"``
    or a baseline (``linear``, ``log``, ``exp``, ``taskvector``; ``lam`` is TaskVector's λ),
    all with the same routing.  ``route``: which head predicts which entry (see
    ``known/routing.py``); ``keep``: glob patterns of entries copied from Θ^0 unchanged
    whatever ``route`` says.  ``nonfinite``: ``"error"`` refuses rows holding NaN/Inf,
    ``"passthrough"`` keeps them at Θ^0.  ``backend``, ``threads`` and ``precision`` are
    ``nowcast``'s (``"tf32"`` on a GPU and ``"bf16"`` on a GPU or a CPU with bfloat16
    products trade accuracy for speed).
    ``out_dtype`` converts every floating-point output (default: each tensor keeps Θ^0's
    dtype).  ``device``: where the rows are predicted.  ``chunk_rows``: rows per chunk
    (memory grows with it; results do not change for batch-invariant predictors).
    ``progress(done, total)`` is called with the rows done so far and in total.
    """
    steps: int = 1
    method: str = "known"
    lam: float = DEFAULT_LAMBDA
    backend: str = "auto"
    route: Route = None
    keep: Sequence[str] = ()
    nonfinite: str = "error"
    chunk_rows: int = DEFAULT_CHUNK_ROWS
    threads: Optional[int] = None
    precision: str = "float32"
    out_dtype: Union[torch.dtype, str, None] = None
    device: Union[torch.device, str] = "cpu"
    progress: Optional[Callable[[int, int], None]] = None

    def __post_init__(self):
        check_precision(self.precision)
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose from {METHODS}")
        if self.nonfinite not in NONFINITE:
            raise ValueError(f"nonfinite must be one of {NONFINITE}, got {self.nonfinite!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be a positive integer, got {self.steps!r}")
        if not isinstance(self.chunk_rows, int) or self.chunk_rows < 1:
            raise ValueError(f"chunk_rows must be a positive integer, got {self.chunk_rows!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"threads must be a positive integer or None, got {self.threads!r}")
        keep = (self.keep,) if isinstance(self.keep, str) else tuple(self.keep)
        if not all(isinstance(p, str) for p in keep):
            raise TypeError(f"keep must be glob patterns (strings), got {self.keep!r}")
        object.__setattr__(self, "keep", keep)
        object.__setattr__(self, "out_dtype", _out_dtype(self.out_dtype))
        device = torch.device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device {str(device)!r} requested but CUDA is not available")
        object.__setattr__(self, "device", device)
        if self.method == "known" and self.backend != "auto":
            ok, why = backend_status(self.backend, device)
            if not ok:
                raise RuntimeError(f"backend {self.backend!r} cannot run on {device}: {why}")
        if self.method == "known":
            check_precision_here(self.precision, self.backend, device)

    @classmethod
    def of(cls, caller: str, options: dict) -> "Options":
        names = [f.name for f in fields(cls)]
        unknown = [k for k in options if k not in names]
        if unknown:
            raise TypeError(f"{caller}() got unknown options {unknown}; options are {names}")
        return cls(**options)

    def kept(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in self.keep)


def _out_dtype(value) -> Optional[torch.dtype]:
    if value is None:
        return None
    dtype = value if isinstance(value, torch.dtype) else getattr(torch, str(value), None)
    if dtype not in OUT_DTYPES:
        raise ValueError(f"out_dtype must be one of {[str(d) for d in OUT_DTYPES]} (or its "
                         f"name), got {value!r}")
    return dtype


def resolve_known(method: str, known, count: int) -> tuple[Optional[KNOWN], Optional[Path]]:
    """The KNOWN a method uses with ``count`` checkpoints, and the file it came from: none
    for the baselines; when ``known`` is None, the shipped weights for S = ``count`` (the
    largest shipped S when more are given); else a KNOWN or a path."""
    if method != "known":
        return None, None
    if known is None:
        if count < min(PRETRAINED_S):
            raise ValueError(f"the shipped KNOWN takes S = {', '.join(map(str, PRETRAINED_S))} "
                             f"checkpoints (Θ^0 … Θ^{{S-1}}, full data first), got {count}")
        S = max(s for s in PRETRAINED_S if s <= count)
        return KNOWN.pretrained(S), pretrained_path(S)
    if isinstance(known, KNOWN):
        return known, None
    return KNOWN.load(known), Path(known)


def snapshot_count(count: int, known: Optional[KNOWN]) -> int:
    """How many of ``count`` checkpoints (Θ^0 first) to use: the heads' S for KNOWN (the
    most-data end when more are given, said once), all of them for a baseline."""
    if known is None:
        if count < 2:
            raise ValueError(f"need at least 2 checkpoints (Θ^0, Θ^1, …), got {count}")
        return count
    sizes = sorted({known[h].S for h in known})
    if len(sizes) > 1:
        raise ValueError(f"the KNOWN heads take different numbers of snapshots {sizes}")
    S = sizes[0]
    if count < S:
        raise ValueError(f"this KNOWN takes S={S} checkpoints (Θ^0 … Θ^{S - 1}, full data "
                         f"first), got {count}; the shipped KNOWN (the default) takes S = "
                         f"{', '.join(map(str, PRETRAINED_S))}")
    if count > S:
        warnings.warn(f"{count} checkpoints given, this KNOWN takes S={S}: using the first "
                      f"{S} (Θ^0 … Θ^{S - 1}, the most-data end)", stacklevel=3)
    return S
