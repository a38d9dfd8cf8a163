"""Two writers into one output at once: each run that succeeds finds its own complete outputs
there; the other is refused with one line naming the directory; nothing is ever mixed."""
import json
import struct

import pytest
import torch
from safetensors.torch import load_file

from know_kernels.fileio import OutputBusyError, output_lock
from know_kernels.io.sinks import OutFile
from know_kernels.pipeline.predict import predict, predict_files

from support.checkpoints import wide_checkpoints
from support.processes import hidden_files, run_know, start_know

pytestmark = pytest.mark.usefixtures("one_thread")
METHODS = ("known", "taskvector")
CHUNK = 128


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return [str(p) for p in wide_checkpoints(tmp_path_factory.mktemp("ck"), width=512)]


def header_method(path) -> str:
    raw = open(path, "rb").read(1 << 16)
    header = json.loads(raw[8:8 + struct.unpack("<Q", raw[:8])[0]])
    return json.loads(header["__metadata__"]["know"])["method"]


def test_two_runs_with_different_methods_into_one_out(inputs, tmp_path):
    """The reported failure: a KNOWN run and a TaskVector run started together into one
    --out.  With one shared temporary name the second exited 0 with the first's weights."""
    out = tmp_path / "out"
    procs = {m: start_know("predict", *inputs, "--out", out, "--method", m, "--steps", 2,
                           "--chunk-rows", CHUNK, "--quiet") for m in METHODS}
    results = {m: (p.wait(timeout=300), p.stdout.read().decode()) for m, p in procs.items()}
    winners = [m for m, (rc, _) in results.items() if rc == 0]
    assert len(winners) == 1, results   # without --force the later one cannot also succeed
    for method, (rc, text) in results.items():
        if rc == 0:
            want = predict(inputs, method=method, steps=2, chunk_rows=CHUNK)
            for k in (1, 2):
                path = out / f"know_step{k}.safetensors"
                assert header_method(path) == method
                got = load_file(str(path))
                assert got.keys() == want[k - 1].keys()
                assert all(torch.equal(got[n], want[k - 1][n]) for n in got), (method, k)
        else:
            assert rc == 2, text
            lines = text.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("know predict: error: "), text
            assert (f"{out}: another know run is writing" in text
                    or "exists; pass --force" in text), text
    assert hidden_files(out) == []


def test_a_held_output_is_refused_before_anything_is_written(inputs, tmp_path):
    out = tmp_path / "out"
    with output_lock(out):
        with pytest.raises(OutputBusyError, match=f"{out}: another know run is writing"):
            predict_files(inputs, out, method="linear", chunk_rows=CHUNK)
        res = run_know("predict", *inputs, "--out", out, "--method", "linear", "--quiet")
        assert res.returncode == 2
        assert res.stderr.strip().splitlines() == [
            f"know predict: error: {out}: another know run is writing into this directory; "
            f"wait for it to finish or choose another output"]
        assert [p.name for p in out.iterdir()] == [".know.lock"]
    assert not out.exists()   # the lock made the directory; nothing else was written there
    predict_files(inputs, out, method="linear", chunk_rows=CHUNK)   # free again
    assert sorted(p.name for p in out.iterdir()) == ["know_step1.safetensors"]


def test_temporary_names_differ_per_writer(tmp_path):
    entries = [("w", torch.float32, (3,))]
    a, b = (OutFile(tmp_path / "x.safetensors", entries) for _ in range(2))
    assert a.tmp != b.tmp and a.tmp.parent == b.tmp.parent == tmp_path
    assert a.tmp.name.startswith(".x.safetensors.") and a.tmp.name.endswith(".partial")
