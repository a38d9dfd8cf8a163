"""KNOWNHead (one hyper-model head) and KNOWN (the set of three), with their own file format.

A KNOWN file is one ``.safetensors`` whose tensors are named ``<head>.<param>``
(e.g. ``conv.x.w1``) and whose metadata key ``know`` holds JSON:
``{"format": "know-kernels/1", "heads": {"conv": {"S": 5, "norm": "wnn"}, ...},
"provenance": {...}}``.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import torch
from torch import nn

from ..fileio import PathLike, save_safetensors
from ..kernels.reference import (BOTTLENECK, HIDDEN, OUT_HIDDEN, STREAM_ROLES, check_norm,
                        num_params, param_shapes, residual_ref, step_ref)
from .routing import HEADS

FORMAT = "know-kernels/1"
# The weights shipped with the package (see MODEL_CARD.md for how they were made).
WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
PRETRAINED_S = (3, 4, 5)


def pretrained_path(S: int = 5) -> Path:
    """Where the shipped KNOWN for windows of ``S`` snapshots lives."""
    if isinstance(S, bool) or S not in PRETRAINED_S:
        raise ValueError(f"the package ships KNOWN for S in {PRETRAINED_S}, got S={S!r}; "
                         f"meta-train your own with `know meta-train --S {S}`")
    return WEIGHTS_DIR / f"known_S{S}.safetensors"


PRETRAINED = pretrained_path(5)


def _variance_scaling_uniform(t: torch.Tensor, scale: float, generator) -> None:
    # Keras VarianceScaling(scale, mode="fan_in", distribution="uniform").
    limit = math.sqrt(3.0 * scale / t.shape[0])
    with torch.no_grad():
        t.uniform_(-limit, limit, generator=generator)


def _glorot_uniform(t: torch.Tensor, generator) -> None:
    limit = math.sqrt(6.0 / (t.shape[0] + t.shape[1]))
    with torch.no_grad():
        t.uniform_(-limit, limit, generator=generator)


class Stream(nn.Module):
    """One of the two streams: n -> 64 -> 8 -> (a, b, c) -> learned exp -> 32."""

    def __init__(self, n: int):
        super().__init__()
        self.n = n
        self.w1 = nn.Parameter(torch.zeros(n, HIDDEN))
        self.b1 = nn.Parameter(torch.zeros(HIDDEN))
        self.wd = nn.Parameter(torch.zeros(HIDDEN, BOTTLENECK))
        self.bd = nn.Parameter(torch.zeros(BOTTLENECK))
        for role in ("a", "b", "c"):
            setattr(self, f"w{role}", nn.Parameter(torch.zeros(BOTTLENECK, HIDDEN)))
            setattr(self, f"b{role}", nn.Parameter(torch.zeros(HIDDEN)))
        self.w2 = nn.Parameter(torch.zeros(HIDDEN, OUT_HIDDEN))
        self.b2 = nn.Parameter(torch.zeros(OUT_HIDDEN))


class KNOWNHead(nn.Module):
    """One KNOWN head for rows of S snapshots.

    ``forward(rows)`` predicts the next value of each raw (N, S) row with the reference
    math (differentiable); ``nowcast`` is the fast, backend-dispatched path.
    """

    def __init__(self, S: int = 5, norm: str = "wnn", *, seed: Optional[int] = None):
        super().__init__()
        if S < 2:
            raise ValueError(f"S must be at least 2, got {S}")
        self.S = int(S)
        self.norm = check_norm(norm)
        self.x = Stream(S)
        self.d = Stream(S - 1)
        self.wo = nn.Parameter(torch.zeros(2 * OUT_HIDDEN, 1))
        self.bo = nn.Parameter(torch.zeros(1))
        self.reset_parameters(seed)

    def reset_parameters(self, seed: Optional[int] = None) -> None:
        """The authors' init: VarianceScaling(0.1, fan_in, uniform) on the first and the
        64 -> 32 dense layers, Glorot-uniform elsewhere, zero biases."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        for stream in (self.x, self.d):
            for role in STREAM_ROLES:
                p = getattr(stream, role)
                if role.startswith("b"):
                    nn.init.zeros_(p)
                elif role in ("w1", "w2"):
                    _variance_scaling_uniform(p, 0.1, gen)
                else:
                    _glorot_uniform(p, gen)
        _glorot_uniform(self.wo, gen)
        nn.init.zeros_(self.bo)

    def params_dict(self) -> dict[str, torch.Tensor]:
        """Canonical name -> parameter (``x.w1`` ... ``wo``, ``bo``), in packing order."""
        named = dict(self.named_parameters())
        return {name: named[name] for name in param_shapes(self.S)}

    def load_params(self, params: Mapping[str, torch.Tensor], *, source: str = "params") -> None:
        """Copy canonical-name tensors in, refusing any missing, extra or misshapen one."""
        expected = param_shapes(self.S)
        missing = [k for k in expected if k not in params]
        extra = [k for k in params if k not in expected]
        if missing or extra:
            raise ValueError(f"{source}: missing {missing}, unexpected {extra} for a head with S={self.S}")
        own = self.params_dict()
        with torch.no_grad():
            for name, shape in expected.items():
                t = params[name]
                if tuple(t.shape) != shape:
                    raise ValueError(f"{source}: {name} has shape {tuple(t.shape)}, expected {shape}")
                own[name].copy_(t.to(own[name].dtype))

    def forward(self, rows: torch.Tensor, norm: Optional[str] = None) -> torch.Tensor:
        return step_ref(rows, self.params_dict(), check_norm(norm or self.norm))

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        """The head's raw output on already-normalised rows (what the Keras model computes)."""
        return residual_ref(x, self.params_dict())

    def extra_repr(self) -> str:
        return f"S={self.S}, norm={self.norm!r}, params={num_params(self.S)}"


class KNOWN(nn.Module):
    """The three KNOWN heads, indexed ``known["conv"]``, ``known["fc"]``, ``known["bias"]``."""

    def __init__(self, heads: Mapping[str, KNOWNHead], provenance: Optional[Mapping[str, Any]] = None):
        super().__init__()
        unknown = [k for k in heads if k not in HEADS]
        if unknown:
            raise ValueError(f"unknown head name(s) {unknown}; heads are {HEADS}")
        if not heads:
            raise ValueError("a KNOWN needs at least one head")
        self.heads = nn.ModuleDict({k: heads[k] for k in HEADS if k in heads})
        self.provenance = dict(provenance or {})

    @classmethod
    def init(cls, S: int = 5, norm: str = "wnn", seed: int = 0, heads=HEADS) -> "KNOWN":
        """Freshly initialised (untrained) heads, seeded."""
        return cls({k: KNOWNHead(S, norm, seed=seed + i) for i, k in enumerate(heads)},
                   provenance={"source": "init", "seed": seed})

    def __getitem__(self, name: str) -> KNOWNHead:
        if name not in self.heads:
            raise KeyError(f"this KNOWN has no {name!r} head (it has {list(self.heads)})")
        return self.heads[name]

    def __contains__(self, name: object) -> bool:
        return name in self.heads

    def __iter__(self) -> Iterator[str]:
        return iter(self.heads)

    def items(self):
        return self.heads.items()

    def save(self, path: PathLike) -> None:
        tensors = {f"{h}.{k}": v.detach().to(torch.float32).cpu()
                   for h, head in self.heads.items() for k, v in head.params_dict().items()}
        meta = {"format": FORMAT,
                "heads": {h: {"S": head.S, "norm": head.norm} for h, head in self.heads.items()},
                "provenance": self.provenance}
        save_safetensors(tensors, path, metadata={"know": json.dumps(meta, sort_keys=True)})

    @classmethod
    def load(cls, path: PathLike) -> "KNOWN":
        from safetensors import safe_open
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"KNOWN file not found: {path}")
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta_raw = (fh.metadata() or {}).get("know")
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        except Exception as exc:
            raise ValueError(f"{path}: not a readable safetensors file ({exc})") from exc
        if meta_raw is None:
            raise ValueError(f"{path}: no 'know' metadata; not a know-kernels KNOWN file")
        meta = json.loads(meta_raw)
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
        heads = {}
        for name, spec in meta["heads"].items():
            head = KNOWNHead(spec["S"], spec["norm"])
            prefix = f"{name}."
            head.load_params({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)},
                             source=f"{path} head {name!r}")
            heads[name] = head
        return cls(heads, provenance=meta.get("provenance"))

    @classmethod
    def pretrained(cls, S: int = 5) -> "KNOWN":
        """The KNOWN shipped inside the package for windows of ``S`` snapshots (3, 4 or 5;
        the paper's setting, 5, by default), meta-trained by this project (MODEL_CARD.md)."""
        path = pretrained_path(S)
        if not path.is_file():
            raise FileNotFoundError(f"the shipped KNOWN weights are missing ({path}); "
                                    f"reinstall know-kernels, or pass a KNOWN file explicitly")
        return cls.load(path)

    @classmethod
    def from_keras_h5(cls, conv: Optional[PathLike] = None, fc: Optional[PathLike] = None,
                      bias: Optional[PathLike] = None, norm: str = "raw") -> "KNOWN":
        """Import the authors' released Keras HDF5 heads (any subset of the three)."""
        from .keras_import import read_keras_head
        files = {"conv": conv, "fc": fc, "bias": bias}
        heads = {}
        for name, path in files.items():
            if path is not None:
                params, S = read_keras_head(path)
                head = KNOWNHead(S, norm)
                head.load_params(params, source=str(path))
                heads[name] = head
        if not heads:
            raise ValueError("from_keras_h5 needs at least one of conv=, fc=, bias=")
        return cls(heads, provenance={"source": "keras-h5",
                                      "files": {k: os.path.basename(str(v)) for k, v in files.items() if v}})

    def extra_repr(self) -> str:
        return f"provenance={self.provenance}"
