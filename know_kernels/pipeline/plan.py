"""What a prediction will do, decided before any value is read: which entries each head
predicts, which are copied from Θ^0, how the rows are grouped into chunks, and this
process's share of the work under ``torchrun``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Mapping, Optional, Sequence

import torch

from ..known.heads import KNOWN
from ..known.routing import Route, route_state
from ..io.sources import Source
from .options import Options


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


def check_consistent(sources: Sequence[Source]) -> None:
    """Every checkpoint must hold the same names with the same shapes and dtypes as Θ^0."""
    first = sources[0]
    for source in sources[1:]:
        missing = [k for k in first.tensors if k not in source.tensors]
        extra = [k for k in source.tensors if k not in first.tensors]
        if missing or extra:
            what = f"missing {missing[:5]}" if missing else f"has extra {extra[:5]}"
            raise ValueError(f"{source.label} {what} compared with {first.label}")
        for name, r0 in first.tensors.items():
            r = source.tensors[name]
            if r.shape != r0.shape or r.dtype != r0.dtype:
                raise ValueError(f"parameter {name!r}: {first.label} has {r0.shape} {r0.dtype} "
                                 f"but {source.label} has {r.shape} {r.dtype}")


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
                                 f"KNOWN lacks (it has {list(known)}); pass route= or keep= "
                                 f"to copy it")
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


def routes_of(source: Source, route: Route, keep) -> dict[str, Optional[str]]:
    """name -> head, or None (copied from Θ^0), for every entry but tied ones (which follow
    the entry they are tied to); ``keep`` is a predicate on names forcing a copy."""
    routes = route_state(source.meta_state(), route)
    return {n: None if keep(n) else h for n, h in routes.items() if n not in source.tied}


@dataclass
class Plan:
    """``groups``: (head or None for copies, segments of one dtype) in processing order,
    cut to this process's share; ``rows``: the predicted rows in that share."""
    groups: list[tuple[Optional[str], list[Segment]]]
    in_dtype: dict[str, torch.dtype]
    out_dtype: dict[str, torch.dtype]
    rows: int


def output_dtypes(source: Source, out_dtype: Optional[torch.dtype]) -> dict[str, torch.dtype]:
    return {n: out_dtype if out_dtype is not None and r.dtype.is_floating_point else r.dtype
            for n, r in source.tensors.items()}


def make_plan(sources: Sequence[Source], options: Options, known: Optional[KNOWN],
              share=None) -> Plan:
    """The plan over ``sources`` (Θ^0 first); ``share(groups, weights)`` cuts the groups to
    this process's part (see ``distributed.split``), by default all of them."""
    check_consistent(sources)
    first = sources[0]
    routes = routes_of(first, options.route, options.kept)
    by_head = group_by_head(routes, options.method, known, len(sources))
    sizes = {n: r.numel for n, r in first.tensors.items()}
    in_dtype = {n: r.dtype for n, r in first.tensors.items()}
    groups = [(h, segs) for h, names in by_head.items()
              for segs in dtype_groups(names, in_dtype, sizes)]
    copied = [n for n, h in routes.items() if h is None]
    groups += [(None, segs) for segs in dtype_groups(copied, in_dtype, sizes)]
    if share is not None:
        # Cost by bytes read: a predicted element reads S snapshots, a copied one only Θ^0.
        weights = [in_dtype[segs[0].name].itemsize * (len(sources) if h is not None else 1)
                   for h, segs in groups]
        groups = [(h, part) for (h, _), part in
                  zip(groups, share([segs for _, segs in groups], weights))]
    rows = sum(seg.stop - seg.start for h, part in groups if h is not None for seg in part)
    return Plan(groups, in_dtype, output_dtypes(first, options.out_dtype), rows)


def count_rows(state: Mapping[str, torch.Tensor], route: Route = None) -> dict[str, int]:
    """Rows each head will predict for a model (for progress bars and cost estimates)."""
    counts: dict[str, int] = {}
    for name, head in route_state(state, route).items():
        if head is not None:
            counts[head] = counts.get(head, 0) + state[name].numel()
    return counts
