"""Spreading streaming prediction over processes with ``torch.distributed``.

Under ``torchrun`` (``WORLD_SIZE`` > 1) the process group is initialised here — gloo when
computing on the CPU, NCCL on GPUs — unless the caller already did.  Every rank computes the
same plan, takes its share of the parameter bytes (:func:`split`) and writes it straight into
output files that rank 0 created, so the files are byte-identical to a one-process run when
the predictor is batch-invariant.

Each phase ends in :meth:`Comm.step`, which all-reduces a failure flag: an error on one rank
makes every rank stop at the same point with an error naming the rank, instead of leaving
the others waiting in a barrier.
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator, Optional, Sequence, TypeVar

import torch
import torch.distributed as dist

from .plan import Segment

T = TypeVar("T")


class RankFailed(RuntimeError):
    """Another rank raised; its own message says why."""


class Comm:
    """This process's place in the job: ``rank`` of ``world``, computing on ``device``."""

    def __init__(self, rank: int, world: int, device: torch.device):
        self.rank, self.world, self.device = rank, world, device

    def step(self, fn: Callable[[], T], cleanup: Optional[Callable[[], None]] = None) -> T:
        """Run one phase on every rank; raise on all of them if it failed on any.

        On failure ``cleanup`` (if given on this rank) runs before any rank raises, so the
        launcher cannot kill this process halfway through it when another one exits.
        """
        if self.world == 1:
            try:
                return fn()
            except BaseException:
                if cleanup is not None:
                    cleanup()
                raise
        result, error = None, None
        try:
            result = fn()
        except Exception as exc:  # every error must reach the flag, or the others hang
            error = exc
        flags = torch.zeros(self.world, dtype=torch.int32, device=self._flag_device())
        flags[self.rank] = int(error is not None)
        dist.all_reduce(flags)
        failed = flags.nonzero().flatten().tolist()
        if not failed:
            return result
        messages = [None] * self.world
        mine = None if error is None else f"{type(error).__name__}: {error}"
        dist.all_gather_object(messages, mine)
        try:
            if cleanup is not None:
                cleanup()
        finally:
            dist.all_reduce(torch.zeros(1, device=self._flag_device()))  # wait for the cleanup
        if error is not None:
            raise error
        raise RankFailed("; ".join(f"rank {r} failed: {messages[r]}" for r in failed))

    def shared(self, value: T) -> T:
        """Rank 0's ``value`` on every rank (a picklable object)."""
        if self.world == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _flag_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")


@contextlib.contextmanager
def communicator(device: torch.device | str = "cpu") -> Iterator[Comm]:
    """The current process group, one initialised from torchrun's environment (and torn down
    afterwards), or a single process.  ``device`` ``cuda`` means this rank's LOCAL_RANK GPU."""
    device = torch.device(device)
    if dist.is_available() and dist.is_initialized():
        yield Comm(dist.get_rank(), dist.get_world_size(), _rank_device(device))
        return
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield Comm(0, 1, device)
        return
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    device = _rank_device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield Comm(dist.get_rank(), dist.get_world_size(), device)
    finally:
        dist.destroy_process_group()


def _rank_device(device: torch.device) -> torch.device:
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def split(groups: Sequence[Sequence[Segment]], weights: Sequence[int], rank: int,
          world: int) -> list[list[Segment]]:
    """Rank ``rank``'s part of every group: the groups' segments laid end to end, each element
    costing its group's weight (bytes), cut into ``world`` spans of equal cost.

    Integer arithmetic only, so every rank computes the same cuts; the parts of all ranks
    cover every element exactly once and a parameter may be split between ranks.
    """
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, {world}), got {rank}")
    total = sum(w * (seg.stop - seg.start) for group, w in zip(groups, weights) for seg in group)
    lo_cut, hi_cut = rank * total // world, (rank + 1) * total // world
    mine, at = [], 0
    for group, w in zip(groups, weights):
        part = []
        for seg in group:
            n = seg.stop - seg.start
            # First element of the segment at or past a cut: ceil((cut - at) / w), clamped.
            lo = min(n, max(0, -(-(lo_cut - at) // w)))
            hi = min(n, max(0, -(-(hi_cut - at) // w)))
            if hi > lo:
                part.append(Segment(seg.name, seg.start + lo, seg.start + hi))
            at += w * n
        mine.append(part)
    return mine
