"""Which KNOWN head predicts which state-dict entry.

Default rule (the authors'): weights with ndim >= 3 -> "conv", 2-D weights -> "fc",
1-D tensors named ``*bias`` -> "bias"; everything else (normalisation-layer affine
parameters, running statistics, integer buffers) is copied from Θ^0 unchanged.

A normalisation layer's bias also ends in ``bias``; it is told apart by its sibling
``weight``: a conv/linear bias sits beside a weight of ndim >= 2, a BatchNorm/LayerNorm
bias beside a 1-D weight (or beside ``running_mean``).
"""
from __future__ import annotations

import fnmatch
from typing import Callable, Mapping, Optional, Union

import torch

HEADS = ("conv", "fc", "bias")

RouteFn = Callable[[str, torch.Tensor, Mapping[str, torch.Tensor]], Optional[str]]
Route = Union[None, RouteFn, Mapping[str, Optional[str]]]


def default_route(name: str, tensor: torch.Tensor,
                  state: Mapping[str, torch.Tensor]) -> Optional[str]:
    if not tensor.is_floating_point():
        return None
    if tensor.dim() >= 3:
        return "conv"
    if tensor.dim() == 2:
        return "fc"
    if tensor.dim() == 1 and name.endswith("bias"):
        prefix = name[: -len("bias")]
        if (prefix + "running_mean") in state:
            return None
        sibling = state.get(prefix + "weight")
        if sibling is not None and sibling.dim() < 2:
            return None
        return "bias"
    return None


def make_router(route: Route = None) -> RouteFn:
    """``route`` may be None (default rule), a callable ``(name, tensor, state) -> head|None``,
    or a mapping from glob patterns over names to a head or None (first match wins,
    unmatched names fall back to the default rule)."""
    if route is None:
        return default_route
    if callable(route):
        return route
    patterns = dict(route)
    for pattern, head in patterns.items():
        if head is not None and head not in HEADS:
            raise ValueError(f"route pattern {pattern!r} maps to unknown head {head!r}; "
                             f"heads are {HEADS} or None (copy unchanged)")

    def routed(name: str, tensor: torch.Tensor, state: Mapping[str, torch.Tensor]):
        for pattern, head in patterns.items():
            if fnmatch.fnmatchcase(name, pattern):
                return head
        return default_route(name, tensor, state)

    return routed


def route_state(state: Mapping[str, torch.Tensor], route: Route = None) -> dict[str, Optional[str]]:
    """name -> head (or None) for every entry, in the state dict's order."""
    fn = make_router(route)
    out = {}
    for name, tensor in state.items():
        head = fn(name, tensor, state)
        if head is not None and head not in HEADS:
            raise ValueError(f"router sent {name!r} to unknown head {head!r}; heads are {HEADS}")
        out[name] = head
    return out
