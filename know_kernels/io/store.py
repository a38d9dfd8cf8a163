"""Flattened forgetting trajectories on disk, one file per run, and the meta-dataset that
gathers them.

**Trajectory file** (``<run>.safetensors``, written atomically, memory-mapped on read):

* one tensor per KNOWN head present (``conv``, ``fc``, ``bias``; routed with
  :func:`know_kernels.known.routing.route_state`, default rule unless told otherwise), shape
  (N_head, S), float32 or bfloat16;
* optionally ``subset.d0_indices`` (int64: the dataset indices of D^0) and ``subset.depth``
  (uint8: for each D^0 element, the last stage whose subset holds it, so D^i =
  ``d0_indices[depth >= i]``);
* optionally ``split.<name>`` (int64): other named sets of training-split indices, e.g.
  ``split.val`` (held-out images) and ``split.extra`` (the extra pool E a replayed run is
  scored on, :mod:`know_kernels.research.replay`);
* optionally ``stage<i>.<entry>``: the state-dict entries no head predicts (BatchNorm
  statistics, counters) as they were at stage i, so that a run can be rebuilt whole;
* header metadata key ``know_trajectory``: JSON with the run's metadata and ``params``, the
  name, shape, head and row ``offset`` of every routed parameter, in state-dict order, so
  row ``offset + k`` of head ``h`` is element ``k`` of that parameter flattened in C order.

**Column order = stage index**: column 0 is Θ^0 (trained on the full D^0), column i is Θ^i
(after fine-tuning on D^i, |D^i| ≈ r^i |D^0|).  KNOWN reads rows in time order towards *more*
data, i.e. the columns reversed (least data first, Θ^0 last): ask for ``order="time"``.

**Meta-dataset** (a directory): the trajectory files, a pretty-printed ``<run>.json`` copy of
each run's metadata, and ``index.json`` (rewritten atomically after every run) listing every
run with its status (``ok`` or ``failed`` with the error), file, row counts and metadata.
:meth:`MetaDataset.iter_chunks` streams one head's rows in bounded chunks, never loading
the whole store.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch

from ..fileio import PathLike, save_safetensors, write_json
from ..known.routing import HEADS, Route, route_state

TRAJECTORY_FORMAT = "know-kernels/trajectory/1"
INDEX_FORMAT = "know-kernels/meta-dataset/1"
META_KEY = "know_trajectory"
STORE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
ORDERS = ("stage", "time")
_D0_KEY, _DEPTH_KEY = "subset.d0_indices", "subset.depth"
_SPLIT_PREFIX = "split."
_STAGE_KEY = re.compile(r"^stage(\d+)\.(.+)$")
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def store_dtype(dtype) -> torch.dtype:
    """``"float32"``/``"bfloat16"`` or the torch dtype -> the torch dtype, checked."""
    if isinstance(dtype, str):
        if dtype not in STORE_DTYPES:
            raise ValueError(f"dtype must be one of {tuple(STORE_DTYPES)}, got {dtype!r}")
        return STORE_DTYPES[dtype]
    if dtype not in STORE_DTYPES.values():
        raise ValueError(f"dtype must be one of {tuple(STORE_DTYPES)}, got {dtype}")
    return dtype


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _check_order(order: str) -> None:
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")


def route_params(state: Mapping[str, torch.Tensor],
                 route: Route = None) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """The param table of a trajectory file (name, shape, head and row offset of every
    routed entry of ``state``, in its order) and the rows each head gets."""
    params, offsets = [], {h: 0 for h in HEADS}
    for name, head in route_state(state, route).items():
        if head is not None:
            params.append({"name": name, "shape": list(state[name].shape), "head": head,
                           "offset": offsets[head]})
            offsets[head] += state[name].numel()
    return params, offsets


def trajectory_metadata(meta: Mapping[str, Any], params: list[dict[str, Any]],
                        stages: int) -> dict[str, str]:
    """The safetensors header metadata that makes a file a trajectory file."""
    header = {"format": TRAJECTORY_FORMAT, **meta, "params": params, "stages": stages,
              "column_order": "stage"}
    return {META_KEY: json.dumps(header)}


@dataclass
class Trajectory:
    """One run's flattened trajectory: ``heads[h]`` is (N_h, S), column i = stage i."""
    heads: dict[str, torch.Tensor]
    params: list[dict[str, Any]]
    meta: dict[str, Any] = field(default_factory=dict)
    d0_indices: Optional[torch.Tensor] = None
    subset_depth: Optional[torch.Tensor] = None
    splits: dict[str, torch.Tensor] = field(default_factory=dict)
    # Per stage, the state-dict entries no head predicts (empty: not recorded).
    unrouted: list[dict[str, torch.Tensor]] = field(default_factory=list)

    def __post_init__(self):
        if not self.heads:
            raise ValueError("a trajectory needs at least one head with rows")
        unknown = set(self.heads) - set(HEADS)
        if unknown:
            raise ValueError(f"unknown heads {sorted(unknown)}; heads are {HEADS}")
        widths = {t.shape[1] for t in self.heads.values() if t.dim() == 2}
        if len(widths) != 1 or any(t.dim() != 2 for t in self.heads.values()):
            raise ValueError("every head must be an (N, S) tensor with the same S, got "
                             f"{ {h: tuple(t.shape) for h, t in self.heads.items()} }")
        if (self.d0_indices is None) != (self.subset_depth is None):
            raise ValueError("d0_indices and subset_depth go together")
        if self.unrouted and len(self.unrouted) != self.stages:
            raise ValueError(f"unrouted entries recorded for {len(self.unrouted)} stages, but "
                             f"the rows have {self.stages}")

    @property
    def stages(self) -> int:
        return next(iter(self.heads.values())).shape[1]

    @classmethod
    def from_snapshots(cls, snapshots: Sequence[Mapping[str, torch.Tensor]],
                       route: Route = None, dtype=torch.float32,
                       meta: Optional[dict] = None) -> "Trajectory":
        """Flatten snapshots Θ^0..Θ^{S-1} (state dicts with identical names and shapes)."""
        dtype = store_dtype(dtype)
        if len(snapshots) < 2:
            raise ValueError(f"a trajectory needs at least 2 snapshots, got {len(snapshots)}")
        first = snapshots[0]
        for i, snap in enumerate(snapshots[1:], 1):
            if list(snap) != list(first) or any(snap[k].shape != first[k].shape for k in first):
                raise ValueError(f"snapshot {i} does not have the names and shapes of snapshot 0")
        params, _ = route_params(first, route)
        if not params:
            raise ValueError("no parameter of the snapshots is routed to a KNOWN head")
        heads = {}
        for head in HEADS:
            names = [p["name"] for p in params if p["head"] == head]
            if names:
                columns = [torch.cat([snap[n].detach().reshape(-1).float().cpu() for n in names])
                           for snap in snapshots]
                heads[head] = torch.stack(columns, 1).to(dtype)
        routed = {p["name"] for p in params}
        unrouted = [{k: v.detach().cpu().clone() for k, v in snap.items() if k not in routed}
                    for snap in snapshots]
        return cls(heads=heads, params=params, meta=dict(meta or {}),
                   unrouted=unrouted if any(unrouted) else [])

    def rows(self, head: str, order: str = "stage") -> torch.Tensor:
        """(N, S) rows of ``head``; ``order="time"`` reverses the columns for KNOWN."""
        _check_order(order)
        if head not in self.heads:
            raise KeyError(f"this trajectory has no {head!r} rows; it has {sorted(self.heads)}")
        rows = self.heads[head]
        return rows.flip(1) if order == "time" else rows

    def state_dict(self, stage: int) -> dict[str, torch.Tensor]:
        """The routed parameters of Θ^stage, rebuilt from the rows."""
        if not -self.stages <= stage < self.stages:
            raise IndexError(f"stage {stage} out of range for {self.stages} stages")
        return {p["name"]: self.heads[p["head"]][p["offset"]:p["offset"] + math.prod(p["shape"]),
                                                 stage].reshape(p["shape"])
                for p in self.params}

    def full_state_dict(self, stage: int) -> dict[str, torch.Tensor]:
        """Θ^stage whole: the routed parameters and the recorded unrouted entries, in the
        order of the parameter table, then the unrouted ones."""
        state = self.state_dict(stage)
        if self.unrouted:
            state.update(self.unrouted[stage])
        return state

    def subset_indices(self, stage: int) -> torch.Tensor:
        """Dataset indices of D^stage, when the run recorded them."""
        if self.d0_indices is None:
            raise ValueError("this trajectory holds no subset indices")
        return self.d0_indices[self.subset_depth.long() >= stage]


# --------------------------------------------------------------------------- single files

def save_trajectory(traj: Trajectory, path: PathLike, dtype=None) -> None:
    """Write ``traj`` as one safetensors file, atomically; ``dtype`` (float32/bfloat16)
    converts the rows, default: keep theirs."""
    tensors = {h: (t if dtype is None else t.to(store_dtype(dtype))) for h, t in traj.heads.items()}
    for t in tensors.values():
        store_dtype(t.dtype)
    if traj.d0_indices is not None:
        tensors[_D0_KEY] = traj.d0_indices.to(torch.int64)
        tensors[_DEPTH_KEY] = traj.subset_depth.to(torch.uint8)
    for name, indices in traj.splits.items():
        tensors[_SPLIT_PREFIX + name] = indices.to(torch.int64)
    for stage, entries in enumerate(traj.unrouted):
        for name, t in entries.items():
            tensors[f"stage{stage}.{name}"] = t
    save_safetensors(tensors, path,
                     metadata=trajectory_metadata(traj.meta, traj.params, traj.stages))


class TrajectoryFile:
    """Lazy, memory-mapped reader of one trajectory file (nothing is read until asked)."""

    def __init__(self, path: PathLike):
        from safetensors import safe_open
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"trajectory file not found: {self.path}")
        try:
            with safe_open(str(self.path), "pt") as f:
                header = (f.metadata() or {}).get(META_KEY)
                self._shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as exc:  # safetensors raises several unrelated types
            raise ValueError(f"{self.path}: not a readable safetensors file ({exc})") from exc
        if header is None:
            raise ValueError(f"{self.path}: no {META_KEY!r} metadata; not a trajectory file")
        self.meta = json.loads(header)
        if self.meta.get("format") != TRAJECTORY_FORMAT:
            raise ValueError(f"{self.path}: format {self.meta.get('format')!r}, expected "
                             f"{TRAJECTORY_FORMAT!r}")
        self.heads = {h: self._shapes[h][0] for h in HEADS if h in self._shapes}

    @property
    def stages(self) -> int:
        return int(self.meta["stages"])

    @property
    def run_meta(self) -> dict[str, Any]:
        """The run's own metadata: the header less what the file format adds."""
        return {k: v for k, v in self.meta.items()
                if k not in ("format", "params", "stages", "column_order")}

    def read(self, head: str, start: int = 0, stop: Optional[int] = None,
             order: str = "stage") -> torch.Tensor:
        """Rows ``start:stop`` of ``head`` (only those bytes are read)."""
        from safetensors import safe_open
        _check_order(order)
        if head not in self.heads:
            raise KeyError(f"{self.path} has no {head!r} rows; it has {sorted(self.heads)}")
        stop = self.heads[head] if stop is None else stop
        with safe_open(str(self.path), "pt") as f:
            rows = f.get_slice(head)[start:stop]
        return rows.flip(1) if order == "time" else rows

    def load(self) -> Trajectory:
        from safetensors.torch import load_file
        tensors = load_file(str(self.path))
        splits = {k[len(_SPLIT_PREFIX):]: t for k, t in tensors.items()
                  if k.startswith(_SPLIT_PREFIX)}
        unrouted: list[dict[str, torch.Tensor]] = []
        for key, t in tensors.items():
            match = _STAGE_KEY.match(key)
            if match:
                stage = int(match.group(1))
                if stage >= self.stages:
                    raise ValueError(f"{self.path}: entry {key!r} names stage {stage} of "
                                     f"{self.stages}")
                unrouted.extend({} for _ in range(stage + 1 - len(unrouted)))
                unrouted[stage][match.group(2)] = t
        if unrouted:
            unrouted.extend({} for _ in range(self.stages - len(unrouted)))
        return Trajectory(heads={h: tensors[h] for h in self.heads}, params=self.meta["params"],
                          meta=self.run_meta, d0_indices=tensors.get(_D0_KEY),
                          subset_depth=tensors.get(_DEPTH_KEY), splits=splits,
                          unrouted=unrouted)


def load_trajectory(path: PathLike) -> Trajectory:
    return TrajectoryFile(path).load()


# ---------------------------------------------------------------------------- meta-dataset

class MetaDataset:
    """A directory of trajectory files with an ``index.json``; appendable, single writer."""

    INDEX = "index.json"

    def __init__(self, root: PathLike, create: bool = True):
        self.root = Path(root)
        self.index_path = self.root / self.INDEX
        if self.index_path.is_file():
            try:
                self._index = json.loads(self.index_path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise ValueError(f"{self.index_path}: unreadable index ({exc})") from exc
            if self._index.get("format") != INDEX_FORMAT:
                raise ValueError(f"{self.index_path}: format {self._index.get('format')!r}, "
                                 f"expected {INDEX_FORMAT!r}")
        elif create:
            self._index = {"format": INDEX_FORMAT, "column_order": "stage", "recipe": None,
                           "runs": {}}
        else:
            raise FileNotFoundError(f"no meta-dataset at {self.root} (missing {self.INDEX})")

    # -- index ------------------------------------------------------------------------------
    @property
    def recipe(self) -> Optional[dict]:
        return self._index.get("recipe")

    def set_recipe(self, recipe: dict) -> None:
        self._index["recipe"] = recipe
        self._save_index()

    def _save_index(self) -> None:
        write_json(self._index, self.index_path)

    def runs(self, status: Optional[str] = "ok") -> dict[str, dict]:
        """Index entries by run id (``status=None``: every run, failed ones included)."""
        return {k: v for k, v in self._index["runs"].items()
                if status is None or v["status"] == status}

    def __contains__(self, run_id: str) -> bool:
        return run_id in self._index["runs"]

    def __len__(self) -> int:
        return len(self.runs())

    @staticmethod
    def _check_id(run_id: str) -> None:
        if not isinstance(run_id, str) or not _RUN_ID.match(run_id) or run_id == "index":
            raise ValueError(f"run_id {run_id!r} must be letters, digits, '_', '.', '-' "
                             "(not starting with a dot) and not 'index'")

    def claim(self, run_id: str, overwrite: bool = False) -> None:
        """Check that run ``run_id`` may be written: a valid id, not yet in the index unless
        ``overwrite``.  Writers call this before any work, so that a bad or taken id fails
        before a run's file is written."""
        self._check_id(run_id)
        if run_id in self and not overwrite:
            raise FileExistsError(f"run {run_id!r} is already in {self.index_path}")

    # -- writing ----------------------------------------------------------------------------
    def add(self, run_id: str, traj: Trajectory, dtype=None, overwrite: bool = False) -> dict:
        """Store one trajectory (file, then metadata copy, then index: a crash in between
        leaves the index without the run, and the next ``add`` replaces its files)."""
        self.claim(run_id, overwrite)
        save_trajectory(traj, self.run_path(run_id), dtype)
        return self.register(run_id)

    def run_path(self, run_id: str) -> Path:
        """Where run ``run_id``'s trajectory file lives."""
        self._check_id(run_id)
        return self.root / f"{run_id}.safetensors"

    def register(self, run_id: str) -> dict:
        """Index the trajectory file already written at ``run_path(run_id)`` (by ``add`` or
        by a :class:`~know_kernels.io.recorder.StageRecorder`)."""
        reader = TrajectoryFile(self.run_path(run_id))
        write_json(reader.meta, self.root / f"{run_id}.json")
        dtype_name = _dtype_name(reader.read(next(iter(reader.heads)), 0, 1).dtype)
        self._index["runs"][run_id] = {
            "status": "ok", "file": reader.path.name, "rows": reader.heads,
            "stages": reader.stages, "dtype": dtype_name, "meta": reader.run_meta}
        self._save_index()
        return self._index["runs"][run_id]

    def add_failed(self, run_id: str, meta: dict, error: str, overwrite: bool = False) -> None:
        """Record a run that was abandoned, so it is reported and not retried."""
        self.claim(run_id, overwrite)
        self._index["runs"][run_id] = {"status": "failed", "error": str(error), "meta": meta}
        self._save_index()

    # -- reading ----------------------------------------------------------------------------
    def open(self, run_id: str) -> TrajectoryFile:
        entry = self._index["runs"].get(run_id)
        if entry is None or entry["status"] != "ok":
            raise KeyError(f"no finished run {run_id!r} in {self.index_path}")
        return TrajectoryFile(self.root / entry["file"])

    def num_rows(self, head: str) -> int:
        return sum(e["rows"].get(head, 0) for e in self.runs().values())

    def iter_chunks(self, head: str, chunk_rows: int = 1 << 16, *, shuffle: bool = False,
                    seed: int = 0, order: str = "stage",
                    runs: Optional[Sequence[str]] = None
                    ) -> Iterator[tuple[torch.Tensor, dict]]:
        """Yield (rows (n <= chunk_rows, S), info) over every finished run's ``head`` rows.

        ``info`` = {"run", "start", "stop", "meta"}.  Each chunk is read from its
        memory-mapped file on demand, so memory stays bounded by one chunk.  ``shuffle``
        visits the chunks in a seeded random order (rows inside a chunk stay in order);
        ``order="time"`` reverses the columns (least data first), as KNOWN consumes them.
        """
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        _check_order(order)
        if int(chunk_rows) < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        chunk_rows = int(chunk_rows)
        entries = self.runs()
        if runs is not None:
            missing = [r for r in runs if r not in entries]
            if missing:
                raise KeyError(f"no finished runs {missing} in {self.index_path}")
            entries = {r: entries[r] for r in runs}
        chunks = [(run_id, start, min(start + chunk_rows, entry["rows"][head]))
                  for run_id, entry in entries.items()
                  for start in range(0, entry["rows"].get(head, 0), chunk_rows)]
        if shuffle:
            order_ix = np.random.default_rng(seed).permutation(len(chunks))
            chunks = [chunks[i] for i in order_ix]
        for run_id, start, stop in chunks:
            rows = TrajectoryFile(self.root / entries[run_id]["file"]).read(head, start, stop,
                                                                            order)
            yield rows, {"run": run_id, "start": start, "stop": stop,
                         "meta": entries[run_id]["meta"]}

    def summary(self) -> dict[str, Any]:
        """Forgetting at a glance: per finished run the test accuracy per stage, how many
        runs lost accuracy from stage 0 to the last stage, how many Θ^0 met the convergence
        criterion (of those checked), rows per head, failures."""
        per_run, fell, drops, converged = [], 0, [], []
        for run_id, entry in self.runs().items():
            meta = entry["meta"]
            check = (meta.get("pretrain") or {}).get("converged")
            if check is not None:
                converged.append(bool(check))
            acc = meta.get("test_acc") or []
            known = [a for a in acc if a is not None]
            drop = known[0] - known[-1] if len(known) >= 2 else None
            if drop is not None:
                drops.append(drop)
                fell += drop > 0
            per_run.append({"run": run_id, "arch": meta.get("arch"),
                            "dataset": meta.get("dataset"), "r": meta.get("r"),
                            "test_acc": acc, "drop": drop, "converged": check,
                            "time_ratio": (meta.get("time") or {}).get("measured_ratio"),
                            "paper_ratio": (meta.get("time") or {}).get("paper_ratio")})
        failed = {k: v["error"] for k, v in self.runs("failed").items()}
        return {"runs": len(per_run), "failed": failed, "with_accuracy": len(drops),
                "fell": fell, "mean_drop": float(np.mean(drops)) if drops else None,
                "convergence_checked": len(converged), "converged": sum(converged),
                "rows": {h: self.num_rows(h) for h in HEADS}, "per_run": per_run,
                "archs": sorted({p["arch"] for p in per_run if p["arch"]}),
                "datasets": sorted({p["dataset"] for p in per_run if p["dataset"]})}
