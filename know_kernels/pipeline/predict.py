"""KNOW prediction at the level of whole checkpoints.

``predict([Θ^0, Θ^1, …, Θ^{S-1}], known)`` takes checkpoints in the paper's order (full data
first), reverses them into time order towards more data, flattens every parameter routed to
a head into rows of one (N, S) trajectory, predicts in bounded chunks and scatters the
predictions back into state dicts [Θ̂^{-1}, …, Θ̂^{-steps}].  Entries no head predicts are
copied from Θ^0 unchanged.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional, Sequence, Union

import torch

from ..kernels.baselines import DEFAULT_LAMBDA, METHODS as BASELINES, extrapolate
from ..fileio import load_state_dict
from ..known.heads import KNOWN, PRETRAINED
from ..kernels.nowcast import check_precision, nowcast
from ..known.routing import Route, route_state

Checkpoint = Union[str, os.PathLike, Mapping[str, torch.Tensor]]
NONFINITE = ("error", "passthrough")
METHODS = ("known",) + BASELINES
DEFAULT_CHUNK_ROWS = 1 << 20


def load_checkpoints(checkpoints: Sequence[Checkpoint]) -> tuple[list[dict], list[str]]:
    """State dicts and a label for each (its path, or ``checkpoint[i]``)."""
    states, labels = [], []
    for i, ck in enumerate(checkpoints):
        if isinstance(ck, Mapping):
            states.append(dict(ck))
            labels.append(f"checkpoint[{i}]")
        else:
            states.append(load_state_dict(ck))
            labels.append(str(ck))
    return states, labels


def check_consistent(states: Sequence[Mapping[str, torch.Tensor]], labels: Sequence[str]) -> None:
    """Every checkpoint must hold the same names with the same shapes and dtypes as Θ^0."""
    first, first_label = states[0], labels[0]
    for state, label in zip(states[1:], labels[1:]):
        missing = [k for k in first if k not in state]
        extra = [k for k in state if k not in first]
        if missing or extra:
            what = f"missing {missing[:5]}" if missing else f"has extra {extra[:5]}"
            raise ValueError(f"{label} {what} compared with {first_label}")
        for name, t0 in first.items():
            t = state[name]
            if t.shape != t0.shape or t.dtype != t0.dtype:
                raise ValueError(f"parameter {name!r}: {first_label} has {tuple(t0.shape)} "
                                 f"{t0.dtype} but {label} has {tuple(t.shape)} {t.dtype}")


@dataclass
class Segment:
    """Elements [start, stop) of the flattened parameter ``name``."""
    name: str
    start: int
    stop: int


def batches(segments: Sequence[Segment], chunk_rows: int) -> Iterator[list[Segment]]:
    """Group flat ranges of parameters (split where larger than a chunk) into batches of
    <= chunk_rows rows."""
    batch, rows = [], 0
    for seg in segments:
        start = seg.start
        while start < seg.stop:
            stop = min(seg.stop, start + chunk_rows - rows)
            batch.append(Segment(seg.name, start, stop))
            rows += stop - start
            start = stop
            if rows == chunk_rows:
                yield batch
                batch, rows = [], 0
    if batch:
        yield batch


def resolve_known(method: str, known) -> tuple[Optional[KNOWN], Optional[Path]]:
    """The KNOWN a method uses and the file it came from: none for the baselines, the
    shipped weights (``KNOWN.pretrained()``) when ``known`` is None, else a KNOWN or a path."""
    if method != "known":
        return None, None
    if known is None:
        return KNOWN.pretrained(), PRETRAINED
    if isinstance(known, KNOWN):
        return known, None
    return KNOWN.load(known), Path(known)


def check_arguments(*, method: str, nonfinite: str, steps: int,
                    chunk_rows: int, count: int, precision: str) -> None:
    """The checks every predict entry point makes before reading any weights."""
    check_precision(precision)
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    if nonfinite not in NONFINITE:
        raise ValueError(f"nonfinite must be one of {NONFINITE}, got {nonfinite!r}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
    if count < 2:
        raise ValueError(f"need at least 2 checkpoints, got {count}")


def group_by_head(routes: Mapping[str, Optional[str]], method: str, known: Optional[KNOWN],
                  S: int) -> dict[str, list[str]]:
    """Routed names per head, in state-dict order, after checking ``known`` can predict them."""
    by_head: dict[str, list[str]] = {}
    for name, head in routes.items():
        if head is None:
            continue
        if method == "known":
            if head not in known:
                raise ValueError(f"parameter {name!r} routes to head {head!r}, which this "
                                 f"KNOWN lacks (it has {list(known)}); pass route= to copy it")
            if known[head].S != S:
                raise ValueError(f"KNOWN head {head!r} takes S={known[head].S} snapshots but "
                                 f"{S} checkpoints were given")
        by_head.setdefault(head, []).append(name)
    return by_head


def dtype_groups(names: Sequence[str], dtypes: Mapping[str, torch.dtype],
                 sizes: Mapping[str, int]) -> list[list[Segment]]:
    """Whole-parameter segments of ``names`` grouped by dtype (the rows of a batch share one)."""
    return [[Segment(n, 0, sizes[n]) for n in names if dtypes[n] == dtype]
            for dtype in dict.fromkeys(dtypes[n] for n in names)]


def nonfinite_error(name: str, label: str) -> ValueError:
    return ValueError(f"parameter {name!r} holds NaN or Inf in {label}; "
                      f"pass nonfinite='passthrough' to keep such rows at Θ^0")


def predict_rows(rows: torch.Tensor, head: str, *, method: str, known, steps: int, lam: float,
                 backend: str, threads: Optional[int], nonfinite: str,
                 out_dtype: Optional[torch.dtype] = None,
                 precision: str = "float32") -> torch.Tensor:
    """(N, steps) predictions for time-ordered rows (N, S) of parameters routed to ``head``;
    ``known`` maps head names to KNOWN heads (the baselines ignore it)."""
    if method == "known":
        pred = nowcast(rows, known[head], steps=steps, backend=backend, all_steps=True,
                       threads=threads, out_dtype=out_dtype, precision=precision)
    else:
        pred = extrapolate(rows, method, steps=steps, all_steps=True, lam=lam, out_dtype=out_dtype)
    if nonfinite == "passthrough":
        bad = ~torch.isfinite(rows).all(dim=1)
        pred[bad] = rows[bad, -1:].to(pred.dtype)
    return pred


def predict(checkpoints: Sequence[Checkpoint], known: Optional[KNOWN] = None, *,
            steps: int = 1, method: str = "known", lam: float = DEFAULT_LAMBDA,
            backend: str = "auto", route: Route = None, nonfinite: str = "error",
            chunk_rows: int = DEFAULT_CHUNK_ROWS, threads: Optional[int] = None,
            precision: str = "float32",
            progress: Optional[Callable[[int], None]] = None) -> list[dict[str, torch.Tensor]]:
    """Predict [Θ̂^{-1}, …, Θ̂^{-steps}] from checkpoints [Θ^0, Θ^1, …] (paper order).

    ``checkpoints`` are state dicts or paths (``.pt``/``.pth`` loaded weights-only, or
    ``.safetensors``).  ``method`` is ``"known"`` (needs ``known``) or one of the baselines
    ``linear``, ``log``, ``exp``, ``taskvector`` (``lam`` is TaskVector's λ), which use the
    same routing.  ``precision`` is ``nowcast``'s (the GPU tensor-core modes "tf32" and
    "bf16" trade accuracy for speed).  ``nonfinite="passthrough"`` keeps rows holding
    NaN/Inf at their Θ^0 value instead of refusing them.  ``progress`` is called with the number of rows done.
    Everything is held in memory; ``know_kernels.io.streaming.predict_files`` streams files.
    """
    known = resolve_known(method, known)[0]
    check_arguments(method=method, nonfinite=nonfinite, steps=steps,
                    chunk_rows=chunk_rows, count=len(checkpoints), precision=precision)
    states, labels = load_checkpoints(checkpoints)
    check_consistent(states, labels)
    routes = route_state(states[0], route)
    by_head = group_by_head(routes, method, known, len(states))

    # Time order runs towards more data: Θ^{S-1} first, Θ^0 last.
    timeline = states[::-1]
    outputs = [{} for _ in range(steps)]
    for name, head in routes.items():
        if head is None:
            for out in outputs:
                out[name] = states[0][name].clone()
        else:
            for out in outputs:
                out[name] = torch.empty_like(states[0][name])
    sizes = {name: states[0][name].numel() for name in routes}
    dtypes = {name: states[0][name].dtype for name in routes}

    for head_name, names in by_head.items():
        for name in names:
            for state, label in zip(states, labels):
                if not torch.isfinite(state[name]).all() and nonfinite == "error":
                    raise nonfinite_error(name, label)
        for segments in dtype_groups(names, dtypes, sizes):
            for batch in batches(segments, chunk_rows):
                rows = torch.cat([
                    torch.stack([s[seg.name].reshape(-1)[seg.start:seg.stop] for s in timeline], dim=1)
                    for seg in batch])
                pred = predict_rows(rows, head_name, method=method, known=known, steps=steps,
                                    lam=lam, backend=backend, threads=threads, nonfinite=nonfinite,
                                    precision=precision)
                at = 0
                for seg in batch:
                    n = seg.stop - seg.start
                    for k, out in enumerate(outputs):
                        out[seg.name].view(-1)[seg.start:seg.stop] = pred[at:at + n, k]
                    at += n
                if progress is not None:
                    progress(rows.shape[0])
    return outputs


def count_rows(state: Mapping[str, torch.Tensor], route: Route = None) -> dict[str, int]:
    """Rows each head will predict for a model (for progress bars and cost estimates)."""
    counts: dict[str, int] = {}
    for name, head in route_state(state, route).items():
        if head is not None:
            counts[head] = counts.get(head, 0) + state[name].numel()
    return counts
