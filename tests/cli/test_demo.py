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

from know_kernels import KNOWN
from know_kernels.research import data
from know_kernels.cli import main
from know_kernels.research.transfer import MORE_DATA, NAIVE, PAPER_ORDER
from know_kernels.research.verdict import task_verdict

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, data_args, known_path):
    out = tmp_path_factory.mktemp("demo") / "out"
    rc = main(["demo", "--quick", "--quiet", "--out", str(out), "--known", known_path,
               *data_args])
    return rc, out


def test_quick_demo_writes_its_results(quick_run, capsys):
    rc, out = quick_run
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "results.md",
                                                     "results.png"]  # no temporary left
    results = json.loads((out / "results.json").read_text())
    assert {"format", "config", "known", "source", "tasks", "timing", "machine"} <= set(results)
    assert results["config"]["r"] == 0.5 and results["config"]["stages"] == 5
    assert len(results["source"]["test_acc"]) == 5
    source = results["source"]
    assert source["forgot"] == (source["test_acc"][-1] < source["test_acc"][0])
    # Θ^0 and the more-data models: one recipe, each with its convergence check recorded.
    size = source["subset_sizes"][0]
    assert [m["images"] for m in source["more_data"]] == [2 * size, 4 * size]
    for record in (source["pretrain"], *source["more_data"]):
        assert isinstance(record["converged"], bool) and record["epochs"] >= 4
        assert len(record["val_acc"]) == record["epochs"]
    assert results["config"]["protocol_name"] == "linear-probe"
    assert set(results["tasks"]) == {"digits", "fashion-heldout"}
    for name, task in results["tasks"].items():
        assert task["seeds"] == [0, 1, 2, 3, 4] and task["protocol"] == "linear-probe"
        labels = {}
        for row in task["rows"]:
            labels.setdefault(row["method"], []).append(row["label"])
            assert len(row["acc"]) == len(row["diff"]) == 5
            for value in (*row["acc"], row["acc_mean"], row["acc_std"]):
                assert math.isfinite(value) and 0.0 <= value <= 100.0, (name, row)
            for value in (*row["diff"], row["diff_mean"], row["diff_se"]):
                assert math.isfinite(value) and abs(value) <= 100.0, (name, row)
        assert labels == {NAIVE: ["×1", "×0.5"], MORE_DATA: ["×2", "×4"],
                          **{m: ["×2", "×4", "×8"] for m in PAPER_ORDER}}
        assert [r["factor"] for r in task["rows"] if r["method"] == MORE_DATA] == [2.0, 4.0]
        naive = task["rows"][0]
        assert naive["diff"] == [0.0] * 5 and naive["diff_se"] == 0.0
        assert results["verdict"]["tasks"][name] == task_verdict(task)
    md = (out / "results.md").read_text()
    assert md.startswith("# KNOW demo\n\n**Verdict.** " + results["verdict"]["text"])
    assert "| method | ×n | accuracy (%) | Δ vs Naive transfer ×1 (points) |" in md
    for name in ("Naive transfer", "More data (real)", "KNOWN", "TaskVector", "LinearFit",
                 "LogFit", "ExpFit"):
        assert f"| {name} | ×" in md
    assert (out / "results.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("args, message", [
    (["--seeds", "0"], "--seeds must be >= 2"),
    (["--seeds", "1"], "--seeds must be >= 2"),
    (["--methods", "known,foo"], "unknown method.*'foo'.*known, taskvector, linear, log, exp"),
    (["--tasks", "cifar10"], "tasks: unknown.*'cifar10'"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--s-ablation", "--methods", "exp"], "the S ablation needs the KNOWN method"),
])
def test_bad_options_are_refused_before_any_work(args, message, tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()


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


def test_quick_demo_uses_the_shipped_known_by_default(tmp_path, data_args):
    """Without --known the demo predicts with KNOWN.pretrained(); --s-ablation adds the
    shipped S = 3 and 4 heads (digits and KNOWN only, to keep the test short)."""
    out = tmp_path / "out"
    assert main(["demo", "--quick", "--quiet", "--out", str(out), "--tasks", "digits",
                 "--methods", "known", "--s-ablation", *data_args]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["known"]["source"] == "KNOWN.pretrained()"
    assert results["known"]["provenance"] == KNOWN.pretrained().provenance
    assert [(row["method"], row["label"]) for row in results["tasks"]["digits"]["rows"]] == [
        (NAIVE, "×1"), (NAIVE, "×0.5"), (MORE_DATA, "×2"), (MORE_DATA, "×4"),
        *[(m, f"×{f}") for m in ("known", "known-S3", "known-S4") for f in (2, 4, 8)]]
