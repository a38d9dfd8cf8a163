"""Property-based tests of the parsers the package runs on untrusted files itself
(safetensors headers, torch zip checkpoints, Hugging Face index files, IDX files): every
mutated file is either read correctly or refused with the package's own error naming it;
nothing crashes, hangs (each example has a deadline) or allocates more than a few times
the file's size (tracemalloc, and the tensors' bytes against the file's).  CI runs a fixed
set of 100 examples per format; KNOW_FUZZ_EXAMPLES=N searches N fresh random ones.  Each
@example is a file that once got through with a raw error or an unbounded allocation."""
import gzip
import json
import os
import struct

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from know_kernels.io.sinks import save_sharded
from know_kernels.io.sources import open_checkpoint
from know_kernels.research.data import read_idx

from support.hostile import refused_or_loaded, safetensors_bytes, valid_safetensors

FUZZ = settings(max_examples=int(os.environ.get("KNOW_FUZZ_EXAMPLES", "100")), deadline=2000,
                derandomize=os.environ.get("KNOW_FUZZ_EXAMPLES") is None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


def read_all(path):
    """Every tensor of the checkpoint at ``path``, read as the pipeline reads them."""
    source = open_checkpoint(path)
    try:
        size = sum(p.stat().st_size for p in source.files)
        total, out = 0, {}
        for name, ref in source.tensors.items():
            if name in source.tied:
                continue
            total += ref.numel * ref.itemsize
            assert total <= size, "tensors claim more bytes than the files hold"
            buffer = torch.empty(ref.numel, dtype=ref.dtype)
            source.read(name, 0, ref.numel, buffer)
            out[name] = buffer.reshape(ref.shape)
        return out
    finally:
        source.close()


def same_as_reference(path, got):
    """Where safetensors itself also reads the file, it reads the same tensors."""
    try:
        want = load_file(str(path))
    except Exception:
        return
    assert got.keys() == want.keys()
    for name in got:
        assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape
        assert torch.equal(got[name].reshape(-1).view(torch.uint8),
                           want[name].reshape(-1).view(torch.uint8)), name


# ------------------------------------------------------------------------------ safetensors

JSONISH = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats()
                       | st.text(max_size=8),
                       lambda inner: st.lists(inner, max_size=4)
                       | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=8)
DIMS = st.integers(-3, 2**66) | st.sampled_from([0, 1, 2, 3, 4, 12])
FIELD_VALUES = {
    "dtype": st.sampled_from(["F32", "F64", "I16", "BF16", "BOOL", "U8", "F8_E4M3", "f32", "X"])
             | JSONISH,
    "shape": st.lists(DIMS, max_size=4) | JSONISH,
    "data_offsets": st.lists(st.integers(-5, 2**65) | st.sampled_from([0, 48, 58, 66]),
                             max_size=3) | JSONISH,
}


@st.composite
def safetensors_mutation(draw):
    header, data = valid_safetensors()
    kind = draw(st.sampled_from(["field", "entry", "name", "metadata", "length", "bytes",
                                 "truncate", "extend"]))
    names = [n for n in header if n != "__metadata__"]
    if kind == "field":
        name, field = draw(st.sampled_from(names)), draw(st.sampled_from(sorted(FIELD_VALUES)))
        header[name][field] = draw(FIELD_VALUES[field])
    elif kind == "entry":
        header[draw(st.sampled_from(names))] = draw(JSONISH)
    elif kind == "name":
        header[draw(st.text(max_size=12))] = header.pop(draw(st.sampled_from(names)))
    elif kind == "metadata":
        header["__metadata__"] = draw(JSONISH)
    raw = safetensors_bytes(header, data)
    if kind == "length":
        raw = struct.pack("<Q", draw(st.integers(0, 2**64 - 1))) + raw[8:]
    elif kind == "bytes":
        for _ in range(draw(st.integers(1, 4))):
            at = draw(st.integers(0, len(raw) - 1))
            raw = raw[:at] + bytes([draw(st.integers(0, 255))]) + raw[at + 1:]
    elif kind == "truncate":
        raw = raw[:draw(st.integers(0, len(raw) - 1))]
    elif kind == "extend":
        raw += draw(st.binary(min_size=1, max_size=64))
    return raw


@FUZZ
@given(raw=safetensors_mutation())
@example(raw=safetensors_bytes({"a": {"dtype": "F32", "shape": [-1, 0], "data_offsets": [0, 0]}},
                               b""))
@example(raw=safetensors_bytes({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                                "b": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}},
                               bytes(16)))
@example(raw=safetensors_bytes({f"t{i}": {"dtype": "F32", "shape": [256],   # 40 overlapping
                                          "data_offsets": [4 * i, 4 * i + 1024]}
                                 for i in range(40)}, bytes(1184)))
@example(raw=struct.pack("<Q", 4000) + b"[" * 4000)
def test_safetensors_headers(tmp_path_factory, raw):
    path = tmp_path_factory.mktemp("st") / "x.safetensors"
    path.write_bytes(raw)
    got = refused_or_loaded(path, read_all)
    if got is not None:
        same_as_reference(path, got)


# ------------------------------------------------------------------------------ torch zip

def torch_file(directory):
    path = directory / "valid.pt"
    torch.save({"w": torch.arange(64, dtype=torch.float32).reshape(8, 8),
                "b": torch.arange(8, dtype=torch.int64), "t": torch.ones(3)}, path)
    return path.read_bytes()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")   # torch on a damaged pickle
@FUZZ
@given(data=st.data())
def test_torch_zip_checkpoints(tmp_path_factory, data):
    directory = tmp_path_factory.mktemp("pt")
    raw = bytearray(torch_file(directory))
    kind = data.draw(st.sampled_from(["bytes", "truncate", "records"]))
    if kind == "truncate":
        raw = raw[:data.draw(st.integers(0, len(raw) - 1))]
    else:
        # "records": the zip's own structures (local and central headers, end record)
        spots = ([i for i in range(len(raw) - 4) if raw[i:i + 2] == b"PK"] if kind == "records"
                 else [0])
        for _ in range(data.draw(st.integers(1, 6))):
            base = data.draw(st.sampled_from(spots))
            at = min(len(raw) - 1, base + data.draw(st.integers(0, 46 if kind == "records"
                                                                else len(raw) - 1)))
            raw[at] = data.draw(st.integers(0, 255))
    path = directory / "x.pt"
    path.write_bytes(bytes(raw))
    got = refused_or_loaded(path, read_all)
    if got is not None:
        # The same tensors torch itself reads (through a memory map, as the package loads:
        # torch's eager reader checks more of a damaged archive, so may refuse it)
        want = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        assert got.keys() == want.keys()
        assert all(torch.equal(got[n], want[n]) for n in got)


# ------------------------------------------------------------------------------ HF index

SHARD_NAMES = st.sampled_from(["model-00001-of-00002.safetensors",
                               "model-00002-of-00002.safetensors", "../x.safetensors",
                               "/etc/passwd", "..", ".", "", "sub/model.safetensors",
                               "model.bin", "missing.safetensors"])


@st.composite
def index_mutation(draw):
    spec = {"metadata": {"total_size": 0}, "weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    kind = draw(st.sampled_from(["shard", "name", "map", "metadata", "spec", "text"]))
    if kind == "shard":
        spec["weight_map"][draw(st.sampled_from(["a", "b"]))] = draw(SHARD_NAMES | JSONISH)
    elif kind == "name":
        spec["weight_map"][draw(st.text(max_size=8))] = draw(SHARD_NAMES)
    elif kind == "map":
        spec["weight_map"] = draw(JSONISH)
    elif kind == "metadata":
        spec["metadata"] = draw(JSONISH)
    elif kind == "spec":
        spec = draw(JSONISH)
    text = json.dumps(spec)
    if kind == "text":
        text = text[:draw(st.integers(0, len(text)))] + draw(st.text(max_size=4))
    return text


@FUZZ
@given(text=index_mutation())
@example(text=json.dumps({"weight_map": {"a": ["model-00001-of-00002.safetensors"]}}))
@example(text=json.dumps({"weight_map": {"a": 3}}))
def test_hf_index_files(tmp_path_factory, text):
    directory = tmp_path_factory.mktemp("hf")
    state = {"a": torch.arange(6.0), "b": torch.arange(4, dtype=torch.int32)}
    save_sharded(state, directory, max_shard_bytes=24)
    index = directory / "model.safetensors.index.json"
    index.write_text(text)
    got = refused_or_loaded(index, read_all)
    if got is not None:
        assert set(got) <= set(state)
        assert all(torch.equal(got[n], state[n]) for n in got)


# ------------------------------------------------------------------------------ IDX

def idx_file(images: np.ndarray) -> bytes:
    return (bytes([0, 0, 0x08, images.ndim]) + np.asarray(images.shape, ">u4").tobytes()
            + images.tobytes())


@FUZZ
@given(data=st.data(), compress=st.booleans())
@example(data=None, compress=True)     # a gzip bomb: 64 MiB of zeros behind a 10-byte shape
@example(data=None, compress=False)    # a shape whose element count overflows 64 bits
def test_idx_files(tmp_path_factory, data, compress):
    path = tmp_path_factory.mktemp("idx") / "train-images-idx3-ubyte"
    images = np.arange(2 * 5 * 3, dtype=np.uint8).reshape(2, 5, 3)
    raw = bytearray(idx_file(images))
    if data is None:
        if compress:
            raw = bytes([0, 0, 8, 1]) + np.asarray([10], ">u4").tobytes() + bytes(64 << 20)
        else:
            raw = bytes([0, 0, 8, 3]) + np.asarray([2**31, 2**31, 4], ">u4").tobytes() + bytes(16)
    else:
        kind = data.draw(st.sampled_from(["header", "truncate", "extend"]))
        if kind == "header":
            for _ in range(data.draw(st.integers(1, 3))):
                raw[data.draw(st.integers(0, 15))] = data.draw(st.integers(0, 255))
        elif kind == "truncate":
            raw = raw[:data.draw(st.integers(0, len(raw) - 1))]
        else:
            raw += data.draw(st.binary(min_size=1, max_size=16))
    written = gzip.compress(bytes(raw), compresslevel=1) if compress else bytes(raw)
    path.write_bytes(written)
    # A valid compressed file holds its content in memory once read: the allowance is the
    # content's size, except for the bomb, which must be refused within its file's size.
    size = len(written) if data is None or not compress else max(len(written), len(raw))
    got = refused_or_loaded(path, read_idx, size=size)
    if got is not None:
        assert got.nbytes == len(raw) - 4 - 4 * raw[3]
        if bytes(raw) == idx_file(images):
            assert np.array_equal(got, images)
