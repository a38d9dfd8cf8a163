"""Loading a checkpoint into a module a chunk at a time, so a predicted model larger than
half of memory can still be loaded (``load_state_dict`` would hold the file's tensors and
the module's at once)."""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from ..fileio import PathLike, listing
from .sources import aliases, open_checkpoint


class LoadResult(NamedTuple):
    missing_keys: list[str]
    unexpected_keys: list[str]


def tied_entries(module: nn.Module) -> dict[str, str]:
    """State-dict names of ``module`` that share their tensor with an earlier name (tied
    weights, e.g. a language model's output layer and its input embedding)."""
    return aliases({n: (t.data_ptr(), t.dtype, tuple(t.shape), t.stride()) if t.numel() else None
                    for n, t in module.state_dict(keep_vars=True).items()})


@torch.no_grad()
def load_into(module: nn.Module, path: PathLike, *, strict: bool = True,
              chunk_bytes: int = 64 << 20) -> LoadResult:
    """Copy weights from a checkpoint (a predicted ``know_step{k}`` file or directory, or any
    checkpoint ``open_checkpoint`` reads) into ``module``'s parameters and buffers, a chunk
    at a time, converting dtypes as ``copy_`` does.

    Shapes must match.  With ``strict`` (the default) the names must match exactly too, save
    that a tied entry the file stores once (under either of its names) loads both;
    otherwise the common names are loaded and the others returned, like
    ``nn.Module.load_state_dict``.
    """
    source = open_checkpoint(path)
    try:
        targets = module.state_dict()
        ties = tied_entries(module)
        # a tie is satisfied by whichever of its names the file holds
        partners = {**ties, **{first: later for later, first in ties.items()}}
        missing = [n for n in targets if n not in source.tensors
                   and partners.get(n) not in source.tensors]
        unexpected = [n for n in source.tensors if n not in targets]
        misshaped = [f"{n} (module {tuple(targets[n].shape)}, file {source.tensors[n].shape})"
                     for n in targets if n in source.tensors
                     and tuple(targets[n].shape) != source.tensors[n].shape]
        problems = []
        if misshaped:
            problems.append(f"shape mismatch: {listing(misshaped)}")
        if strict and missing:
            problems.append(f"missing from the file: {listing(missing)}")
        if strict and unexpected:
            problems.append(f"not in the module: {listing(unexpected)}")
        if problems:
            raise ValueError(f"cannot load {path} into {type(module).__name__}: "
                             + "; ".join(problems))
        for name, dst in targets.items():
            ref = source.tensors.get(name)
            if ref is None or ref.numel == 0:
                continue
            step = max(1, chunk_bytes // ref.itemsize)
            buffer = torch.empty(min(step, ref.numel), dtype=ref.dtype)
            flat = dst.view(-1) if dst.is_contiguous() else torch.empty(ref.numel, dtype=dst.dtype)
            for start in range(0, ref.numel, step):
                stop = min(ref.numel, start + step)
                source.read(name, start, stop, buffer[:stop - start])
                flat[start:stop].copy_(buffer[:stop - start])
            if flat.data_ptr() != dst.data_ptr():
                dst.copy_(flat.view(dst.shape))
        return LoadResult(missing, unexpected)
    finally:
        source.close()
