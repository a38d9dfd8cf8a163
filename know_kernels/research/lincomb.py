"""``lincomb``: the simplest rival a learned KNOWN must beat.

Per head, S learned coefficients: Θ̂ = Σ_i c_i Θ_i over the window (oldest first), the
same for every parameter the head predicts; iterating slides the window as KNOWN does.
Started at copy-last (c = (0, …, 0, 1)), trained by the same objectives and data as
KNOWN (:mod:`know_kernels.research.task_objective`).  It can express copy-last, linear
extrapolation and any fixed task-vector step, so a KNOWN that does not beat it has not
earned its 9,425 parameters per head.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..fileio import PathLike, save_safetensors
from ..known.routing import HEADS

FORMAT = "know-kernels/lincomb/1"


class LinComb(nn.Module):
    """S coefficients per head; ``step(head, rows)`` is one prediction per (N, S) row."""

    def __init__(self, S: int, heads: Sequence[str] = HEADS):
        super().__init__()
        if S < 2:
            raise ValueError(f"S must be at least 2, got {S}")
        unknown = [h for h in heads if h not in HEADS]
        if unknown or not heads:
            raise ValueError(f"heads must be among {HEADS}, got {list(heads)}")
        self.S = S
        self.coef = nn.ParameterDict({h: nn.Parameter(torch.eye(S)[-1].clone())
                                      for h in heads})

    def __contains__(self, head: str) -> bool:
        return head in self.coef

    def step(self, head: str, rows: torch.Tensor) -> torch.Tensor:
        if rows.dim() != 2 or rows.shape[1] != self.S:
            raise ValueError(f"rows must be (N, {self.S}), got {tuple(rows.shape)}")
        return rows @ self.coef[head].to(rows.dtype)

    def predict(self, head: str, rows: torch.Tensor, steps: int) -> torch.Tensor:
        """(N, steps): Θ̂ one, two, … steps ahead, sliding the window."""
        out = []
        for _ in range(steps):
            nxt = self.step(head, rows)
            out.append(nxt)
            rows = torch.cat([rows[:, 1:], nxt[:, None]], dim=1)
        return torch.stack(out, 1)

    def save(self, path: PathLike, metadata: dict | None = None) -> None:
        save_safetensors({h: c.detach().clone() for h, c in self.coef.items()}, path,
                         metadata={"format": FORMAT, "S": str(self.S),
                                   "meta": json.dumps(metadata or {})})

    @classmethod
    def load(cls, path: PathLike) -> "LinComb":
        from safetensors import safe_open
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"lincomb file not found: {path}")
        with safe_open(str(path), "pt") as f:
            header = f.metadata() or {}
            if header.get("format") != FORMAT:
                raise ValueError(f"{path}: format {header.get('format')!r}, expected {FORMAT!r}")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        model = cls(int(header["S"]), tuple(tensors))
        for h, t in tensors.items():
            if tuple(t.shape) != (model.S,):
                raise ValueError(f"{path}: head {h!r} has {tuple(t.shape)} coefficients, "
                                 f"expected ({model.S},)")
            model.coef[h].data.copy_(t)
        return model
