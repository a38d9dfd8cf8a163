"""Rebuild a collected run: its network with any stage's weights, and every image set it
was (or was not) trained on.

``know collect`` records, per run, what this needs: in the metadata the architecture,
width, input shape, classes and ``replay`` (the dataset and how it was loaded); in the
trajectory file the indices of D^0 and of every stage's subset (``subset.*``), of the
held-out images and of the **extra pool E** (``split.val``, ``split.extra``: training
images outside D^0 and the held-out ones, never trained on; the test images are the
dataset's test split), and the BatchNorm statistics of every stage (``stage<i>.*``).  The
rows hold every parameter exactly (float32 stores), so :meth:`ReplayedRun.network` is the
run's model at that stage bit for bit::

    run = replay(MetaDataset("meta"), "run0003")
    net = run.network(stage=2)                       # Θ^2, BatchNorm statistics included
    x, y = run.images("extra")                       # E: the run never saw these
    x, y = run.images("forgot", stage=2)             # D^1 \\ D^2: what stage 2 forgot

Stores collected before runs were replayable lack these records and are refused with a
message saying how to re-collect.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import MutableMapping, Optional

import torch
from torch import nn

from ..fileio import PathLike
from ..io.store import MetaDataset, Trajectory
from .data import DataSplit, load_dataset
from .zoo import build_model

REPLAY_FORMAT = 1
IMAGE_SETS = ("d0", "subset", "forgot", "val", "extra", "test")


def replay_record(dataset: str, test_size: Optional[int], extra_size: int) -> dict:
    """The metadata entry ``replay`` of a run collected on ``dataset`` loaded with
    ``load_dataset(dataset, test_size=test_size)``."""
    return {"format": REPLAY_FORMAT, "dataset": dataset, "test_size": test_size,
            "extra_size": int(extra_size)}


class NotReplayableError(ValueError):
    """A run lacks what rebuilding it needs."""


def _recollect_hint(store: MetaDataset) -> str:
    return (f"re-collect it with this version of know-kernels (`know collect --out NEW "
            f"--preset replay`; the store at {store.root} was collected before runs recorded "
            f"their data)")


@dataclass
class ReplayedRun:
    """One run of a meta-dataset, rebuilt: ``trajectory`` (rows, indices, statistics),
    ``data`` (the dataset it was collected on) and ``meta`` (its metadata)."""
    run_id: str
    meta: dict
    trajectory: Trajectory
    data: DataSplit

    @property
    def stages(self) -> int:
        return self.trajectory.stages

    def skeleton(self) -> nn.Module:
        """The run's architecture, freshly built (its weights are not the run's)."""
        return build_model(self.meta["arch"], self.meta["in_shape"], self.meta["num_classes"],
                           self.meta.get("width"))

    def state_dict(self, stage: int) -> dict[str, torch.Tensor]:
        """Θ^stage whole: every parameter from the rows, every statistic as recorded."""
        return self.trajectory.full_state_dict(stage)

    def network(self, stage: int) -> nn.Module:
        """The run's model with Θ^stage loaded, in eval mode."""
        model = self.skeleton()
        model.load_state_dict(self.state_dict(stage), strict=True)
        return model.eval()

    def indices(self, which: str, stage: Optional[int] = None) -> torch.Tensor:
        """Indices into ``data.train`` (``data.test`` for "test") of one image set:
        "d0"; "subset" (D^stage); "forgot" (D^{stage-1} \\ D^stage, stage >= 1); "val";
        "extra" (E); "test" (all of the test split)."""
        if which not in IMAGE_SETS:
            raise ValueError(f"image set must be one of {IMAGE_SETS}, got {which!r}")
        traj = self.trajectory
        if which == "test":
            return torch.arange(len(self.data.test))
        if which in ("val", "extra"):
            return traj.splits[which]
        if which == "d0":
            return traj.d0_indices
        if stage is None or not (which == "subset" and 0 <= stage < self.stages
                                 or which == "forgot" and 1 <= stage < self.stages):
            raise ValueError(f"image set {which!r} needs a stage in "
                             f"{'0' if which == 'subset' else '1'}..{self.stages - 1}, "
                             f"got {stage!r}")
        depth = traj.subset_depth.long()
        if which == "subset":
            return traj.d0_indices[depth >= stage]
        return traj.d0_indices[depth == stage - 1]

    def images(self, which: str, stage: Optional[int] = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, labels) of one image set (see :meth:`indices`)."""
        x, y = (self.data.test if which == "test" else self.data.train).tensors
        ix = self.indices(which, stage)
        return x[ix], y[ix]


def check_replayable(store: MetaDataset, run_id: str, *, extra_ratio: float = 0.0) -> dict:
    """The run's metadata, if it can be replayed with an extra pool of at least
    ``extra_ratio``·|D^0| images; else :class:`NotReplayableError` naming what is missing."""
    entry = store.runs().get(run_id)
    if entry is None:
        raise KeyError(f"no finished run {run_id!r} in {store.index_path}")
    meta = entry["meta"]
    record = meta.get("replay")
    if not isinstance(record, dict) or record.get("format") != REPLAY_FORMAT:
        raise NotReplayableError(f"run {run_id!r} records no replay information; "
                                 f"{_recollect_hint(store)}")
    missing = [k for k in ("arch", "in_shape", "num_classes") if k not in meta]
    if missing:
        raise NotReplayableError(f"run {run_id!r} lacks {missing} in its metadata; "
                                 f"{_recollect_hint(store)}")
    n0 = (meta.get("subset_sizes") or [0])[0]
    if record["extra_size"] < extra_ratio * n0:
        raise NotReplayableError(
            f"run {run_id!r} has an extra pool of {record['extra_size']} images, fewer than "
            f"{extra_ratio:g} x |D^0| = {extra_ratio * n0:g}; collect with --preset replay "
            f"(which leaves room for it) or a preset with extra_ratio >= {extra_ratio:g}")
    return meta


def replay(store: MetaDataset, run_id: str, *, data_dir: Optional[PathLike] = None,
           datasets: Optional[MutableMapping[tuple, DataSplit]] = None) -> ReplayedRun:
    """Rebuild run ``run_id`` of ``store``.  ``datasets``: a cache shared by the runs
    replayed together (each dataset is loaded once)."""
    meta = check_replayable(store, run_id)
    traj = store.open(run_id).load()
    if traj.d0_indices is None or not {"val", "extra"} <= set(traj.splits):
        raise NotReplayableError(f"run {run_id!r}'s file {store.run_path(run_id)} holds no "
                                 f"subset or split indices; {_recollect_hint(store)}")
    if traj.heads[next(iter(traj.heads))].dtype != torch.float32:
        raise NotReplayableError(f"run {run_id!r} stores its rows as "
                                 f"{traj.heads[next(iter(traj.heads))].dtype}: a network "
                                 f"rebuilt from them would not be the run's; collect with "
                                 f"--dtype float32")
    record = meta["replay"]
    key = (record["dataset"], record["test_size"], str(data_dir))
    cache = {} if datasets is None else datasets
    if key not in cache:
        cache[key] = load_dataset(record["dataset"], data_dir, test_size=record["test_size"])
    return ReplayedRun(run_id, meta, traj, cache[key])
