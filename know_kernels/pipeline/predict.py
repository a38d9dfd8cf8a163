"""KNOW prediction at the level of whole checkpoints: one pipeline, two entry points.

``predict([Θ^0, Θ^1, …, Θ^{S-1}], known)`` and ``predict_files([…], out_dir, known)`` take
checkpoints in the paper's order (full data first), reverse them into time order towards
more data, and predict [Θ̂^{-1}, …, Θ̂^{-steps}] a chunk of rows at a time (``run.py``):
``predict`` from state dicts or files into state dicts in memory, ``predict_files`` from
files into files written atomically, with memory O(chunk) instead of O(model) and, under
``torchrun``, the work split over the processes (``distributed.py``).  Both take the same
options (:class:`~know_kernels.pipeline.options.Options`) and give identical values.
Entries no head predicts are copied from Θ^0 unchanged.
"""
from __future__ import annotations

import contextlib
import copy
import os
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import torch

from ..fileio import load_state_dict, output_lock, unique_token
from ..io.sinks import FileSink, MemorySink
from ..io.sources import FileSource, Source, open_checkpoint, open_source
from ..known.heads import KNOWN
from .distributed import Comm, communicator, split
from .options import Options, resolve_known, snapshot_count
from .plan import make_plan, output_dtypes
from .run import run

PathLike = Union[str, os.PathLike]
Checkpoint = Union[PathLike, Mapping[str, torch.Tensor]]


@contextlib.contextmanager
def _opened(checkpoints: Sequence[Checkpoint], opener):
    sources: list[Source] = []
    try:
        for i, ck in enumerate(checkpoints):
            sources.append(opener(ck, i))
        yield sources
    finally:
        for s in sources:
            s.close()


def _prepare(caller: str, checkpoints: Sequence, known, options: dict):
    """Check every option, then pick the KNOWN and the checkpoints it takes."""
    opts = Options.of(caller, options)
    known, known_path = resolve_known(opts.method, known, len(checkpoints))
    used = list(checkpoints)[:snapshot_count(len(checkpoints), known)]
    return opts, known, known_path, used


def _heads_on(known: Optional[KNOWN], device: torch.device):
    if known is None or device.type == "cpu":
        return known
    return {h: copy.deepcopy(known[h]).to(device) for h in known}


def _execute(sources: Sequence[Source], sink, plan, known, opts: Options, comm: Comm) -> None:
    """Create (one process), fill (every process) and commit the sink; on any failure every
    process stops and the sink is discarded."""
    rank0 = comm.rank == 0
    cleanup = sink.discard if rank0 else None

    def compute():
        finished = False
        sink.open()
        try:
            run(sources, sink, plan, _heads_on(known, comm.device), opts, comm.device)
            finished = True
        finally:
            sink.close(sync=finished)
        expected = sum((seg.stop - seg.start) * plan.out_dtype[seg.name].itemsize
                       for _, part in plan.groups for seg in part) * opts.steps
        if sink.written != expected:
            raise RuntimeError(f"wrote {sink.written} bytes of predictions, expected {expected}")

    comm.step(lambda: sink.create() if rank0 else None, cleanup)
    comm.step(compute, cleanup)
    comm.step(lambda: sink.commit() if rank0 else None, cleanup)


def predict(checkpoints: Sequence[Checkpoint], known: Union[KNOWN, PathLike, None] = None,
            **options) -> list[dict[str, torch.Tensor]]:
    """Predict [Θ̂^{-1}, …, Θ̂^{-steps}] as state dicts from checkpoints [Θ^0, Θ^1, …].

    ``checkpoints``: state dicts, or paths of anything ``predict_files`` reads (read a chunk
    at a time, so only the outputs are held whole).  ``known``: a KNOWN, the path of one, or
    None for the shipped weights of S = the number of checkpoints (3, 4 or 5); with more
    checkpoints than its S, the first S (the full-data end) are used, and a warning says so.  ``options``: see :class:`Options` (``steps``, ``method``,
    ``route``, ``keep``, ``nonfinite``, ``out_dtype``, ``progress``, …).  Each output tensor
    lies where Θ^0's does; tied entries of Θ^0 stay tied.  A router passed as ``route``
    sees meta tensors (shape and dtype, no values).
    """
    opts, known, _, used = _prepare("predict", checkpoints, known, options)
    with _opened(used, open_source) as sources:
        plan = make_plan(sources, opts, known)
        sink = MemorySink(sources[0], opts.steps, plan.out_dtype)
        _execute(sources, sink, plan, known, opts, Comm(0, 1, opts.device))
        return sink.states


def predict_files(checkpoints: Sequence[PathLike], out_dir: PathLike,
                  known: Union[KNOWN, PathLike, None] = None, *, force: bool = False,
                  **options) -> list[Path]:
    """Predict [Θ̂^{-1}, …, Θ̂^{-steps}] from checkpoint files [Θ^0, Θ^1, …] (paper order)
    without loading any of them whole; returns the outputs written, one per step.

    Inputs: ``.safetensors``, torch files (``.pt``, ``.pth``, ``.bin``, Lightning ``.ckpt``;
    weights-only), Hugging Face-style sharded checkpoints (their directory or index) and
    model directories.  ``out_dir`` receives ``know_step{k}.safetensors`` per step, or a
    directory ``know_step{k}/`` laid out like Θ^0's (its shards and index, as safetensors,
    and every non-weight file of Θ^0's directory: config, tokenizer, …) when Θ^0 is a
    directory or sharded.  A tied entry Θ^0's file stores twice is written once, as
    safetensors requires (``load_into`` and ``from_pretrained`` re-tie it).  Existing
    outputs are replaced only with ``force``; an input never is; a refused or failed run
    leaves nothing new on disk.  ``options`` as :func:`predict`; ``device="cuda"`` computes
    on this rank's GPU.

    Under ``torchrun`` (or in an initialised process group) every rank must call this with
    the same arguments; each predicts and writes a share of the model.
    """
    opts, known, known_path, used = _prepare("predict_files", checkpoints, known, options)
    metadata = {"method": opts.method, "checkpoints": [str(c) for c in used]}
    if known is not None:
        metadata.update(({"known": str(known_path)} if known_path else {}),
                        known_provenance=known.provenance)
    with communicator(opts.device) as comm, contextlib.ExitStack() as stack:
        # Rank 0 holds the output directory's lock from before the targets are checked
        # until after they are committed: a second run into it is refused, not mixed in.
        comm.step(lambda: stack.enter_context(output_lock(out_dir)) if comm.rank == 0 else None)
        token = comm.shared(unique_token())
        with _opened(used, lambda ck, i: open_checkpoint(ck)) as sources:
            def plan_job():
                first: FileSource = sources[0]
                sink = FileSink(out_dir, first, opts.steps,
                                output_dtypes(first, opts.out_dtype), metadata, token)
                sink.check_targets([p for s in sources for p in s.files]
                                   + ([known_path] if known_path else []), force)
                share = lambda groups, weights: split(groups, weights, comm.rank, comm.world)
                return sink, make_plan(sources, opts, known, share)

            sink, plan = comm.step(plan_job)
            _execute(sources, sink, plan, known, opts, comm)
    return [out.target for out in sink.outputs]


def load_checkpoints(checkpoints: Sequence[Checkpoint]) -> tuple[list[dict], list[str]]:
    """State dicts and a label for each (its path, or ``checkpoint[i]``), loaded whole."""
    states, labels = [], []
    for i, ck in enumerate(checkpoints):
        if isinstance(ck, Mapping):
            states.append(dict(ck))
            labels.append(f"checkpoint[{i}]")
        else:
            states.append(load_state_dict(ck))
            labels.append(str(ck))
    return states, labels
