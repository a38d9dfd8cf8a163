"""Checkpoints as sources of tensors: metadata up front, any flat range of a tensor on request.

Two kinds, read the same way by the prediction pipeline and by :func:`load_into`:

* :class:`MemorySource` over a state dict;
* :class:`FileSource` over files (:func:`open_checkpoint`): a ``.safetensors`` file, a torch
  checkpoint (``.pt``, ``.pth``, ``.bin``, Lightning ``.ckpt``), a Hugging Face-style
  sharded checkpoint (its directory or ``*.index.json``, shards in either format), or a
  model directory holding one weight file.  Bytes are read with ``os.preadv`` straight into
  the caller's buffer (see ``formats.py`` for why not through a memory map).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping, Optional

import torch

from ..fileio import CHECKPOINT_SUFFIXES, TORCH_SUFFIXES, PathLike, read_at
from .formats import TensorRef, safetensors_refs, torch_refs

INDEX_SUFFIXES = (".safetensors.index.json", ".bin.index.json")
WEIGHT_SUFFIXES = CHECKPOINT_SUFFIXES


class Source:
    """A checkpoint's tensors (``tensors``: name -> :class:`TensorRef`, in storage order) and
    a reader for flat ranges of them.  ``tied`` maps a name to the earlier name whose
    storage it shares (tied weights), which is read and written once for both."""

    def __init__(self, label: str, tensors: dict[str, TensorRef],
                 tied: Optional[dict[str, str]] = None):
        self.label = label
        self.tensors = tensors
        self.tied = tied or {}
        self._flat: Optional[tuple[str, torch.Tensor]] = None

    def meta_state(self) -> dict[str, torch.Tensor]:
        """Shape/dtype stand-ins (meta tensors) for routing and consistency checks."""
        return {n: torch.empty(r.shape, dtype=r.dtype, device="meta")
                for n, r in self.tensors.items()}

    def read(self, name: str, start: int, stop: int, out: torch.Tensor) -> None:
        """Elements [start, stop) of the flattened tensor ``name`` into ``out``, a contiguous
        1-D CPU tensor of that many elements of the tensor's dtype."""
        ref = self.tensors[name]
        # A tensor held in memory is flattened once (reads of one tensor come in order).
        if self._flat is None or self._flat[0] != name:
            self._flat = (name, ref.tensor.reshape(-1))
        out.copy_(self._flat[1][start:stop])

    def close(self) -> None:
        self._flat = None


def aliases(keys: Mapping[str, Optional[tuple]]) -> dict[str, str]:
    """Later name -> first name among names with the same storage key (None: not shared)."""
    first: dict[tuple, str] = {}
    tied = {}
    for name, key in keys.items():
        if key is not None:
            tied_to = first.setdefault(key, name)
            if tied_to != name:
                tied[name] = tied_to
    return tied


class MemorySource(Source):
    """A state dict in memory (on any device)."""

    def __init__(self, state: Mapping[str, torch.Tensor], label: str):
        bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise TypeError(f"{label}: entries {bad[:5]} are not tensors")
        super().__init__(label, {n: TensorRef(t.dtype, tuple(t.shape), tensor=t.detach())
                                 for n, t in state.items()},
                         # tied weights are views of the same memory
                         aliases({n: None if t.device.type == "meta" or not t.numel() else
                                  (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
                                  for n, t in state.items()}))


class FileSource(Source):
    """One checkpoint on disk.  ``files``: the files read; ``directory``: the model directory
    when the checkpoint is one (its other files travel with predictions); ``shards`` maps
    shard file names to the tensors they hold when it is a directory or sharded (the outputs
    then get the same layout), else None."""

    def __init__(self, label: str, tensors: dict[str, TensorRef], files: list[Path], *,
                 directory: Optional[Path] = None, shards: Optional[dict[str, list[str]]] = None,
                 index_name: Optional[str] = None, index_metadata: Optional[dict] = None,
                 file_metadata: Optional[dict[str, dict]] = None):
        # a torch file stores tied weights once, under both names
        super().__init__(label, tensors, aliases({
            n: None if r.offset is None or not r.numel else (r.path, r.offset, r.dtype, r.shape)
            for n, r in tensors.items()}))
        self.files = files
        self.directory = directory
        self.shards = shards
        self.index_name = index_name
        self.index_metadata = index_metadata or {}
        self.file_metadata = file_metadata or {}
        self._fds: dict[Path, int] = {}

    def read(self, name: str, start: int, stop: int, out: torch.Tensor) -> None:
        ref = self.tensors[name]
        if ref.offset is None:
            super().read(name, start, stop, out)
            return
        fd = self._fds.get(ref.path)
        if fd is None:
            fd = self._fds[ref.path] = os.open(ref.path, os.O_RDONLY)
        read_at(fd, out, ref.offset + start * ref.itemsize, f"{ref.path}, {name!r}")

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        super().close()

    def extra_files(self) -> list[Path]:
        """The model directory's files that hold no weights (config, tokenizer, …)."""
        if self.directory is None:
            return []
        return sorted(p for p in self.directory.iterdir()
                      if p.is_file() and p not in self.files and not is_weight_file(p))


def is_weight_file(path: Path) -> bool:
    return path.suffix in WEIGHT_SUFFIXES or path.name.endswith(INDEX_SUFFIXES)


def _file_refs(path: Path) -> tuple[dict[str, TensorRef], dict[str, str]]:
    if path.suffix == ".safetensors":
        return safetensors_refs(path)
    if path.suffix in TORCH_SUFFIXES:
        return torch_refs(path), {}
    raise ValueError(f"{path}: unsupported checkpoint type {path.suffix!r}; use one of "
                     f"{CHECKPOINT_SUFFIXES}, a sharded checkpoint directory or its "
                     f"*{INDEX_SUFFIXES[0]}")


def _open_sharded(index: Path, label: str, directory: Optional[Path]) -> FileSource:
    try:
        spec = json.loads(index.read_text())
        weight_map = spec["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{index}: not a sharded-checkpoint index with a weight_map "
                         f"({exc})") from exc
    by_shard: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        if not isinstance(shard, str):
            raise ValueError(f"{index}: weight_map maps {name!r} to {shard!r}, not a shard "
                             f"file name")
        by_shard.setdefault(shard, []).append(name)
    tensors, files, shards, metadata = {}, [index], {}, {}
    for shard in sorted(by_shard):
        path = index.parent / shard
        if Path(shard).name != shard or path.suffix not in WEIGHT_SUFFIXES:
            raise ValueError(f"{index}: shard {shard!r} must be a checkpoint file name in the "
                             f"index's directory")
        if not path.is_file():
            raise FileNotFoundError(f"shard {shard} listed in {index} is missing "
                                    f"(needed for {by_shard[shard][:3]}…)")
        refs, metadata[shard] = _file_refs(path)
        absent = [n for n in by_shard[shard] if n not in refs]
        if absent:
            raise ValueError(f"{index} maps {absent[:5]} to {shard}, which does not hold them")
        wanted = set(by_shard[shard])
        shards[shard] = [n for n in refs if n in wanted]
        tensors.update((n, refs[n]) for n in shards[shard])
        files.append(path)
    index_metadata = spec.get("metadata")
    return FileSource(label, tensors, files, directory=directory, shards=shards,
                      index_name=index.name,
                      index_metadata=index_metadata if isinstance(index_metadata, dict) else {},
                      file_metadata=metadata)


def _open_directory(path: Path, label: str) -> FileSource:
    indexes = sorted(p for p in path.iterdir() if p.name.endswith(INDEX_SUFFIXES))
    singles = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if len(indexes) > 1:
        # save_pretrained(safe_serialization=False) next to a safetensors save: prefer these.
        indexes = [p for p in indexes if p.name.endswith(INDEX_SUFFIXES[0])] or indexes
    if len(indexes) == 1:
        return _open_sharded(indexes[0], label, path)
    if not indexes and len(singles) > 1:
        singles = [p for p in singles if p.suffix == ".safetensors"] or singles
    if not indexes and len(singles) == 1:
        refs, metadata = _file_refs(singles[0])
        return FileSource(label, refs, singles, directory=path,
                          shards={singles[0].name: list(refs)},
                          file_metadata={singles[0].name: metadata})
    raise ValueError(f"{path}: expected one *{INDEX_SUFFIXES[0]} or a single weight file in "
                     f"this directory, found {[p.name for p in indexes + singles][:6]}")


def open_checkpoint(path: PathLike) -> FileSource:
    """A lazily read checkpoint: a file of ``CHECKPOINT_SUFFIXES``, a sharded checkpoint's
    index, or a directory holding one index or a single weight file."""
    label, path = str(path), Path(path)
    if path.is_dir():
        return _open_directory(path, label)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.name.endswith(INDEX_SUFFIXES):
        return _open_sharded(path, label, None)
    refs, metadata = _file_refs(path)
    return FileSource(label, refs, [path], file_metadata={path.name: metadata})


def open_source(checkpoint, index: int) -> Source:
    """A state dict or the path of a checkpoint, as a source labelled for error messages."""
    if isinstance(checkpoint, Mapping):
        return MemorySource(checkpoint, f"checkpoint[{index}]")
    return open_checkpoint(checkpoint)
