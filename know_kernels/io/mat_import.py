"""Import the authors' published meta-dataset files (MATLAB v7.3 ``.mat``, i.e. HDF5).

Each file holds one run, as MATLAB sees it:

* ``ConvWeights`` (3, 3, N, 7): N 3x3 kernels' worth of conv weights over 7 stages,
* ``FCWeights``   (M, 7),
* ``Bias``        (K, 7),

with stage index 0 = the smallest data subset and index 6 = the full data.  MATLAB stores
arrays column-major and HDF5 row-major, so h5py shows every dataset with its dimensions
reversed: (7, N, 3, 3), (7, M), (7, K) — the stage axis comes first.  This importer reads
that h5py view: every element of the remaining axes becomes one row, and the stage axis is
flipped into this package's column order (column 0 = full data = Θ^0, see
:mod:`know_kernels.io.store`).  The rows carry no parameter names; each head's param table
holds one entry named after its dataset with its MATLAB shape without the stage axis.

Run settings come from the file name: tokens separated by ``_`` of the form ``r<float>``,
``lr<float>`` and ``bs<int>`` (e.g. ``resnet_cifar10_r0.5_lr1e-3_bs64.mat``); the other
tokens form the ``source`` name.  A missing setting is recorded as null.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import torch

from ..fileio import PathLike, open_hdf5
from .store import MetaDataset, Trajectory

MAT_HEADS = {"ConvWeights": ("conv", 4), "FCWeights": ("fc", 2), "Bias": ("bias", 2)}
_FLOAT = r"[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?"
_TOKENS = {"r": re.compile(rf"^r({_FLOAT})$"), "lr": re.compile(rf"^lr({_FLOAT})$"),
           "bs": re.compile(r"^bs([0-9]+)$")}


def parse_mat_name(name: str) -> dict:
    """``"..._r0.5_lr0.001_bs64.mat"`` -> {"source": "...", "r": 0.5, "lr": 0.001,
    "batch_size": 64}; settings absent from the name are None."""
    tokens = Path(name).stem.split("_")
    found: dict = {"r": None, "lr": None, "bs": None}
    rest = []
    for token in tokens:
        for key, pattern in _TOKENS.items():
            match = pattern.match(token)
            if match and found[key] is None:
                found[key] = int(match.group(1)) if key == "bs" else float(match.group(1))
                break
        else:
            rest.append(token)
    if found["r"] is not None and not 0 < found["r"] < 1:
        raise ValueError(f"{name}: r={found['r']} from the file name is outside (0, 1)")
    return {"source": "_".join(rest), "r": found["r"], "lr": found["lr"],
            "batch_size": found["bs"]}


def read_mat(path: PathLike) -> Trajectory:
    """One ``.mat`` file as a :class:`Trajectory` (float32 rows, column 0 = full data)."""
    import h5py
    path = Path(path)
    fh = open_hdf5(path, "meta-dataset file", "a MATLAB v7.3 / HDF5 file")
    heads, params, stages = {}, [], None
    with fh:
        for key, (head, ndim) in MAT_HEADS.items():
            if key not in fh:
                continue
            ds = fh[key]
            if not isinstance(ds, h5py.Dataset) or ds.ndim != ndim:
                raise ValueError(f"{path}: {key} must be a {ndim}-D array, got "
                                 f"{getattr(ds, 'shape', type(ds).__name__)} (h5py order)")
            if stages is None:
                stages = ds.shape[0]
            elif ds.shape[0] != stages:
                raise ValueError(f"{path}: {key} has {ds.shape[0]} stages (first h5py axis), "
                                 f"other arrays have {stages}")
            try:
                data = torch.from_numpy(ds[()].astype("float32", copy=False))
            except (OSError, ValueError, TypeError) as exc:
                raise ValueError(f"{path}: cannot read {key} ({exc})") from exc
            # h5py (S, a, b, ...) -> rows (a*b*..., S), then smallest-data-first -> Θ^0 first.
            heads[head] = data.reshape(stages, -1).t().flip(1).contiguous()
            params.append({"name": key, "shape": list(reversed(ds.shape[1:])), "head": head,
                           "offset": 0})
    if not heads:
        raise ValueError(f"{path}: none of {tuple(MAT_HEADS)} found")
    if stages < 2:
        raise ValueError(f"{path}: {stages} stage(s); a trajectory needs at least 2")
    settings = parse_mat_name(path.name)
    meta = {**settings, "imported_from": path.name, "test_acc": None, "subset_sizes": None}
    return Trajectory(heads=heads, params=params, meta=meta)


def import_mat(path: PathLike, store: MetaDataset, run_id: Optional[str] = None,
               dtype=None, overwrite: bool = False) -> str:
    """Add one ``.mat`` file to ``store`` as run ``run_id`` (default: the file's stem)."""
    traj = read_mat(path)
    run_id = run_id or re.sub(r"[^A-Za-z0-9_.-]", "_", Path(path).stem).lstrip("._-")
    store.add(run_id, traj, dtype=dtype, overwrite=overwrite)
    return run_id

