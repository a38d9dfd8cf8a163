"""Where predictions go: state dicts in memory (:class:`MemorySink`) or safetensors files
written in place and renamed when complete (:class:`FileSink`).

Both take flat ranges of any tensor of any step in any order (``write``), so the pipeline
fills them chunk by chunk.  A sink's life: ``create`` (one process makes the outputs),
``open`` (every process), ``write``…, ``close``, then ``commit`` or ``discard``.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch

from ..fileio import (PathLike, atomic_path, listing, naming, save_safetensors, sweep_stale,
                      unique_token, write_at)
from .formats import ST_NAMES
from .sources import INDEX_SUFFIXES, FileSource, Source


class OutFile:
    """A safetensors file written out of order.

    The header is fixed from the tensors' dtypes and shapes, so every tensor's byte range
    is known before any data exists.  The file is built as ``.NAME.TOKEN.partial`` beside
    the target and renamed over it by :meth:`commit`.  ``token`` (default: one unique to
    this process and call, :func:`~know_kernels.fileio.unique_token`) is the same on every
    rank of a distributed job, so they all open one file, and differs between runs, so two
    runs never write into each other's file.  Every failed read or write raises an
    ``OSError`` naming the target.
    """

    def __init__(self, path: Path, entries: Sequence[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: Optional[Mapping[str, str]] = None, token: Optional[str] = None):
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.{token or unique_token()}.partial")
        # Widest dtypes first keeps every tensor aligned to its element size, as safetensors does.
        ordered = sorted(entries, key=lambda e: (-e[1].itemsize, e[0]))
        header: dict = {"__metadata__": dict(metadata)} if metadata else {}
        self.offsets: dict[str, int] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        at = 0
        for name, dtype, shape in ordered:
            nbytes = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": ST_NAMES[dtype], "shape": list(shape),
                            "data_offsets": [at, at + nbytes]}
            self.offsets[name], self.dtypes[name] = at, dtype
            at += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.header = struct.pack("<Q", len(raw)) + raw
        self.offsets = {n: len(self.header) + o for n, o in self.offsets.items()}
        self.size = len(self.header) + at
        self._fd: Optional[int] = None
        self.written = 0

    @contextlib.contextmanager
    def _named(self):
        try:
            yield
        except OSError as exc:
            raise naming(exc, self.path, always=True) from None

    def create(self) -> None:
        """The temporary file at full size with its header (one process does this)."""
        with self._named():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
            try:
                write_at(fd, torch.frombuffer(bytearray(self.header), dtype=torch.uint8), 0)
                os.ftruncate(fd, self.size)
            finally:
                os.close(fd)

    def open(self) -> None:
        with self._named():
            self._fd = os.open(self.tmp, os.O_WRONLY)

    def write(self, name: str, start: int, data: torch.Tensor) -> None:
        """Elements of ``name`` from flat index ``start``: ``data`` is contiguous, 1-D, on
        the CPU, in the file's dtype for ``name``."""
        if data.dtype != self.dtypes[name]:
            raise TypeError(f"{name!r} is {self.dtypes[name]} in {self.path}, got {data.dtype}")
        with self._named():
            self.written += write_at(self._fd, data,
                                     self.offsets[name] + start * data.element_size())

    def close(self, sync: bool = True) -> None:
        if self._fd is not None:
            try:
                if sync:
                    with self._named():
                        os.fsync(self._fd)
            finally:
                os.close(self._fd)
                self._fd = None

    def commit(self) -> None:
        with self._named():
            os.replace(self.tmp, self.path)

    def discard(self) -> None:
        self.close(sync=False)
        self.tmp.unlink(missing_ok=True)


class MemorySink:
    """One state dict per step, each tensor allocated like Θ^0's (its device) in the output
    dtype; tied names share the tensor of the name they are tied to."""

    def __init__(self, source: Source, steps: int, dtypes: Mapping[str, torch.dtype]):
        self.source, self.steps, self.dtypes = source, steps, dtypes
        self.states: list[dict[str, torch.Tensor]] = []
        self.written = 0

    def create(self) -> None:
        def like(name):
            ref = self.source.tensors[name]
            device = ref.tensor.device if ref.tensor is not None else "cpu"
            return torch.empty(ref.shape, dtype=self.dtypes[name], device=device)
        self.states = []
        for _ in range(self.steps):
            state: dict[str, torch.Tensor] = {}
            for name in self.source.tensors:
                first = self.source.tied.get(name)  # always an earlier name
                state[name] = state[first] if first is not None else like(name)
            self.states.append(state)

    def open(self) -> None:
        pass

    def write(self, step: int, name: str, start: int, data: torch.Tensor) -> None:
        self.states[step][name].view(-1)[start:start + data.numel()].copy_(data)
        self.written += data.numel() * data.element_size()

    def close(self, sync: bool = True) -> None:
        pass

    def commit(self) -> None:
        pass

    def discard(self) -> None:
        self.states = []


@dataclass
class _Output:
    """Everything one predicted step writes: a file, or a directory of shards and an index,
    with the non-weight files of Θ^0's model directory."""
    target: Path
    files: list[OutFile]
    index: Optional[tuple[Path, dict]]   # the index file and its metadata
    where: dict[str, OutFile]
    extras: list[Path]                   # files copied from Θ^0's directory

    def paths(self) -> list[Path]:
        return ([f.path for f in self.files] + ([self.index[0]] if self.index else [])
                + [self.target / p.name for p in self.extras])


def output_target(out_dir: PathLike, step: int, directory: bool) -> Path:
    """``know_step{k}.safetensors``, or the directory ``know_step{k}`` when Θ^0 is a model
    directory or sharded."""
    name = f"know_step{step}"
    return Path(out_dir) / (name if directory else f"{name}.safetensors")


def safetensors_name(name: str) -> str:
    """The safetensors name Hugging Face gives the same weights (``pytorch_model-…bin`` ->
    ``model-….safetensors``; index likewise); outputs are always safetensors."""
    if name.endswith(INDEX_SUFFIXES[1]):
        return safetensors_name(name[:-len(INDEX_SUFFIXES[1])] + ".bin") + ".index.json"
    path = Path(name)
    if path.suffix == ".safetensors" or name.endswith(INDEX_SUFFIXES[0]):
        return name
    stem = path.stem
    if stem.startswith("pytorch_model"):
        stem = "model" + stem[len("pytorch_model"):]
    return stem + ".safetensors"


def _plan_output(out_dir: Path, step: int, source: FileSource,
                 dtypes: Mapping[str, torch.dtype], know_meta: dict, token: str) -> _Output:
    sharded = source.shards is not None
    target = output_target(out_dir, step, sharded)
    layout = source.shards if sharded else {target.name: list(source.tensors)}
    files, where = [], {}
    for file_name, names in layout.items():
        # Θ^0's own metadata (of the same shard, or of its one file) is carried over.
        inherited = source.file_metadata.get(file_name if sharded else source.files[0].name, {})
        meta = {**{k: v for k, v in inherited.items() if isinstance(v, str)}, "format": "pt",
                "know": json.dumps(know_meta)}
        # safetensors stores no shared tensors: a tied name is left to its loader to re-tie
        kept = [n for n in names if n not in source.tied]
        out = OutFile((target / safetensors_name(file_name)) if sharded else out_dir / file_name,
                      [(n, dtypes[n], source.tensors[n].shape) for n in kept], meta, token)
        files.append(out)
        where.update((n, out) for n in kept)
    index = None
    if source.index_name is not None:
        total = sum(math.prod(source.tensors[n].shape) * dtypes[n].itemsize for n in where)
        index = (target / safetensors_name(source.index_name),
                 {**source.index_metadata, "total_size": total, "know": know_meta})
    return _Output(target, files, index, where, source.extra_files())


class FileSink:
    """``know_step{k}`` outputs in ``out_dir`` laid out like Θ^0 (see :func:`output_target`).

    Nothing is created until :meth:`create`; :meth:`discard` removes every temporary file
    and each directory that ``create`` made, so a failed run leaves the disk as it found it.
    ``token`` names this run's temporary files (the same on every rank; default: unique).
    The caller holds ``out_dir``'s :func:`~know_kernels.fileio.output_lock` from before
    :meth:`check_targets` until after :meth:`commit`: then :meth:`create` may sweep away
    what earlier, killed runs left.
    """

    def __init__(self, out_dir: PathLike, source: FileSource, steps: int,
                 dtypes: Mapping[str, torch.dtype], metadata: dict,
                 token: Optional[str] = None):
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise ValueError(f"output directory {self.out_dir} is a file; give a directory")
        unstorable = [f"{n!r} ({d})" for n, d in dtypes.items() if d not in ST_NAMES]
        if unstorable:
            raise ValueError(f"{source.label}: safetensors cannot store {listing(unstorable)}")
        token = token or unique_token()
        self.outputs = [_plan_output(self.out_dir, k, source, dtypes, {**metadata, "know_step": k},
                                     token)
                        for k in range(1, steps + 1)]
        self._made: list[Path] = []

    def files(self) -> list[OutFile]:
        return [f for out in self.outputs for f in out.files]

    def check_targets(self, inputs: Sequence[Path], force: bool) -> None:
        """Refuse to overwrite an input, or an existing output without ``force``."""
        inputs = {p.resolve() for p in inputs}
        for out in self.outputs:
            for path in out.paths():
                if path.resolve() in inputs:
                    raise ValueError(f"output {path} would overwrite an input; choose another "
                                     f"output directory")
                if path.exists() and not force:
                    raise FileExistsError(f"{path} exists; pass --force (force=True) to "
                                          f"overwrite it")

    def create(self) -> None:
        directories = [*reversed(self.out_dir.parents), self.out_dir]
        directories += [o.target for o in self.outputs if o.target.suffix != ".safetensors"]
        self._made = [d for d in directories if not d.exists()]
        for out in self.outputs:
            for path in out.paths():
                sweep_stale(path)
        for f in self.files():
            f.create()

    def open(self) -> None:
        for f in self.files():
            f.open()

    def write(self, step: int, name: str, start: int, data: torch.Tensor) -> None:
        self.outputs[step].where[name].write(name, start, data)

    def close(self, sync: bool = True) -> None:
        """Close every file even if one fails (a full disk shows up at fsync), then raise."""
        errors = []
        for f in self.files():
            try:
                f.close(sync=sync)
            except OSError as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    def commit(self) -> None:
        for out in self.outputs:
            for f in out.files:
                f.commit()
            for extra in out.extras:
                with atomic_path(out.target / extra.name) as tmp:
                    shutil.copyfile(extra, tmp)
            if out.index is not None:
                path, metadata = out.index
                write_index(path, {f.path.name: list(f.offsets) for f in out.files}, metadata)

    def discard(self) -> None:
        for f in self.files():
            f.discard()
        for directory in reversed(self._made):
            with contextlib.suppress(OSError):
                directory.rmdir()

    @property
    def written(self) -> int:
        return sum(f.written for f in self.files())


def plan_shards(sizes: Mapping[str, int], max_shard_bytes: int) -> dict[str, list[str]]:
    """Hugging Face-style shard file names -> tensor names: tensors in order, starting a new
    shard whenever the next tensor would take this one past ``max_shard_bytes``."""
    if max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    groups, size = [[]], 0
    for name, nbytes in sizes.items():
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    return {f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors": g for i, g in enumerate(groups)}


def write_index(path: Path, shards: Mapping[str, Sequence[str]], metadata: Mapping) -> None:
    """A ``*.safetensors.index.json`` (names sorted, like Hugging Face's), atomically, with the
    permissions of the shards beside it."""
    weight_map = dict(sorted((n, shard) for shard, names in shards.items() for n in names))
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({"metadata": dict(metadata), "weight_map": weight_map},
                                  indent=2) + "\n")
        shutil.copymode(path.parent / next(iter(shards)), tmp)


def save_sharded(state: Mapping[str, torch.Tensor], directory: PathLike, *,
                 max_shard_bytes: int = 5 * 10**9,
                 metadata: Optional[Mapping[str, str]] = None) -> Path:
    """Save an in-memory state dict as a Hugging Face-style sharded checkpoint: shard files
    and ``model.safetensors.index.json`` in ``directory``."""
    directory = Path(directory)
    shards = plan_shards({n: t.numel() * t.element_size() for n, t in state.items()},
                         max_shard_bytes)
    for shard, names in shards.items():
        save_safetensors({n: state[n] for n in names}, directory / shard,
                         metadata={"format": "pt", **(metadata or {})})
    total = sum(t.numel() * t.element_size() for t in state.values())
    write_index(directory / "model.safetensors.index.json", shards, {"total_size": total})
    return directory
