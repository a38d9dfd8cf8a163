"""Valid files of every format the package parses itself, and the check that a reader either
loads a file or refuses it with its own error naming the file, within bounded memory: the
fuzz tests' (tests/reliability/test_fuzz_readers.py) shared parts."""
import json
import struct
import tracemalloc
from pathlib import Path

import torch

# Python-side allocations a reader may make beyond a multiple of the file's size (the
# interpreter's own bookkeeping, small caches).
SLACK = 256 << 10


def safetensors_bytes(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def valid_safetensors() -> tuple[dict, bytes]:
    """A header of three tensors (two dtypes, a 0-d and an empty one) and its data."""
    a = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    b = torch.arange(5, dtype=torch.int16)
    c = torch.tensor(2.5, dtype=torch.float64)
    parts, header, at = [], {"__metadata__": {"format": "pt"}}, 0
    for name, t, code in (("a", a, "F32"), ("b", b, "I16"), ("c", c, "F64"),
                          ("e", torch.zeros(0, 3), "F32")):
        raw = t.numpy().tobytes()
        header[name] = {"dtype": code, "shape": list(t.shape), "data_offsets": [at, at + len(raw)]}
        parts.append(raw)
        at += len(raw)
    return header, b"".join(parts)


def refused_or_loaded(path: Path, load, allowed=(ValueError, FileNotFoundError), size=None):
    """``load(path)``'s result, or None when it raised one of ``allowed`` naming ``path``
    (anything else fails the test).  Asserts that its Python allocations peaked below a few
    times ``size`` (default: the size of the files in ``path``'s directory)."""
    if size is None:
        size = sum(p.stat().st_size for p in path.parent.iterdir() if p.is_file())
    tracemalloc.start()
    try:
        result = load(path)
    except allowed as exc:
        assert str(path) in str(exc), f"the error does not name {path}: {exc!r}"
        result = None
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak <= 4 * size + SLACK, f"peak {peak} bytes reading a {size}-byte file"
    return result
