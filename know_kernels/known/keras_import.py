"""Importer for the authors' released KNOWN heads (Keras legacy HDF5).

Layer ``dense`` .. ``dense_5`` are stream x's W1, Wd, Wa, Wb, Wc, W2; ``dense_6`` ..
``dense_11`` the same roles for stream d; ``dense_12`` the output layer.  Keras stores
kernels as (in, out) with y = x @ K + b, which is this package's layout too.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..fileio import PathLike, open_hdf5

_ROLE_OF_LAYER = {}
for _i, _role in enumerate(("1", "d", "a", "b", "c", "2")):
    _ROLE_OF_LAYER[f"dense_{_i}" if _i else "dense"] = ("x", _role)
    _ROLE_OF_LAYER[f"dense_{_i + 6}"] = ("d", _role)
_ROLE_OF_LAYER["dense_12"] = ("", "o")


def _describe(layer: str) -> str:
    stream, role = _ROLE_OF_LAYER[layer]
    return f"head output W{role}" if not stream else f"stream {stream}: W{role}"


def read_keras_head(path: PathLike) -> tuple[dict[str, torch.Tensor], int]:
    """Read one head; returns (canonical-name params, S).  Errors name the missing layer."""
    path = Path(path)
    fh = open_hdf5(path, "Keras weights file", "an HDF5 file")
    with fh:
        root = fh["model_weights"] if "model_weights" in fh else fh
        params: dict[str, torch.Tensor] = {}
        for layer, (stream, role) in _ROLE_OF_LAYER.items():
            tensors = {}
            for kind in ("kernel", "bias"):
                key = f"{layer}/{layer}/{kind}:0"
                if key not in root:
                    raise ValueError(f"{path}: layer {layer!r} ({_describe(layer)}) has no "
                                     f"dataset {key!r}; not the KNOWN Keras layout")
                tensors[kind] = torch.from_numpy(root[key][()]).to(torch.float32)
            prefix = f"{stream}." if stream else ""
            params[f"{prefix}w{role}"] = tensors["kernel"]
            params[f"{prefix}b{role}"] = tensors["bias"]
    S = params["x.w1"].shape[0]
    if params["d.w1"].shape[0] != S - 1:
        raise ValueError(f"{path}: stream x takes {S} inputs but stream d takes "
                         f"{params['d.w1'].shape[0]} (expected {S - 1})")
    return params, S
