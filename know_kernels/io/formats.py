"""Where each tensor's bytes lie in a checkpoint file, so that any flat range of it can be
read with one positional read into a caller's buffer.

Neither library offers that: ``safetensors`` exposes tensors and row slices through a memory
map but no byte offsets, and ``torch.load(mmap=True)`` likewise hands back tensors over a
map.  Every page read through a map stays in the process's resident set, so streaming a
model through one grows RSS to the model's size: reading a 1 GiB tensor in 4 MiB chunks
peaks at 370 MiB of RSS with positional reads, 1251 MiB through ``safe_open().get_slice``
and 1394 MiB through a memory map (``bench/bench_read_rss.py``; 370 MiB is the interpreter
with torch).  Hence the safetensors header is parsed here (an 8-byte length and a JSON
header), and the file offsets of a torch zip checkpoint's storages are recovered from its
zip records.
"""
from __future__ import annotations

import json
import math
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ..fileio import PathLike, load_state_dict

# safetensors dtype names; the format is little-endian, like every machine this runs on.
ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
             "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
             "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
             "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
             "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
_MAX_HEADER = 100 << 20  # the safetensors reference implementation's own limit


@dataclass(frozen=True)
class TensorRef:
    """One tensor of a source: its dtype and shape and, for a file, where its bytes are:
    ``offset`` in ``path`` (row-major, contiguous) or, when ``offset`` is None, ``tensor``
    to copy from (a memory-mapped tensor stored non-contiguously, or an in-memory one)."""
    dtype: torch.dtype
    shape: tuple[int, ...]
    path: Optional[Path] = None
    offset: Optional[int] = None
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
        except (ValueError, RecursionError) as exc:   # RecursionError: nested too deep
            raise _unreadable(path, f"header is not JSON: {type(exc).__name__}: {exc}") from None
    if not isinstance(header, dict):
        raise _unreadable(path, "header is not a JSON object")
    return header, 8 + n


def safetensors_refs(path: Path) -> tuple[dict[str, TensorRef], dict[str, str]]:
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
        if any(d < 0 for d in shape):
            raise _unreadable(path, f"{name!r} has a negative dimension in its shape {list(shape)}")
        if end - begin != math.prod(shape) * dtype.itemsize or not 0 <= begin <= end <= data_size:
            raise _unreadable(path, f"{name!r} has data_offsets {[begin, end]} that do not fit "
                                    f"its shape {list(shape)} {spec['dtype']} and the file")
        refs[name] = TensorRef(dtype, shape, path, start + begin)
    refs = dict(sorted(refs.items(), key=lambda kv: kv[1].offset))
    # Tensors may not share bytes (as safetensors requires): overlapping entries would let a
    # small file stand for any number of large tensors.
    end, last = start, None
    for name, ref in refs.items():
        if ref.numel:
            if ref.offset < end:
                raise _unreadable(path, f"{name!r} overlaps {last!r} in the data")
            end, last = ref.offset + ref.numel * ref.itemsize, name
    return refs, metadata


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
            if len(local) < 30 or local[:4] != b"PK\x03\x04":
                continue
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            if info.file_size:
                records[info.header_offset + 30 + name_len + extra_len] = info.file_size
    return records


def torch_refs(path: Path) -> dict[str, TensorRef]:
    """Tensor locations of a torch checkpoint (``.pt``, ``.pth``, ``.bin``, or a Lightning
    ``.ckpt``, whose ``state_dict`` is taken and other entries ignored).

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
    except Exception:  # zipfile's reading of a damaged archive raises many types
        records = {}   # torch read it: its tensors are then copied from the memory map
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
