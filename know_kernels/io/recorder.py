"""Record a forgetting run from your own training loop straight into a meta-dataset.

``ForgettingSchedule.record`` keeps a copy of every stage in memory, which is S copies of
the model.  :class:`StageRecorder` writes each stage to disk as it is recorded, so memory
holds one parameter's values at a time whatever the model's size:

    rec = StageRecorder(MetaDataset("store"), "my_run", stages=7)
    for stage, subset in schedule:          # your loop: Θ^0 first, then each forgetting stage
        train(model, subset)
        rec.record(stage, model)
    rec.finish({"arch": "mine", "dataset": "mine", "r": schedule.r})

Each head's rows go to an (S, N) scratch file (a stage is one contiguous stretch there,
written with plain positional writes, so nothing of it stays mapped in this process);
``finish`` transposes it chunk by chunk into the run's (N, S) trajectory file, written under
a temporary name and renamed when complete, then indexes it.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import nn

from ..fileio import read_at, write_at
from ..known.routing import Route
from .store import MetaDataset, route_params, store_dtype, trajectory_metadata
from .sinks import OutFile

# Rows per transposed chunk: S x 64K values, small next to any model worth streaming.
CHUNK_ROWS = 1 << 16


def state_refs(model_or_state) -> Mapping[str, torch.Tensor]:
    """The module's state dict (its own tensors, not copies) or the given mapping."""
    state = (model_or_state.state_dict() if isinstance(model_or_state, nn.Module)
             else model_or_state)
    if not isinstance(state, Mapping):
        raise TypeError(f"record() takes an nn.Module or a state dict, got "
                        f"{type(model_or_state).__name__}")
    return state


class StageRecorder:
    def __init__(self, store: MetaDataset, run_id: str, stages: int, *, route: Route = None,
                 dtype=torch.float32, overwrite: bool = False):
        if not isinstance(stages, int) or stages < 2:
            raise ValueError(f"stages must be an integer >= 2, got {stages!r}")
        store.claim(run_id, overwrite)
        self.store, self.run_id, self.stages = store, run_id, stages
        self.route, self.dtype = route, store_dtype(dtype)
        self.recorded = 0
        self.params: list[dict[str, Any]] = []
        self._scratch_dir: Optional[Path] = None
        self._scratch: dict[str, tuple[int, int]] = {}   # head -> (file descriptor, rows)

    def _plan(self, state: Mapping[str, torch.Tensor]) -> None:
        """Fix the routed parameters and their rows from Θ^0; make the scratch arrays."""
        self.params, offsets = route_params(state, self.route)
        if not self.params:
            raise ValueError("no parameter of the model is routed to a KNOWN head")
        self._scratch_dir = Path(tempfile.mkdtemp(prefix=f".{self.run_id}.", suffix=".rec",
                                                  dir=self.store.root))
        for head, rows in offsets.items():
            if rows:
                fd = os.open(self._scratch_dir / head, os.O_RDWR | os.O_CREAT, 0o600)
                os.ftruncate(fd, self.stages * rows * self.dtype.itemsize)
                self._scratch[head] = (fd, rows)

    def _at(self, head: str, stage: int, row: int) -> int:
        return (stage * self._scratch[head][1] + row) * self.dtype.itemsize

    def record(self, stage: int, model_or_state) -> None:
        """Write Θ^stage (a module or a state dict); stages come in order, 0 first."""
        if stage != self.recorded:
            raise ValueError(f"expected stage {self.recorded} to be recorded next, got {stage}")
        if stage >= self.stages:
            raise ValueError(f"all {self.stages} stages are already recorded")
        state = state_refs(model_or_state)
        if stage == 0:
            self.store.root.mkdir(parents=True, exist_ok=True)
            self._plan(state)
        for p in self.params:
            t = state.get(p["name"])
            if t is None or list(t.shape) != p["shape"]:
                raise ValueError(f"stage {stage}: parameter {p['name']!r} is "
                                 f"{'missing' if t is None else list(t.shape)}, stage 0 had "
                                 f"{p['shape']}")
            data = t.detach().reshape(-1).to(device="cpu", dtype=self.dtype).contiguous()
            write_at(self._scratch[p["head"]][0], data, self._at(p["head"], stage, p["offset"]))
        self.recorded += 1

    def finish(self, meta: Optional[Mapping[str, Any]] = None) -> dict:
        """Write the run's trajectory file from the recorded stages and index it."""
        if self.recorded != self.stages:
            raise ValueError(f"only {self.recorded} of {self.stages} stages recorded")
        out = OutFile(self.store.run_path(self.run_id),
                      [(h, self.dtype, (rows, self.stages)) for h, (_, rows) in self._scratch.items()],
                      metadata=trajectory_metadata(meta or {}, self.params, self.stages))
        out.create()
        out.open()
        try:
            for head, (fd, rows) in self._scratch.items():
                for start in range(0, rows, CHUNK_ROWS):
                    m = min(CHUNK_ROWS, rows - start)
                    block = torch.empty(self.stages, m * self.dtype.itemsize, dtype=torch.uint8)
                    for stage in range(self.stages):
                        read_at(fd, block[stage], self._at(head, stage, start), "scratch file")
                    columns = block.view(self.dtype).t().contiguous().reshape(-1)
                    out.write(head, start * self.stages, columns)
            out.close()
        except BaseException:
            out.discard()
            raise
        out.commit()
        self.discard()
        return self.store.register(self.run_id)

    def discard(self) -> None:
        """Drop the scratch arrays (also what an abandoned run should call)."""
        for fd, _ in self._scratch.values():
            os.close(fd)
        self._scratch.clear()
        if self._scratch_dir is not None:
            shutil.rmtree(self._scratch_dir, ignore_errors=True)
            self._scratch_dir = None
