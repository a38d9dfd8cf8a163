"""KNOW prediction for models larger than memory: checkpoints are read lazily, a chunk of rows
at a time, and the predictions are written into their output files as they come.

``predict_files([Θ^0, Θ^1, …], out_dir, known)`` does what ``predict.predict`` does — same
routing, validation, batching and predictors — with memory O(chunk_rows) instead of
O(model):

* Sources (:func:`open_checkpoint`) know each tensor's dtype, shape, file and byte offset and
  read any flat element range with ``os.preadv`` into a caller's buffer: a ``.safetensors``
  file (the header is parsed here), a Hugging Face-style sharded checkpoint (a directory or its
  ``*.safetensors.index.json``, whose ``weight_map`` names each tensor's shard) and ``.pt`` /
  ``.pth`` files opened with ``torch.load(mmap=True, weights_only=True)`` — their tensors'
  file offsets are recovered from the zip records so they are read like the others; only a
  tensor stored non-contiguously is copied out of the memory map.  Plain reads instead of a
  memory map keep the resident set bounded: touched mapped pages count in RSS.
* Outputs (:class:`OutFile`) are safetensors files whose header is computed up front from
  Θ^0's metadata; every chunk is written at its offset, in a temporary file beside the
  target that is renamed only when the whole model was written.
* A reader thread prefetches the next chunk while the current one is predicted, and a writer
  thread writes the previous one.  On a GPU (``device="cuda"``) rows go through pinned
  buffers, the host-to-device copy of the next chunk runs on a side stream during the
  current chunk's compute, and results come back asynchronously.
* Under ``torchrun`` the ranks split the work by bytes and write disjoint byte ranges of the
  same files (see ``distributed.py``).

Within one process, the rows of each batch are exactly those ``predict()`` builds with the
same ``chunk_rows``, so both give identical results.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import queue
import shutil
import struct
import threading
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, NamedTuple, Optional, Sequence, Union

import torch
from torch import nn

from ..kernels.baselines import DEFAULT_LAMBDA
from ..pipeline.distributed import Comm, communicator, split
from ..fileio import CHECKPOINT_SUFFIXES, atomic_path, load_state_dict, save_safetensors
from ..known.heads import KNOWN
from ..pipeline.predict import (DEFAULT_CHUNK_ROWS, Segment, batches, check_arguments, check_consistent,
                      dtype_groups, group_by_head, nonfinite_error, predict_rows,
                      resolve_known)
from ..known.routing import Route, route_state

PathLike = Union[str, os.PathLike]

# safetensors dtype names; the format is little-endian, like every machine this runs on.
ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
             "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
             "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
             "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
             "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
INDEX_SUFFIX = ".safetensors.index.json"
_MAX_HEADER = 100 << 20  # the safetensors reference implementation's own limit
_PIPELINE_DEPTH = 3      # chunks in flight per stage: one being filled, one waiting, one in use


# --------------------------------------------------------------------------- reading

@dataclass(frozen=True)
class TensorRef:
    """Where one tensor's bytes are: ``offset`` in ``path`` (row-major, contiguous), or, when
    ``offset`` is None, a memory-mapped ``tensor`` to copy from."""
    dtype: torch.dtype
    shape: tuple[int, ...]
    path: Path
    offset: Optional[int]
    tensor: Optional[torch.Tensor] = field(default=None, compare=False, repr=False)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize


def _unreadable(path: Path, why: str) -> ValueError:
    return ValueError(f"{path}: not a readable safetensors file ({why})")


def read_safetensors_header(path: PathLike) -> tuple[dict, int]:
    """The parsed JSON header of a safetensors file and the byte offset its data starts at."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise _unreadable(path, "shorter than its 8-byte header length")
        n = struct.unpack("<Q", raw)[0]
        if n > min(_MAX_HEADER, size - 8):
            raise _unreadable(path, f"header length {n} exceeds the file or the format's limit")
        try:
            header = json.loads(fh.read(n))
        except ValueError as exc:
            raise _unreadable(path, f"header is not JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise _unreadable(path, "header is not a JSON object")
    return header, 8 + n


def _safetensors_refs(path: Path) -> tuple[dict[str, TensorRef], dict[str, str]]:
    """Tensor locations in file order, and the file's ``__metadata__``."""
    header, start = read_safetensors_header(path)
    data_size = path.stat().st_size - start
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise _unreadable(path, "__metadata__ is not an object")
    refs = {}
    for name, spec in header.items():
        try:
            dtype = ST_DTYPES[spec["dtype"]]
            shape = tuple(int(d) for d in spec["shape"])
            begin, end = (int(x) for x in spec["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise _unreadable(path, f"bad header entry for {name!r}: {spec!r}") from exc
        if end - begin != math.prod(shape) * dtype.itemsize or not 0 <= begin <= end <= data_size:
            raise _unreadable(path, f"{name!r} has data_offsets {[begin, end]} that do not fit "
                                    f"its shape {list(shape)} {spec['dtype']} and the file")
        refs[name] = TensorRef(dtype, shape, path, start + begin)
    return dict(sorted(refs.items(), key=lambda kv: kv[1].offset)), metadata


def _zip_records(path: Path) -> dict[int, int]:
    """File offset -> size of every stored ``*/data/<key>`` record of a torch zip checkpoint."""
    records = {}
    with zipfile.ZipFile(path) as zf, open(path, "rb") as fh:
        for info in zf.infolist():
            parts = info.filename.split("/")
            if len(parts) < 2 or parts[-2] != "data" or info.compress_type != zipfile.ZIP_STORED:
                continue
            fh.seek(info.header_offset)
            local = fh.read(30)
            if local[:4] != b"PK\x03\x04":
                continue
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            if info.file_size:
                records[info.header_offset + 30 + name_len + extra_len] = info.file_size
    return records


def _torch_refs(path: Path) -> dict[str, TensorRef]:
    """Tensor locations of a ``.pt``/``.pth`` file.

    ``torch.load(mmap=True)`` maps the whole file and slices one storage per zip record, so
    a storage's address minus its record's file offset is the same for all of them; that
    base is found by matching addresses to records (checked for every storage), giving
    each contiguous tensor a file offset.  Anything that does not match is read through the
    memory map instead.
    """
    from torch.utils.serialization import config
    previous, config.load.mmap = config.load.mmap, True
    try:
        state = load_state_dict(path)  # weights-only, with fileio's checks and messages
    finally:
        config.load.mmap = previous
    storages = {}
    for t in state.values():
        s = t.untyped_storage()
        if s.nbytes():
            storages[s.data_ptr()] = s.nbytes()
    try:
        records = _zip_records(path)
    except zipfile.BadZipFile:
        records = {}
    base = None
    if storages and records:
        lowest = min(storages)
        for candidate in sorted(records):
            if all(records.get(p - (lowest - candidate)) == n for p, n in storages.items()):
                base = lowest - candidate
                break
    refs = {}
    for name, t in state.items():
        shape, dtype = tuple(t.shape), t.dtype
        if t.numel() == 0:
            refs[name] = TensorRef(dtype, shape, path, 0)
        elif base is not None and t.is_contiguous():
            offset = t.untyped_storage().data_ptr() - base + t.storage_offset() * t.element_size()
            refs[name] = TensorRef(dtype, shape, path, offset)
        else:
            refs[name] = TensorRef(dtype, shape, path, None, t)
    return refs


class Checkpoint:
    """One checkpoint, read lazily: tensor metadata up front, bytes on request.

    ``shards`` maps shard file names to the tensors they hold when the checkpoint is a
    directory of shards (the outputs then get the same layout), else it is None.
    """

    def __init__(self, label: str, tensors: dict[str, TensorRef], files: list[Path], *,
                 shards: Optional[dict[str, list[str]]] = None, index_name: Optional[str] = None,
                 index_metadata: Optional[dict] = None,
                 file_metadata: Optional[dict[str, dict]] = None):
        self.label = label
        self.tensors = tensors
        self.files = files
        self.shards = shards
        self.index_name = index_name
        self.index_metadata = index_metadata or {}
        self.file_metadata = file_metadata or {}
        self._fds: dict[Path, int] = {}
        self._flat: tuple[str, torch.Tensor] | None = None

    def meta_state(self) -> dict[str, torch.Tensor]:
        """Shape/dtype stand-ins (meta tensors) for routing and consistency checks."""
        return {n: torch.empty(r.shape, dtype=r.dtype, device="meta")
                for n, r in self.tensors.items()}

    def read(self, name: str, start: int, stop: int, out: torch.Tensor) -> None:
        """Elements [start, stop) of the flattened tensor ``name`` into ``out``, a contiguous
        1-D CPU tensor of that many elements of the tensor's dtype."""
        ref = self.tensors[name]
        if ref.offset is None:
            # A non-contiguous tensor is flattened once (one at a time: reads go in order).
            if self._flat is None or self._flat[0] != name:
                self._flat = (name, ref.tensor.reshape(-1))
            out.copy_(self._flat[1][start:stop])
            return
        view = memoryview(out.view(torch.uint8).numpy())
        fd = self._fds.get(ref.path)
        if fd is None:
            fd = self._fds[ref.path] = os.open(ref.path, os.O_RDONLY)
        offset, done = ref.offset + start * ref.itemsize, 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], offset + done)
            if n == 0:
                raise ValueError(f"{ref.path}: ends before the data of {name!r} (truncated?)")
            done += n

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._flat = None


def _open_file(path: Path, label: str) -> Checkpoint:
    if path.suffix == ".safetensors":
        refs, metadata = _safetensors_refs(path)
        return Checkpoint(label, refs, [path], file_metadata={path.name: metadata})
    if path.suffix in (".pt", ".pth"):
        return Checkpoint(label, _torch_refs(path), [path])
    raise ValueError(f"{path}: unsupported checkpoint type {path.suffix!r}; use one of "
                     f"{CHECKPOINT_SUFFIXES}, a sharded checkpoint directory or its "
                     f"*{INDEX_SUFFIX}")


def _open_sharded(index: Path, label: str) -> Checkpoint:
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
        by_shard.setdefault(shard, []).append(name)
    tensors, files, shards, metadata = {}, [index], {}, {}
    for shard in sorted(by_shard):
        path = index.parent / shard
        if Path(shard).name != shard or path.suffix != ".safetensors":
            raise ValueError(f"{index}: shard {shard!r} must be a .safetensors file name in the "
                             f"index's directory")
        if not path.is_file():
            raise FileNotFoundError(f"shard {shard} listed in {index} is missing "
                                    f"(needed for {by_shard[shard][:3]}…)")
        refs, metadata[shard] = _safetensors_refs(path)
        absent = [n for n in by_shard[shard] if n not in refs]
        if absent:
            raise ValueError(f"{index} maps {absent[:5]} to {shard}, which does not hold them")
        wanted = set(by_shard[shard])
        shards[shard] = [n for n in refs if n in wanted]
        tensors.update((n, refs[n]) for n in shards[shard])
        files.append(path)
    index_metadata = spec.get("metadata")
    return Checkpoint(label, tensors, files, shards=shards, index_name=index.name,
                      index_metadata=index_metadata if isinstance(index_metadata, dict) else {},
                      file_metadata=metadata)


def open_checkpoint(path: PathLike) -> Checkpoint:
    """A lazily read checkpoint: a ``.safetensors``, ``.pt`` or ``.pth`` file, a sharded
    checkpoint's ``*.safetensors.index.json``, or a directory holding either one index or
    a single ``.safetensors`` file."""
    label, path = str(path), Path(path)
    if path.is_dir():
        indexes = sorted(path.glob(f"*{INDEX_SUFFIX}"))
        singles = sorted(path.glob("*.safetensors"))
        if len(indexes) == 1:
            return _open_sharded(indexes[0], label)
        if not indexes and len(singles) == 1:
            refs, metadata = _safetensors_refs(singles[0])
            return Checkpoint(label, refs, singles, shards={singles[0].name: list(refs)},
                              file_metadata={singles[0].name: metadata})
        raise ValueError(f"{path}: expected one *{INDEX_SUFFIX} or a single .safetensors file "
                         f"in this directory, found {[p.name for p in indexes + singles][:6]}")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.name.endswith(INDEX_SUFFIX):
        return _open_sharded(path, label)
    return _open_file(path, label)


# --------------------------------------------------------------------------- writing

class OutFile:
    """A safetensors file written out of order.

    The header is fixed from the tensors' dtypes and shapes, so every tensor's byte range
    is known before any data exists.  The file is built as ``.NAME.partial`` beside the
    target (a fixed name, so every rank of a distributed job opens the same one and a rerun
    after a crash reuses it) and renamed over the target by :meth:`commit`.
    """

    def __init__(self, path: Path, entries: Sequence[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: Optional[Mapping[str, str]] = None):
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.partial")
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

    def create(self) -> None:
        """The temporary file at full size with its header (one process does this)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            os.pwrite(fd, self.header, 0)
            os.ftruncate(fd, self.size)
        finally:
            os.close(fd)

    def open(self) -> None:
        self._fd = os.open(self.tmp, os.O_WRONLY)

    def write(self, name: str, start: int, data: torch.Tensor) -> None:
        """Elements of ``name`` from flat index ``start``: ``data`` is contiguous, 1-D, on
        the CPU, in the file's dtype for ``name``."""
        if data.dtype != self.dtypes[name]:
            raise TypeError(f"{name!r} is {self.dtypes[name]} in {self.path}, got {data.dtype}")
        view = memoryview(data.view(torch.uint8).numpy())
        offset, done = self.offsets[name] + start * data.element_size(), 0
        while done < len(view):
            done += os.pwrite(self._fd, view[done:], offset + done)
        self.written += done

    def close(self, sync: bool = True) -> None:
        if self._fd is not None:
            try:
                if sync:
                    os.fsync(self._fd)
            finally:
                os.close(self._fd)
                self._fd = None

    def commit(self) -> None:
        os.replace(self.tmp, self.path)

    def discard(self) -> None:
        self.close(sync=False)
        self.tmp.unlink(missing_ok=True)


@dataclass
class _Output:
    """Everything one predicted step writes: a file, or a directory of shards and an index."""
    target: Path
    files: list[OutFile]
    index: Optional[tuple[Path, dict]]   # the index file and its metadata
    where: dict[str, OutFile]

    def paths(self) -> list[Path]:
        return [f.path for f in self.files] + ([self.index[0]] if self.index else [])


def output_target(out_dir: PathLike, step: int, sharded: bool) -> Path:
    """``know_step{k}.safetensors``, or the directory ``know_step{k}`` for sharded models."""
    name = f"know_step{step}"
    return Path(out_dir) / (name if sharded else f"{name}.safetensors")


def _plan_output(out_dir: Path, step: int, source: Checkpoint,
                 dtypes: Mapping[str, torch.dtype], know_meta: dict) -> _Output:
    sharded = source.shards is not None
    target = output_target(out_dir, step, sharded)
    layout = source.shards if sharded else {target.name: list(source.tensors)}
    files, where = [], {}
    for file_name, names in layout.items():
        # Θ^0's own metadata (of the same shard, or of its one file) is carried over.
        inherited = source.file_metadata.get(file_name if sharded else source.files[0].name, {})
        meta = {**{k: v for k, v in inherited.items() if isinstance(v, str)}, "format": "pt",
                "know": json.dumps(know_meta)}
        out = OutFile((target if sharded else out_dir) / file_name,
                      [(n, dtypes[n], source.tensors[n].shape) for n in names], meta)
        files.append(out)
        where.update((n, out) for n in names)
    index = None
    if source.index_name is not None:
        total = sum(math.prod(source.tensors[n].shape) * dtypes[n].itemsize for n in where)
        index = (target / source.index_name,
                 {**source.index_metadata, "total_size": total, "know": know_meta})
    return _Output(target, files, index, where)


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


# --------------------------------------------------------------------------- pipeline

class _Cancelled(Exception):
    pass


class _Pipeline:
    """Bounded queues between threads; once any thread fails, blocked calls raise
    :class:`_Cancelled` instead of waiting forever, and the first error is kept."""

    def __init__(self):
        self.stop = threading.Event()
        self.errors: list[BaseException] = []

    def get(self, q: queue.Queue):
        while True:
            try:
                return q.get(timeout=0.05)
            except queue.Empty:
                if self.stop.is_set():
                    raise _Cancelled from None

    def put(self, q: queue.Queue, item) -> None:
        while True:
            try:
                return q.put(item, timeout=0.05)
            except queue.Full:
                if self.stop.is_set():
                    raise _Cancelled from None

    def fail(self, exc: BaseException) -> None:
        self.errors.append(exc)
        self.stop.set()

    def thread(self, fn: Callable[[], None]) -> threading.Thread:
        def body():
            try:
                fn()
            except _Cancelled:
                pass
            except BaseException as exc:
                self.fail(exc)
        t = threading.Thread(target=body, daemon=True)
        t.start()
        return t


@dataclass
class _Item:
    """One chunk: its segments, its head (None: copied from Θ^0) and the host data
    ((n, S) time-ordered rows, or (n,) Θ^0 values), held in a pool buffer."""
    head: Optional[str]
    batch: list[Segment]
    data: torch.Tensor
    buffer: torch.Tensor


@dataclass
class _Job:
    sources: list[Checkpoint]
    outputs: list[_Output]
    groups: list[tuple[Optional[str], list[Segment]]]   # this rank's share
    in_dtype: dict[str, torch.dtype]
    out_dtype: dict[str, torch.dtype]
    rows: int

    def close(self) -> None:
        for s in self.sources:
            s.close()

    def files(self) -> list[OutFile]:
        return [f for out in self.outputs for f in out.files]


def _fence(device: torch.device):
    """A marker, on the current stream, that a waiting thread can synchronise on."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record()
    return event


def _wait(fence) -> None:
    if fence is not None:
        fence.synchronize()


def _require_finite(stage: torch.Tensor, pieces) -> None:
    """Raise naming the parameter and checkpoint of the first NaN/Inf among ``pieces``
    (name, label, values), which together make up ``stage``."""
    # A sum is several times cheaper than isfinite and is NaN/Inf when any value is (or when
    # it overflows: then the exact scan finds nothing and the chunk goes on).
    if torch.isfinite(stage.sum(dim=1, dtype=torch.float32)).all():
        return
    for name, label, piece in pieces:
        if not torch.isfinite(piece).all():
            raise nonfinite_error(name, label)


def _run(job: _Job, *, known, method: str, steps: int, lam: float, backend: str,
         threads: Optional[int], precision: str, nonfinite: str, chunk_rows: int,
         device: torch.device, progress: Optional[Callable[[int, int], None]]) -> None:
    """Predict this rank's share: reader thread -> compute (this thread) -> writer thread.

    Buffers come from fixed pools, so memory stays at a few chunks whatever the model
    size; a buffer goes back to its pool once its last user is done with it (on a GPU,
    once the asynchronous copy that reads it has finished: the pool holds its fence).
    """
    S = len(job.sources)
    timeline = job.sources[::-1]
    gpu = device.type == "cuda"
    live = [(h, g) for h, g in job.groups if g]
    in_bytes = max([chunk_rows * S * job.in_dtype[g[0].name].itemsize for _, g in live], default=0)
    out_bytes = max([chunk_rows * steps * job.out_dtype[g[0].name].itemsize
                     for h, g in live if h is not None], default=0)
    pipe = _Pipeline()
    ready: queue.Queue = queue.Queue(maxsize=1)
    to_write: queue.Queue = queue.Queue(maxsize=1)
    in_pool: queue.Queue = queue.Queue()
    out_pool: queue.Queue = queue.Queue()
    for _ in range(_PIPELINE_DEPTH):
        in_pool.put((torch.empty(in_bytes, dtype=torch.uint8, pin_memory=gpu), None))
        out_pool.put((torch.empty(out_bytes, dtype=torch.uint8, pin_memory=gpu), None))

    def reader():
        staging = torch.empty(in_bytes, dtype=torch.uint8)
        for head, segments in live:
            dtype = job.in_dtype[segments[0].name]
            width = S if head is not None else 1
            # Copies move Θ^0 only, so a copy chunk holds as many bytes as a row chunk.
            for batch in batches(segments, chunk_rows * (S // width)):
                n = sum(seg.stop - seg.start for seg in batch)
                buffer, fence = pipe.get(in_pool)
                _wait(fence)
                flat = buffer[:n * width * dtype.itemsize].view(dtype)
                if head is None:
                    at = 0
                    for seg in batch:
                        job.sources[0].read(seg.name, seg.start, seg.stop,
                                            flat[at:at + seg.stop - seg.start])
                        at += seg.stop - seg.start
                    pipe.put(ready, _Item(None, batch, flat, buffer))
                    continue
                # Each snapshot's slice is one contiguous read; the rows are their transpose.
                stage = staging[:flat.numel() * dtype.itemsize].view(dtype).view(S, n)
                pieces = []
                for s, source in enumerate(timeline):
                    at = 0
                    for seg in batch:
                        piece = stage[s, at:at + seg.stop - seg.start]
                        source.read(seg.name, seg.start, seg.stop, piece)
                        pieces.append((seg.name, source.label, piece))
                        at += seg.stop - seg.start
                if nonfinite == "error":
                    _require_finite(stage, pieces)
                rows = flat.view(n, S)
                rows.copy_(stage.t())
                pipe.put(ready, _Item(head, batch, rows, buffer))
        pipe.put(ready, None)

    def writer():
        # Each item: segments, data (steps, n) — or (1, n) for a copy, the same for every
        # step —, a fence to wait for, and the pool its buffer returns to (if any).
        while True:
            work = pipe.get(to_write)
            if work is None:
                return
            batch, data, fence, pool, buffer = work
            try:
                _wait(fence)
                at = 0
                for seg in batch:
                    n = seg.stop - seg.start
                    for k, out in enumerate(job.outputs):
                        row = data[k if data.shape[0] > 1 else 0, at:at + n]
                        out.where[seg.name].write(seg.name, seg.start, row)
                    at += n
            finally:
                if pool is not None:
                    pool.put((buffer, None))

    if gpu:
        side = torch.cuda.Stream(device)
        dev_rows = [torch.empty(in_bytes, dtype=torch.uint8, device=device) for _ in range(2)]
        dev_free = [None, None]
    workers = [pipe.thread(reader), pipe.thread(writer)]
    done, turn = 0, 0
    try:
        while True:
            item = pipe.get(ready)
            if item is None:
                break
            dtype = job.in_dtype[item.batch[0].name]
            od = job.out_dtype[item.batch[0].name]
            if item.head is None:
                if od == dtype:
                    pipe.put(to_write, (item.batch, item.data[None], None, in_pool, item.buffer))
                else:
                    converted = item.data.to(od)[None]
                    in_pool.put((item.buffer, None))
                    pipe.put(to_write, (item.batch, converted, None, None, None))
                continue
            n = item.data.shape[0]
            rows = item.data
            if gpu:
                # Two device buffers: the next chunk's copy overlaps this chunk's compute.
                with torch.cuda.stream(side):
                    if dev_free[turn] is not None:
                        side.wait_event(dev_free[turn])
                    nbytes = item.data.numel() * dtype.itemsize
                    rows = dev_rows[turn][:nbytes].view(dtype).view(n, S)
                    rows.copy_(item.data, non_blocking=True)
                    copied = torch.cuda.Event()
                    copied.record(side)
                torch.cuda.current_stream(device).wait_event(copied)
                in_pool.put((item.buffer, copied))
            # The fused kernels write float32 or the rows' dtype; other outputs are cast below.
            kernel_dtype = (od if od in (dtype, torch.float32) or method != "known"
                            else torch.float32)
            pred = predict_rows(rows, item.head, method=method, known=known, steps=steps, lam=lam,
                                backend=backend, threads=threads, nonfinite=nonfinite,
                                out_dtype=None if kernel_dtype == dtype else kernel_dtype,
                                precision=precision)
            if gpu:
                dev_free[turn] = _fence(device)
                turn ^= 1
            else:
                in_pool.put((item.buffer, None))
            out_buffer, _ = pipe.get(out_pool)
            host = out_buffer[:n * steps * od.itemsize].view(od).view(steps, n)
            host.copy_(pred.t(), non_blocking=gpu)
            pipe.put(to_write, (item.batch, host, _fence(device), out_pool, out_buffer))
            done += n
            if progress is not None:
                progress(done, job.rows)
        pipe.put(to_write, None)
    except _Cancelled:
        pass
    except BaseException as exc:
        pipe.fail(exc)
    for worker in workers:
        worker.join()
    if pipe.errors:
        raise pipe.errors[0]


# --------------------------------------------------------------------------- entry points

def _resolve_dtype(value) -> Optional[torch.dtype]:
    if value is None or isinstance(value, torch.dtype):
        return value
    dtype = getattr(torch, str(value), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or dtype not in ST_NAMES:
        raise ValueError(f"out_dtype must be a floating-point dtype safetensors stores, "
                         f"got {value!r}")
    return dtype


def _check_targets(outputs: Sequence[_Output], inputs: Sequence[Path], force: bool) -> None:
    inputs = {p.resolve() for p in inputs}
    for out in outputs:
        for path in out.paths():
            if path.resolve() in inputs:
                raise ValueError(f"output {path} would overwrite an input; choose another --out")
            if path.exists() and not force:
                raise FileExistsError(f"{path} exists; pass --force (force=True) to overwrite it")


def _plan(checkpoints, out_dir, known, *, steps, method, route, out_dtype, force, comm: Comm,
          metadata: dict, protected: Sequence[Path]) -> _Job:
    """Open the sources, check them, and lay out the outputs and this rank's share."""
    sources: list[Checkpoint] = []
    try:
        for ck in checkpoints:
            sources.append(open_checkpoint(ck))
        refs = sources[0].tensors
        sizes = {n: refs[n].numel for n in refs}
        in_dtype = {n: refs[n].dtype for n in refs}
        out_dt = {n: out_dtype if out_dtype is not None and d.is_floating_point else d
                  for n, d in in_dtype.items()}
        unstorable = [f"{n!r} ({d})" for n, d in out_dt.items() if d not in ST_NAMES]
        if unstorable:
            raise ValueError(f"{sources[0].label}: safetensors cannot store "
                             f"{_listing(unstorable)}")
        outputs = [_plan_output(Path(out_dir), k, sources[0], out_dt, {**metadata, "know_step": k})
                   for k in range(1, steps + 1)]
        _check_targets(outputs, [p for s in sources for p in s.files] + list(protected), force)

        states = [s.meta_state() for s in sources]
        check_consistent(states, [s.label for s in sources])
        routes = route_state(states[0], route)
        by_head = group_by_head(routes, method, known, len(sources))
        groups = [(h, segs) for h, names in by_head.items()
                  for segs in dtype_groups(names, in_dtype, sizes)]
        copied = [n for n, h in routes.items() if h is None]
        groups += [(None, segs) for segs in dtype_groups(copied, in_dtype, sizes)]
        # Cost by bytes read: a predicted element reads S snapshots, a copied one only Θ^0.
        weights = [in_dtype[segs[0].name].itemsize * (len(sources) if h is not None else 1)
                   for h, segs in groups]
        mine = split([segs for _, segs in groups], weights, comm.rank, comm.world)
        groups = [(h, part) for (h, _), part in zip(groups, mine)]
        rows = sum(seg.stop - seg.start for h, part in groups if h is not None for seg in part)
        return _Job(sources, outputs, groups, in_dtype, out_dt, rows)
    except BaseException:
        for s in sources:
            s.close()
        raise


def _close_all(files: Sequence[OutFile], sync: bool) -> None:
    """Close every file even if one fails (a full disk shows up at fsync), then raise."""
    errors = []
    for f in files:
        try:
            f.close(sync=sync)
        except OSError as exc:
            errors.append(exc)
    if errors:
        raise errors[0]


def _discard(job: _Job) -> None:
    """Remove every temporary file, and the step directories if that leaves them empty."""
    for out in job.outputs:
        for f in out.files:
            f.discard()
        if out.index is not None:
            with contextlib.suppress(OSError):
                out.target.rmdir()


def _commit(job: _Job) -> None:
    for out in job.outputs:
        for f in out.files:
            f.commit()
        if out.index is not None:
            path, metadata = out.index
            write_index(path, {f.path.name: list(f.offsets) for f in out.files}, metadata)


def predict_files(checkpoints: Sequence[PathLike], out_dir: PathLike,
                  known: Union[KNOWN, PathLike, None] = None, *, steps: int = 1,
                  method: str = "known", lam: float = DEFAULT_LAMBDA, backend: str = "auto",
                  route: Route = None, nonfinite: str = "error",
                  chunk_rows: int = DEFAULT_CHUNK_ROWS, threads: Optional[int] = None,
                  precision: str = "float32", out_dtype: Union[torch.dtype, str, None] = None,
                  device: Union[torch.device, str] = "cpu", force: bool = False,
                  progress: Optional[Callable[[int, int], None]] = None) -> list[Path]:
    """Predict [Θ̂^{-1}, …, Θ̂^{-steps}] from checkpoint files [Θ^0, Θ^1, …] (paper order)
    without loading any of them whole; returns the outputs written, one per step.

    Arguments as ``predict.predict``; in addition: ``out_dir`` receives
    ``know_step{k}.safetensors`` per step, or a directory ``know_step{k}/`` with Θ^0's shard
    files and index when Θ^0 is sharded.  ``known`` may be a KNOWN or the path of one.
    ``out_dtype`` (e.g. ``"float32"``) converts every floating-point output; by default each
    tensor keeps Θ^0's dtype.  ``device`` computes there (``"cuda"``: this rank's GPU).
    Existing outputs are replaced only with ``force``; an input never is.  ``progress`` is
    called with (rows done, rows in total) for this process.  A router passed as ``route``
    sees meta tensors (shape and dtype, no values).

    Under ``torchrun`` (or in an initialised process group) every rank must call this with
    the same arguments; each predicts and writes a share of the model.
    """
    known, known_path = resolve_known(method, known)
    check_arguments(method=method, nonfinite=nonfinite, steps=steps,
                    chunk_rows=chunk_rows, count=len(checkpoints), precision=precision)
    out_dtype = _resolve_dtype(out_dtype)
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {str(device)!r} requested but CUDA is not available")
    metadata = {"method": method, "checkpoints": [str(c) for c in checkpoints]}
    if known is not None:
        metadata.update(({"known": str(known_path)} if known_path else {}),
                        known_provenance=known.provenance)
    with communicator(device) as comm:
        job = comm.step(lambda: _plan(checkpoints, out_dir, known, steps=steps, method=method,
                                      route=route, out_dtype=out_dtype, force=force, comm=comm,
                                      metadata=metadata,
                                      protected=[known_path] if known_path else []))
        heads = known
        if known is not None and comm.device.type != "cpu":
            heads = {h: copy.deepcopy(known[h]).to(comm.device) for h in known}
        rank0 = comm.rank == 0
        cleanup = (lambda: _discard(job)) if rank0 else None

        def compute():
            files = job.files()
            finished = False
            try:
                for f in files:
                    f.open()
                _run(job, known=heads, method=method, steps=steps, lam=lam, backend=backend,
                     threads=threads, precision=precision, nonfinite=nonfinite,
                     chunk_rows=chunk_rows, device=comm.device, progress=progress)
                finished = True
            finally:
                _close_all(files, sync=finished)
            expected = sum((seg.stop - seg.start) * job.out_dtype[seg.name].itemsize
                           for _, part in job.groups for seg in part) * steps
            written = sum(f.written for f in files)
            if written != expected:
                raise RuntimeError(f"wrote {written} bytes of predictions, expected {expected}")

        try:
            comm.step(lambda: [f.create() for f in job.files()] if rank0 else None, cleanup)
            comm.step(compute, cleanup)
            comm.step(lambda: _commit(job) if rank0 else None, cleanup)
        finally:
            job.close()
    return [out.target for out in job.outputs]


# --------------------------------------------------------------------------- loading back

class LoadResult(NamedTuple):
    missing_keys: list[str]
    unexpected_keys: list[str]


def _listing(names: Sequence[str], limit: int = 10) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


@torch.no_grad()
def load_into(module: nn.Module, path: PathLike, *, strict: bool = True,
              chunk_bytes: int = 64 << 20) -> LoadResult:
    """Copy weights from a checkpoint (a predicted ``know_step{k}`` file or directory, or any
    checkpoint :func:`open_checkpoint` reads) into ``module``'s parameters and buffers, a
    chunk at a time, converting dtypes as ``copy_`` does.

    Shapes must match.  With ``strict`` (the default) the names must match exactly too;
    otherwise the common names are loaded and the others returned, like
    ``nn.Module.load_state_dict``.
    """
    source = open_checkpoint(path)
    try:
        targets = module.state_dict()
        missing = [n for n in targets if n not in source.tensors]
        unexpected = [n for n in source.tensors if n not in targets]
        misshaped = [f"{n} (module {tuple(targets[n].shape)}, file {source.tensors[n].shape})"
                     for n in targets if n in source.tensors
                     and tuple(targets[n].shape) != source.tensors[n].shape]
        problems = []
        if misshaped:
            problems.append(f"shape mismatch: {_listing(misshaped)}")
        if strict and missing:
            problems.append(f"missing from the file: {_listing(missing)}")
        if strict and unexpected:
            problems.append(f"not in the module: {_listing(unexpected)}")
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
