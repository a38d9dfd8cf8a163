"""SIGKILL at seeded moments: after every kill no file under a final name is incomplete and
the inputs are unchanged; the same command is started again (for meta-train: with --resume
when a checkpoint was left), killed again at the next moment, and so on, and the last run
finishes with the outputs of an uninterrupted run.  Each kill waits until the command has
begun writing, then a seeded delay in its own part of the measured writing time.

The demo has no resumption: one early kill, checked; its rerun (a fresh run, as
tests/cli/test_demo.py makes) only with KNOW_SLOW_TESTS=1."""
import json
import os
import time

import pytest
import torch
from safetensors.torch import load_file

from know_kernels import KNOWN
from know_kernels.cli import main
from know_kernels.pipeline.predict import predict_files
from know_kernels.research.metatrain import MetaTrainConfig, load_state, meta_train

from support.checkpoints import wide_checkpoints
from support.processes import (digests, final_files, hidden_files, kill_after, kill_moments,
                               run_know, start_know, writing_into)
from support.stores import synthetic_store

pytestmark = pytest.mark.usefixtures("one_thread")
CHUNK = 128


def test_predict(tmp_path):
    (tmp_path / "ck").mkdir()
    inputs = [str(p) for p in wide_checkpoints(tmp_path / "ck")]
    ck_before = digests(tmp_path / "ck")
    started = time.perf_counter()
    predict_files(inputs, tmp_path / "ref", steps=2, chunk_rows=CHUNK)
    window = time.perf_counter() - started + 0.5   # the writing, then fsync, rename and exit
    want = digests(tmp_path / "ref")
    out = tmp_path / "out"
    args = ("predict", *inputs, "--out", out, "--steps", 2, "--chunk-rows", CHUNK, "--force",
            "--quiet")
    killed = []
    for delay in kill_moments(0, 3, window):
        proc = start_know(*args)
        killed.append(kill_after(proc, lambda: writing_into(proc, out), delay))
        for path in final_files(out):   # whatever has its final name is the whole output
            assert digests(out)[str(path.relative_to(out))] == want[path.name], path
        assert digests(tmp_path / "ck") == ck_before
    assert killed[0], "the first kill must land while the command writes"
    res = run_know(*args)
    assert res.returncode == 0, res.stderr
    assert digests(out) == want and hidden_files(out) == []   # stale temporaries swept


def collect_args(out):
    return ("collect", "--out", out, "--preset", "quick", "--runs", 2, "--archs", "mlp",
            "--quiet")


def check_store(store):
    """Every final-named file of a meta-dataset is complete; the finished runs' files."""
    index = json.loads((store / "index.json").read_text())
    assert index["format"] == "know-kernels/meta-dataset/1"
    for path in final_files(store):
        if path.suffix == ".safetensors":
            assert load_file(str(path))
        else:
            json.loads(path.read_text())
    return {r: digests(store)[e["file"]] for r, e in index["runs"].items() if e["status"] == "ok"}


def test_collect_with_two_jobs(tmp_path):
    started = time.perf_counter()
    assert main([*map(str, collect_args(tmp_path / "ref")), "--jobs", "1"]) == 0
    # After the index is written, two workers start (seconds) and train a run each.
    window = 6.0 + time.perf_counter() - started
    ref = tmp_path / "ref"
    want = json.loads((ref / "index.json").read_text())["runs"]
    out = tmp_path / "store"
    args = (*collect_args(out), "--jobs", 2)
    finished = {}
    for delay in kill_moments(1, 2, window):
        kill_after(start_know(*args), lambda: (out / "index.json").is_file(), delay)
        now = check_store(out)
        assert {r: d for r, d in now.items() if r in finished} == finished, \
            "a run finished before a kill was trained again"
        finished = now
    res = run_know(*args)
    assert res.returncode == 0, res.stdout + res.stderr
    assert {r: d for r, d in check_store(out).items() if r in finished} == finished
    got = json.loads((out / "index.json").read_text())["runs"]
    assert got.keys() == want.keys()
    for run_id, entry in want.items():
        assert got[run_id]["status"] == "ok" and got[run_id]["rows"] == entry["rows"]
        assert got[run_id]["meta"]["test_acc"] == entry["meta"]["test_acc"]
        a, b = load_file(str(ref / entry["file"])), load_file(str(out / entry["file"]))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), run_id
    assert hidden_files(out) == []
    # Once more: every run is there, so nothing is trained or rewritten.
    before = digests(out)
    assert main([*map(str, collect_args(out)), "--jobs", "1"]) == 0
    assert digests(out) == before


META = {"epochs": 2, "batch_size": 64, "checkpoint_every": 5}


def test_meta_train_resumes(tmp_path):
    store = tmp_path / "store"
    synthetic_store(store, runs=4, rows=600)
    store_before = digests(store)
    started = time.perf_counter()
    want, _ = meta_train(synthetic_store(tmp_path / "ref_store", runs=4, rows=600),
                         MetaTrainConfig(**META))
    window = 0.5 + time.perf_counter() - started   # then validation and the writes
    out = tmp_path / "known.safetensors"
    ckpt = out.with_name(out.name + ".ckpt")
    args = ("meta-train", store, "--out", out, "--epochs", META["epochs"],
            "--batch-size", META["batch_size"], "--checkpoint-every", META["checkpoint_every"])
    resume = lambda: ["--resume"] if ckpt.exists() else []
    finished = lambda: out.exists() and not ckpt.exists()   # the checkpoint goes last
    def done_heads():
        return list(load_state(ckpt).done) if ckpt.exists() else []

    def trained(text):   # the heads a run trained (each gets a progress bar)
        return {h for h in ("conv", "fc", "bias") if f"meta-train {h}" in text}

    for i, delay in enumerate(kill_moments(2, 2, window)):
        if finished():   # it ended before its kill: run again, it would refuse to overwrite
            break
        log, before = tmp_path / f"log{i}", done_heads()
        kill_after(start_know(*args, *resume(), log=log), lambda: log.stat().st_size > 0, delay)
        assert not trained(log.read_text(errors="replace")) & set(before), "not resumed"
        if out.exists():
            KNOWN.load(out)
        if ckpt.exists():
            load_state(ckpt)
        if out.with_name(out.name + ".validation.json").exists():
            json.loads(out.with_name(out.name + ".validation.json").read_text())
        assert digests(store) == store_before
    if not finished():
        before = done_heads()
        res = run_know(*args, *resume())
        assert res.returncode == 0, res.stdout + res.stderr
        assert not trained(res.stderr) & set(before), "not resumed"
    got = KNOWN.load(out)
    for head in want:
        for name, value in want[head].state_dict().items():
            assert torch.equal(got[head].state_dict()[name], value), (head, name)
    assert not ckpt.exists() and [p.name for p in hidden_files(tmp_path)] == []


def test_demo_killed_early(tmp_path, data_args, known_path):
    """One kill of a small --quick demo in its first seconds (then, opt-in, a full rerun)."""
    known_before = open(known_path, "rb").read()
    out = tmp_path / "demo"
    args = ("demo", "--quick", "--tasks", "digits", "--methods", "known,taskvector",
            "--seeds", 2, "--out", out, "--known", known_path, *data_args)
    log = tmp_path / "log"
    (delay,) = kill_moments(3, 1, 4.0)
    kill_after(start_know(*args, log=log), lambda: b"[1/5]" in log.read_bytes(), delay)

    def check_results():
        names = sorted(p.name for p in final_files(out)) if out.exists() else []
        assert set(names) <= {"results.json", "results.md", "results.png"}
        if "results.json" in names:
            json.loads((out / "results.json").read_text())
        if "results.png" in names:
            assert (out / "results.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
        return names

    check_results()
    assert open(known_path, "rb").read() == known_before
    if os.environ.get("KNOW_SLOW_TESTS") != "1":
        return   # the rerun is a fresh --quick run (30 s): tests/cli/test_demo.py runs one
    res = run_know(*args)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert check_results() == ["results.json", "results.md", "results.png"]
    assert json.loads((out / "results.json").read_text())["tasks"].keys() == {"digits"}
