"""Streaming prediction from files: equal to the in-memory path, in every input layout."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from know_kernels import KNOWN
from know_kernels.io import sinks
from know_kernels.kernels.baselines import extrapolate
from know_kernels.kernels.nowcast import backend_status
from know_kernels.pipeline.predict import predict
from know_kernels.io.load import load_into
from know_kernels.io.sinks import OutFile, save_sharded
from know_kernels.io.sources import open_checkpoint
from know_kernels.pipeline.predict import predict_files

from support.checkpoints import (CHUNK, SIX_SHARDS, THREE_SHARDS, Net, read_output, save_mixed,
                                 trajectory)


def assert_same(got, want):
    assert set(got) == set(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert torch.equal(got[name], want[name]), name


CASES = [("known", "reference"), ("linear", "auto"), ("log", "auto"), ("exp", "auto"),
         ("taskvector", "auto")]
if backend_status("cpu")[0]:
    CASES.append(("known", "cpu"))


@pytest.mark.parametrize("method,backend,first",
                         [(m, b, "safetensors") for m, b in CASES]
                         + [("known", "reference", "pt"), ("linear", "auto", "pt")])
def test_matches_in_memory_predict(tmp_path, method, backend, first):
    paths = save_mixed(trajectory(), tmp_path, first)
    known = KNOWN.init(seed=3)
    kw = dict(steps=2, method=method, backend=backend, chunk_rows=CHUNK)
    want = predict(paths, known, **kw)
    out = predict_files(paths, tmp_path / "out", known, **kw)
    assert out == [tmp_path / "out" / f"know_step{k}.safetensors" for k in (1, 2)]
    for k in range(2):
        assert_same(read_output(out[k]), want[k])
    assert not list((tmp_path / "out").glob(".*"))


def test_chunk_size_does_not_change_batch_invariant_results(tmp_path):
    paths = save_mixed(trajectory(), tmp_path)
    want = predict(paths, method="linear")
    for chunk in (7, 1 << 20):
        out = predict_files(paths, tmp_path / f"c{chunk}", method="linear", chunk_rows=chunk)
        assert_same(read_output(out[0]), want[0])


def test_sharded_in_gives_sharded_out_with_index(tmp_path):
    cks = trajectory()
    # Each snapshot split differently: 3 shards, 6 shards by their index, one file, a .pt,
    # a directory with one file.
    inputs = [save_sharded(cks[0], tmp_path / "ck0", max_shard_bytes=THREE_SHARDS),
              save_sharded(cks[1], tmp_path / "ck1", max_shard_bytes=SIX_SHARDS)
              / "model.safetensors.index.json"]
    save_file(cks[2], str(tmp_path / "ck2.safetensors"))
    torch.save(cks[3], tmp_path / "ck3.pt")
    (tmp_path / "ck4").mkdir()
    save_file(cks[4], str(tmp_path / "ck4" / "model.safetensors"))
    inputs += [tmp_path / "ck2.safetensors", tmp_path / "ck3.pt", tmp_path / "ck4"]

    out = predict_files(inputs, tmp_path / "out", method="linear", steps=2, chunk_rows=CHUNK)
    want = predict(cks, method="linear", steps=2, chunk_rows=CHUNK)
    src_index = json.loads((tmp_path / "ck0" / "model.safetensors.index.json").read_text())
    for k in range(2):
        assert out[k] == tmp_path / "out" / f"know_step{k + 1}"
        shards = sorted(p.name for p in out[k].glob("*.safetensors"))
        assert shards == sorted(set(src_index["weight_map"].values())) and len(shards) == 3
        index = json.loads((out[k] / "model.safetensors.index.json").read_text())
        assert index["weight_map"] == src_index["weight_map"]
        assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size()
                                                      for v in want[k].values())
        assert index["metadata"]["know"]["know_step"] == k + 1
        for shard in shards:
            with safe_open(str(out[k] / shard), framework="pt") as fh:
                assert sorted(fh.keys()) == sorted(n for n, s in src_index["weight_map"].items()
                                                   if s == shard)
                assert fh.metadata()["format"] == "pt"
        assert_same(read_output(out[k]), want[k])


def test_single_file_directory_keeps_its_layout(tmp_path):
    cks = trajectory()
    paths = []
    for i, ck in enumerate(cks):
        (tmp_path / f"d{i}").mkdir()
        save_file(ck, str(tmp_path / f"d{i}" / "model.safetensors"))
        paths.append(tmp_path / f"d{i}")
    out = predict_files(paths, tmp_path / "out", method="taskvector")
    assert sorted(p.name for p in out[0].iterdir()) == ["model.safetensors"]
    assert_same(read_output(out[0]), predict(cks, method="taskvector")[0])


def test_bf16_stays_bf16_and_out_dtype_converts_floats(tmp_path):
    cks = trajectory(dtype=torch.bfloat16)
    paths = save_mixed(cks, tmp_path)
    out = predict_files(paths, tmp_path / "bf16", method="linear", chunk_rows=CHUNK)
    with safe_open(str(out[0]), framework="pt") as fh:
        assert {fh.get_slice(n).get_dtype() for n in fh.keys()} == {"BF16", "I64"}
    assert_same(read_output(out[0]), predict(paths, method="linear")[0])

    out = predict_files(paths, tmp_path / "f32", method="linear", chunk_rows=CHUNK,
                        out_dtype="float32")
    # bf16 -> float32 is exact, so the float32 in-memory run sees the very same rows.
    as_f32 = [{k: v.float() if v.is_floating_point() else v for k, v in ck.items()} for ck in cks]
    assert_same(read_output(out[0]), predict(as_f32, method="linear")[0])
    with pytest.raises(ValueError, match="out_dtype"):
        predict_files(paths, tmp_path / "x", method="linear", out_dtype="int8")


def test_known_bf16_with_float32_output(tmp_path):
    cks = trajectory(dtype=torch.bfloat16)
    paths = save_mixed(cks, tmp_path)
    known = KNOWN.init(seed=4)
    got = read_output(predict_files(paths, tmp_path / "o", known, backend="reference",
                                    out_dtype=torch.float32)[0])
    want = predict(paths, known, backend="reference")[0]
    for name, w in want.items():
        assert got[name].dtype == (torch.float32 if w.is_floating_point() else w.dtype)
        torch.testing.assert_close(got[name].to(w.dtype), w, rtol=1e-2, atol=1e-2)


def test_pt_tensors_are_found_in_the_file(tmp_path):
    """Offsets recovered from the zip records read the same bytes torch.load returns, also for
    shared storages, a wrapped state dict with other records, a transposed tensor (read
    through the memory map) and an empty one."""
    w = torch.randn(7, 11)
    state = {"w": w, "wt": w.t(), "tied": w[2:4], "empty": torch.zeros(0, 3),
             "half": torch.randn(5).half(), "step": torch.tensor(3)}
    torch.save({"state_dict": state, "optimizer": torch.randn(1000)}, tmp_path / "m.pt")
    ck = open_checkpoint(tmp_path / "m.pt")
    try:
        assert list(ck.tensors) == list(state)
        assert ck.tensors["wt"].offset is None
        assert all(ck.tensors[n].offset is not None for n in ("w", "tied", "half", "step"))
        for name, want in state.items():
            ref = ck.tensors[name]
            assert (ref.dtype, ref.shape) == (want.dtype, tuple(want.shape))
            got = torch.full((ref.numel,), 7, dtype=ref.dtype)
            ck.read(name, 0, ref.numel, got)
            assert torch.equal(got, want.reshape(-1)), name
            if ref.numel > 3:
                part = torch.empty(2, dtype=ref.dtype)
                ck.read(name, 1, 3, part)
                assert torch.equal(part, want.reshape(-1)[1:3]), name
    finally:
        ck.close()


def test_missing_shard_is_named(tmp_path):
    cks = trajectory()
    d = save_sharded(cks[1], tmp_path / "ck1", max_shard_bytes=SIX_SHARDS)
    (d / "model-00002-of-00006.safetensors").unlink()
    paths = [tmp_path / "ck0.safetensors", d] + save_mixed(cks, tmp_path)[2:]
    save_file(cks[0], str(paths[0]))
    with pytest.raises(FileNotFoundError,
                       match=r"shard model-00002-of-00006.safetensors listed in .*ck1/model"
                             r"\.safetensors\.index\.json is missing"):
        predict_files(paths, tmp_path / "out", method="linear")
    assert not (tmp_path / "out").exists()


def test_index_pointing_at_the_wrong_shard_is_named(tmp_path):
    d = save_sharded(trajectory()[0], tmp_path / "ck", max_shard_bytes=THREE_SHARDS)
    index = d / "model.safetensors.index.json"
    spec = json.loads(index.read_text())
    spec["weight_map"]["conv.weight"] = "model-00002-of-00003.safetensors"
    index.write_text(json.dumps(spec))
    with pytest.raises(ValueError, match=r"maps \['conv.weight'\] to model-00002-of-00003"):
        open_checkpoint(d)
    index.write_text("{}")
    with pytest.raises(ValueError, match="not a sharded-checkpoint index"):
        open_checkpoint(index)


@pytest.mark.parametrize("change,pattern", [
    (lambda v: v.double(), r"parameter 'fc1.weight': .*theta0.safetensors has \(37, 53\) "
                           r"torch.float32 but .*theta2.safetensors has \(37, 53\) torch.float64"),
    (lambda v: v[:, :50].contiguous(), r"parameter 'fc1.weight': .*theta0.* but .*theta2.*\(37, 50\)"),
])
def test_mismatched_snapshots_are_named(tmp_path, change, pattern):
    cks = trajectory()
    cks[2]["fc1.weight"] = change(cks[2]["fc1.weight"])
    paths = save_mixed(cks, tmp_path)
    with pytest.raises(ValueError, match=pattern):
        predict_files(paths, tmp_path / "out", method="linear")


def test_unreadable_safetensors_are_named(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x05\x00")
    with pytest.raises(ValueError, match="bad.safetensors: not a readable safetensors file"):
        open_checkpoint(bad)
    bad.write_bytes((1 << 40).to_bytes(8, "little") + b"{}")
    with pytest.raises(ValueError, match="header length"):
        open_checkpoint(bad)
    save_file({"x": torch.zeros(100)}, str(bad))
    bad.write_bytes(bad.read_bytes()[:-8])  # truncated data
    with pytest.raises(ValueError, match="do not fit"):
        open_checkpoint(bad)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        open_checkpoint(tmp_path / "nope.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="expected one \\*.safetensors.index.json"):
        open_checkpoint(tmp_path / "empty")
    (tmp_path / "w.npz").write_bytes(b"")
    with pytest.raises(ValueError, match="unsupported checkpoint type '.npz'"):
        open_checkpoint(tmp_path / "w.npz")


def test_nonfinite_rows(tmp_path):
    cks = trajectory()
    cks[3]["fc1.weight"][5, 7] = float("nan")
    for ck in cks:  # finite, but their sum overflows: must not be taken for Inf
        ck["fc2.bias"][:2] = 3e38
    paths = save_mixed(cks, tmp_path)
    with pytest.raises(ValueError, match=r"'fc1.weight' holds NaN or Inf in .*theta3.pt"):
        predict_files(paths, tmp_path / "out", method="linear", chunk_rows=CHUNK)
    assert not (tmp_path / "out").exists()  # a refused run leaves nothing behind
    cks[3]["fc1.weight"][5, 7] = 0
    out = predict_files(save_mixed(cks, tmp_path), tmp_path / "finite", method="linear")
    assert_same(read_output(out[0]), predict(cks, method="linear")[0])
    out = predict_files(paths, tmp_path / "out", method="linear", chunk_rows=CHUNK,
                        nonfinite="passthrough")
    assert_same(read_output(out[0]), predict(paths, method="linear", chunk_rows=CHUNK,
                                             nonfinite="passthrough")[0])


def test_crash_mid_write_leaves_nothing_and_a_rerun_completes(tmp_path, monkeypatch):
    cks = trajectory()
    paths = [save_sharded(cks[0], tmp_path / "ck0", max_shard_bytes=THREE_SHARDS)]
    paths += save_mixed(cks, tmp_path)[1:]
    out_dir = tmp_path / "out"
    real_write, calls = OutFile.write, []

    def failing_write(self, name, start, data):
        calls.append(name)
        if len(calls) > 5:
            raise OSError(28, "No space left on device")
        real_write(self, name, start, data)

    monkeypatch.setattr(OutFile, "write", failing_write)
    with pytest.raises(OSError, match="No space left"):
        predict_files(paths, out_dir, method="linear", steps=2, chunk_rows=CHUNK)
    assert list(out_dir.rglob("*")) == []
    monkeypatch.setattr(OutFile, "write", real_write)

    # A killed run leaves its temporary files behind; the next run reuses and completes them.
    stale = out_dir / "know_step1" / ".model-00001-of-00003.safetensors.partial"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"\xff" * 100000)
    out = predict_files(paths, out_dir, method="linear", steps=2, chunk_rows=CHUNK)
    want = predict(cks, method="linear", steps=2, chunk_rows=CHUNK)
    for k in range(2):
        assert_same(read_output(out[k]), want[k])
    assert not list(out_dir.rglob(".*"))


def test_outputs_and_inputs_are_protected(tmp_path):
    cks = trajectory()
    paths = [save_sharded(cks[0], tmp_path / "ck0", max_shard_bytes=THREE_SHARDS)]
    paths += save_mixed(cks, tmp_path)[1:]
    out = predict_files(paths, tmp_path / "out", method="linear")
    before = (out[0] / "model-00001-of-00003.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="model-00001-of-00003.safetensors exists; pass --force"):
        predict_files(paths, tmp_path / "out", method="log")
    assert (out[0] / "model-00001-of-00003.safetensors").read_bytes() == before
    predict_files(paths, tmp_path / "out", method="log", force=True)
    assert (out[0] / "model-00001-of-00003.safetensors").read_bytes() != before
    # The previous prediction as an input of a run writing to the same place.
    with pytest.raises(ValueError, match="would overwrite an input"):
        predict_files([paths[0], out[0]] + paths[2:], tmp_path / "out", method="linear",
                      force=True)


def test_empty_and_odd_tensors_round_trip_through_outfile(tmp_path):
    tensors = {"a": torch.randn(3, 5).bfloat16(), "b": torch.zeros(0, 4), "c": torch.arange(7),
               "d": torch.tensor(2.5, dtype=torch.float64), "e": torch.tensor([True, False, True])}
    out = OutFile(tmp_path / "x.safetensors",
                  [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()], {"k": "v"})
    out.create()
    out.open()
    for name, t in tensors.items():
        flat = t.reshape(-1)
        out.write(name, 0, flat[:2].contiguous())
        out.write(name, 2, flat[2:].contiguous())
    out.close()
    out.commit()
    assert_same(load_file(str(tmp_path / "x.safetensors")), tensors)
    with safe_open(str(tmp_path / "x.safetensors"), framework="pt") as fh:
        assert fh.metadata() == {"k": "v"}
    assert out.written == sum(t.numel() * t.element_size() for t in tensors.values())


def test_load_into(tmp_path):
    paths = save_mixed(trajectory(), tmp_path)
    out = predict_files(paths, tmp_path / "out", method="linear")[0]
    net = Net()
    assert load_into(net, out) == ([], [])
    assert_same(net.state_dict(), read_output(out))

    half = Net().to(torch.bfloat16)
    load_into(half, out, chunk_bytes=64)  # chunks smaller than a parameter
    assert_same(half.state_dict(), {k: v.to(torch.bfloat16) if v.is_floating_point() else v
                                    for k, v in read_output(out).items()})

    class Other(Net):
        def __init__(self):
            super().__init__()
            self.fc2 = nn.Linear(37, 11)
            self.extra = nn.Linear(2, 2)
            del self.conv

    with pytest.raises(ValueError) as err:
        load_into(Other(), out)
    message = str(err.value)
    assert "shape mismatch: fc2.weight (module (11, 37), file (10, 37))" in message
    assert "missing from the file: extra.weight, extra.bias" in message
    assert "not in the module: conv.bias, conv.weight" in message  # the file's order
    with pytest.raises(ValueError, match="shape mismatch"):
        load_into(Other(), out, strict=False)

    class Partial(Net):
        def __init__(self):
            super().__init__()
            self.extra = nn.Linear(2, 2)
            del self.conv

    result = load_into(Partial(), out, strict=False)
    assert result.missing_keys == ["extra.weight", "extra.bias"]
    assert result.unexpected_keys == ["conv.bias", "conv.weight"]


MEMORY_SCRIPT = r"""
import sys
from know_kernels import predict_files

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

small, big, out = sys.argv[1:6], sys.argv[6:11], sys.argv[11]
kw = dict(method="taskvector", chunk_rows=1 << 15)
predict_files(small, out + "/warm", **kw)  # first-use costs: imports, thread arenas
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")  # reset the peak (VmHWM) to the current resident set
before = status("VmRSS")
predict_files(big, out + "/run", **kw)
print(status("VmHWM") - before)
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_peak_memory_does_not_grow_with_the_model(tmp_path):
    """A 5 x 64 MB trajectory predicted in 32K-row chunks: the resident set grows by much
    less than one snapshot (loading them would take 5 snapshots plus the output)."""
    torch.manual_seed(0)
    base = {f"layer{i}.weight": torch.randn(2048, 2048) for i in range(4)}
    snapshot = sum(v.numel() * 4 for v in base.values())
    paths = []
    for s in range(5):
        ck = {k: v + 0.01 * s for k, v in base.items()}
        if s == 0:
            paths.append(save_sharded(ck, tmp_path / "ck0", max_shard_bytes=snapshot // 2))
        elif s == 1:
            torch.save(ck, tmp_path / "ck1.pt")
            paths.append(tmp_path / "ck1.pt")
        else:
            save_file(ck, str(tmp_path / f"ck{s}.safetensors"))
            paths.append(tmp_path / f"ck{s}.safetensors")
    last = base["layer3.weight"]
    del base, ck
    small = save_mixed(trajectory(), tmp_path)
    res = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, *map(str, small + paths),
                          str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    growth = int(res.stdout.split()[-1])
    assert growth < snapshot / 3, f"peak RSS grew by {growth / 2**20:.1f} MiB"
    rows = torch.stack([(last + 0.01 * s).reshape(-1) for s in reversed(range(5))], dim=1)
    got = read_output(tmp_path / "run" / "know_step1")["layer3.weight"].reshape(-1)
    assert torch.equal(got, extrapolate(rows, "taskvector"))


def test_progress_reports_rows(tmp_path):
    paths = save_mixed(trajectory(), tmp_path)
    seen = []
    predict_files(paths, tmp_path / "out", method="linear", chunk_rows=CHUNK,
                  progress=lambda done, total: seen.append((done, total)))
    total = 8 * 3 * 9 + 8 + 37 * 53 + 37 + 10 * 37 + 10
    assert seen[-1] == (total, total)
    assert all(b > a for (a, _), (b, _) in zip(seen, seen[1:]))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_cuda_device_without_cuda_is_refused(tmp_path):
    paths = save_mixed(trajectory(), tmp_path)
    with pytest.raises(RuntimeError, match="'cuda' requested but CUDA is not available"):
        predict_files(paths, tmp_path / "out", method="linear", device="cuda")


def test_plan_shards_and_save_sharded(tmp_path):
    sizes = {"a": 6, "b": 4, "c": 25, "d": 1, "e": 9}
    assert list(sinks.plan_shards(sizes, 10).values()) == [["a", "b"], ["c"], ["d", "e"]]
    assert list(sinks.plan_shards(sizes, 10)) == [
        f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert list(sinks.plan_shards(sizes, 100).values()) == [list(sizes)]
    with pytest.raises(ValueError, match="max_shard_bytes"):
        sinks.plan_shards(sizes, 0)
    state = trajectory()[0]
    d = save_sharded(state, tmp_path / "ck", max_shard_bytes=THREE_SHARDS)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size()
                                                  for t in state.values())
    assert list(index["weight_map"]) == sorted(state)
    assert_same(read_output(d), state)
