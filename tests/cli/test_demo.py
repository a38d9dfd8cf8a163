"""``know demo --quick`` end to end: CI's smoke test of the whole pipeline.

Fashion-MNIST comes from Debian's dataset-fashion-mnist package when it is installed
(/usr/share/datasets/fashion-mnist); where it is not (CI may lack it), the test writes small
Fashion-MNIST-format IDX files of random images itself and passes --data-dir, so the
numbers are then meaningless but every stage still runs (the ``data_args`` fixture,
tests/conftest.py).  The shipped KNOWN weights are replaced by an untrained KNOWN saved
there (``known_path``, --known), except in the one test of the default.
"""
import json
import math
import re

import pytest
import torch

from know_kernels import KNOWN
from know_kernels.research import data
from know_kernels.cli import main
from know_kernels.fileio import output_lock
from know_kernels.research.controls import noise_method
from know_kernels.research.lincomb import LinComb
from know_kernels.research.transfer import MORE_DATA, NAIVE, PAPER_ORDER
from know_kernels.research.verdict import verdict as recompute_verdict

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, data_args, known_path):
    out = tmp_path_factory.mktemp("demo") / "out"
    rc = main(["demo", "--quick", "--quiet", "--out", str(out), "--known", known_path,
               *data_args])
    return rc, out


def _check_values(name, row, field, lo, hi):
    for values in row[field]:
        assert all(math.isfinite(v) and lo <= v <= hi for v in values), (name, row)


def test_quick_demo_writes_its_results(quick_run):
    rc, out = quick_run
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "results.md",
                                                     "results.png"]  # no temporary left
    results = json.loads((out / "results.json").read_text())
    assert {"format", "config", "known", "source", "tasks", "replicates", "timing", "machine",
            "verdict"} <= set(results)
    config = results["config"]
    assert config["r"] == 0.5 and config["stages"] == 5 and config["replicates"] == 2
    replicates = results["replicates"]
    assert [rep["replicate"] for rep in replicates] == [0, 1]
    assert len({rep["seed"] for rep in replicates}) == 2              # independent draws
    size = results["source"]["subset_sizes"][0]
    for rep in replicates:
        assert len(rep["source"]["test_acc"]) == 5
        # Θ^0 and the real-data ladder: one recipe, each with its convergence check.
        assert [m["images"] for m in rep["source"]["more_data"]] == [size // 2, 2 * size,
                                                                     4 * size]
        for record in (rep["source"]["pretrain"], *rep["source"]["more_data"]):
            assert isinstance(record["converged"], bool) and record["epochs"] >= 4
    seeds = [tuple(rep["tasks"]["digits"]["seeds"]) for rep in replicates]
    assert len(set(seeds)) == 2 and all(len(s) == 3 for s in seeds)
    assert set(results["tasks"]) == {"source", "digits", "fashion-heldout"}
    expected = {NAIVE: ["×1", "×0.5"], MORE_DATA: ["×0.5", "×2", "×4"],
                **{m: ["×2", "×4", "×8"] for m in PAPER_ORDER},
                **{noise_method(m): ["×2", "×4", "×8"] for m in PAPER_ORDER}}
    for name, task in results["tasks"].items():
        labels = {}
        for row in task["rows"]:
            labels.setdefault(row["method"], []).append(row["label"])
            assert len(row["acc"]) == 2                                # per replicate
            assert [len(v) for v in row["acc"]] == [1 if name == "source" else 3] * 2
            _check_values(name, row, "acc", 0.0, 100.0)
            _check_values(name, row, "diff", -100.0, 100.0)
            assert math.isfinite(row["diff_mean"]) and row["diff_se"] >= 0
        assert labels == expected
        naive = task["rows"][0]
        assert naive["diff_mean"] == 0.0 and naive["diff_se"] == 0.0
        if name == "source":
            assert "ce" in naive and naive["ce_mean"] > 0
        else:
            assert task["protocol"] == "linear-probe"
    verdict = results["verdict"]
    assert set(verdict["ladder"]) == {"source", "digits", "fashion-heldout"}
    assert verdict["text"].startswith("Ladder check")
    assert verdict == recompute_verdict(results)
    md = (out / "results.md").read_text()
    assert md.startswith("# KNOW demo\n\n**Verdict.** " + verdict["text"])
    assert "| method | ×n | accuracy (%) | cross-entropy |" in md
    assert "| Matched noise (KNOWN) | ×2 |" in md and "| Θ^1 (forgotten) | ×0.5 |" in md
    for name in ("Naive transfer", "More data (real)", "KNOWN", "TaskVector", "LinearFit",
                 "LogFit", "ExpFit"):
        assert f"| {name} | ×" in md
    assert (out / "results.png").read_bytes()[:8] == PNG_MAGIC


SMALL = ["--quick", "--quiet", "--replicates", "2", "--seeds", "2", "--tasks", "digits",
         "--methods", "known,taskvector", "--s-ablation"]


def test_the_numbers_do_not_depend_on_the_worker_count(tmp_path, data_args):
    """Each replicate is seeded by the configuration alone: one worker or two, the same
    results.json but for times and load.  Without --known the shipped KNOWN predicts,
    --s-ablation adds the shipped S = 3 and 4 heads and --lincomb the lincomb rival (here
    linear extrapolation on the fc head), judged as a baseline."""
    lincomb = LinComb(5, heads=("fc",))
    with torch.no_grad():
        lincomb.coef["fc"].copy_(torch.tensor([0.0, 0.0, 0.0, -1.0, 2.0]))
    lincomb.save(tmp_path / "lc.safetensors")
    runs = []
    for jobs in ("1", "2"):
        out = tmp_path / f"jobs{jobs}"
        assert main(["demo", *SMALL, "--jobs", jobs, "--out", str(out), "--lincomb",
                     str(tmp_path / "lc.safetensors"), *data_args]) == 0
        runs.append(json.loads((out / "results.json").read_text()))
    for run in runs:
        for key in ("timing", "machine"):
            run.pop(key)
        for rep in run["replicates"]:
            rep.pop("timing")
            rep["source"].pop("stage_seconds")
    assert runs[0] == runs[1]
    results = runs[0]
    assert results["known"]["source"] == "KNOWN.pretrained()"
    assert results["known"]["provenance"] == KNOWN.pretrained().provenance
    methods = [(row["method"], row["label"]) for row in results["tasks"]["digits"]["rows"]]
    assert methods[:5] == [(NAIVE, "×1"), (NAIVE, "×0.5"), (MORE_DATA, "×0.5"),
                           (MORE_DATA, "×2"), (MORE_DATA, "×4")]
    predicted = [(m, f"×{f}") for m in ("known", "taskvector", "known-S3", "known-S4",
                                        "lincomb") for f in (2, 4, 8)]
    assert methods[5:] == predicted + [(noise_method(m), f) for m, f in predicted]
    assert results["lincomb"]["coefficients"] == {"fc": [0.0, 0.0, 0.0, -1.0, 2.0]}
    assert any(r["method"] == "lincomb" for r in results["verdict"]["tasks"]["digits"]["rows"])


@pytest.mark.parametrize("args, message", [
    (["--seeds", "0"], "--seeds must be >= 2"),
    (["--seeds", "1"], "--seeds must be >= 2"),
    (["--methods", "known,foo"], "unknown method.*'foo'.*known, taskvector, linear, log, exp"),
    (["--tasks", "cifar10"], "tasks: unknown.*'cifar10'"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--jobs", "0"], "--jobs must be >= 1"),
    (["--replicates", "1"], "--replicates must be >= 2"),
    (["--s-ablation", "--methods", "exp"], "the S ablation needs the KNOWN method"),
    (["--lincomb", "/nowhere/lc.safetensors"], "lincomb file not found: /nowhere/lc"),
])
def test_bad_options_are_refused_before_any_work(args, message, tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()


def test_a_lincomb_reading_more_snapshots_than_the_stages_is_refused(tmp_path, capsys):
    LinComb(6).save(tmp_path / "lc6.safetensors")
    assert main(["demo", "--quick", "--out", str(tmp_path / "out"), "--lincomb",
                 str(tmp_path / "lc6.safetensors")]) == 2
    assert "reads S=6 snapshots, more than the demo's 5 stages" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_second_demo_into_a_busy_output_is_refused(tmp_path, data_args, known_path, capsys):
    out = tmp_path / "out"
    with output_lock(out):
        assert main(["demo", "--quick", "--quiet", "--out", str(out), "--known", known_path,
                     *data_args]) == 2
        assert sorted(p.name for p in out.iterdir()) == [".know.lock"]
    err = capsys.readouterr().err
    assert str(out) in err and "another know run is writing" in err


def test_missing_fashion_mnist_says_how_to_install_it(tmp_path, monkeypatch, known_path, capsys):
    monkeypatch.setattr(data, "DEBIAN_DIRS", {"fashion-mnist": tmp_path / "nowhere"})
    assert main(["demo", "--quick", "--quiet", "--out", str(tmp_path / "out"),
                 "--known", known_path, "--data-dir", str(tmp_path)]) == 2
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().err


def test_known_with_other_snapshot_count_is_refused(tmp_path, data_args, capsys):
    path = tmp_path / "known7.safetensors"
    KNOWN.init(S=7).save(path)
    assert main(["demo", "--quick", "--quiet", "--out", str(tmp_path / "out"),
                 "--known", str(path), *data_args]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "S=7" in err
    assert not (tmp_path / "out").exists()
