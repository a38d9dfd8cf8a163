"""``know collect``: the quick preset end to end (scikit-learn digits only), resuming,
determinism, failed runs, interruption, the report, the .mat import and bad options."""
import argparse
import json

import h5py
from dataclasses import replace

import numpy as np
import pytest
import safetensors.torch
import torch
from safetensors.torch import load_file

from know_kernels.research import collection_plan, zoo
from know_kernels.cli import collect
from know_kernels.research.forgetting import subset_sizes
from know_kernels.research.training import Convergence


def know(*argv):
    parser = argparse.ArgumentParser(prog="know")
    collect.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["collect", *map(str, argv)])
    return args.func(args)


def index(root):
    return json.loads((root / "index.json").read_text())["runs"]


def test_quick_preset_resume_and_report(tmp_path, capsys):
    out = tmp_path / "meta"
    assert know("--out", out, "--runs", 2, "--preset", "quick", "--quiet") == 0
    runs = index(out)
    assert list(runs) == ["run_0000", "run_0001"]
    for run_id, entry in runs.items():
        assert entry["status"] == "ok"
        meta = json.loads((out / f"{run_id}.json").read_text())
        assert 0.3 <= meta["r"] <= 0.9 and 1e-5 <= meta["lr"] <= 4e-3
        assert meta["subset_sizes"] == subset_sizes(meta["subset_sizes"][0], meta["r"], 7)
        assert meta["batch_size"] <= meta["subset_sizes"][-1]
        assert len(meta["test_acc"]) == 7 and all(0 <= a <= 1 for a in meta["test_acc"])
        assert meta["dataset"] == "digits"
        # The regime: Θ^0 checked for convergence on held-out images, a fixed stage budget.
        assert meta["pretrain"]["converged"] is Convergence().holds(meta["pretrain"]["val_acc"])
        assert len(meta["pretrain"]["val_acc"]) == meta["pretrain"]["epochs"] >= 4
        assert meta["val_size"] == 200 and meta["stage_budget_samples"] == 400
        assert all(meta[k] == v for k, v in entry["meta"].items())
        tensors = load_file(str(out / entry["file"]))
        assert sum(tensors[h].shape[0] for h in ("conv", "fc", "bias") if h in tensors) == \
            sum(entry["rows"].values())
        assert tensors["fc"].shape[1] == 7 and tensors["subset.depth"].max() == 6

    first = (out / "run_0000.safetensors").stat().st_mtime_ns
    assert know("--out", out, "--runs", 3, "--preset", "quick", "--quiet") == 0
    assert list(index(out)) == ["run_0000", "run_0001", "run_0002"]
    assert (out / "run_0000.safetensors").stat().st_mtime_ns == first  # skipped, not redone

    capsys.readouterr()
    assert know("--report", out) == 0
    report = capsys.readouterr().out
    assert "accuracy fell from stage 0 to the last stage in" in report and "of 3 runs" in report
    assert "Θ^0 met the convergence criterion in" in report and "of 3 runs" in report
    for run_id in index(out):
        assert run_id in report

    with pytest.raises(ValueError, match="another recipe.*seed"):
        know("--out", out, "--runs", 3, "--preset", "quick", "--seed", 1, "--quiet")


def test_deterministic_per_seed_and_across_worker_processes(tmp_path):
    for name, jobs in (("a", 1), ("b", 2)):
        know("--out", tmp_path / name, "--runs", 2 if jobs == 2 else 1, "--preset", "quick",
             "--archs", "mlp,vit", "--seed", 4, "--quiet", "--jobs", jobs)
    a = load_file(str(tmp_path / "a" / "run_0000.safetensors"))
    b = load_file(str(tmp_path / "b" / "run_0000.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert index(tmp_path / "a")["run_0000"]["meta"]["test_acc"] == \
        index(tmp_path / "b")["run_0000"]["meta"]["test_acc"]
    assert sorted(index(tmp_path / "b")) == ["run_0000", "run_0001"]


def test_validation_images_lie_outside_d0():
    preset = collection_plan.PRESETS["default"]
    for k, n_train in ((0, 10000), (1, 1438)):
        draws = collection_plan.draw_settings(preset, 0, k, n_train)
        d0, val = set(draws["d0"].tolist()), set(draws["val"].tolist())
        assert not d0 & val and len(val) == min(1000, n_train // 4)
        assert len(d0) == min(2000, n_train - len(val))
        assert draws["stage_samples"] == len(d0) and draws["pretrain_epochs"] >= 4


class NaNModel(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x) * float("nan")


def test_nan_run_is_recorded_as_failed_and_others_continue(tmp_path, monkeypatch, capsys):
    def build(name, *args, **kwargs):
        model = zoo.build_model(name, *args, **kwargs)
        return NaNModel(model) if name == "cnn" else model

    monkeypatch.setattr(collect, "build_model", build)
    out = tmp_path / "meta"
    know("--out", out, "--runs", 2, "--preset", "quick", "--archs", "cnn,mlp", "--quiet")
    runs = index(out)
    status = {runs[r]["meta"]["arch"]: runs[r]["status"] for r in runs}
    assert status == {"cnn": "failed", "mlp": "ok"}
    failed = next(r for r in runs.values() if r["status"] == "failed")
    assert "non-finite loss" in failed["error"] and len(failed["meta"]["subset_sizes"]) == 7
    capsys.readouterr()
    know("--report", out)
    assert "failed: " in capsys.readouterr().out


def test_interrupted_run_leaves_no_corrupt_file(tmp_path, monkeypatch):
    real_save = safetensors.torch.save_file

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"half a file")
        raise KeyboardInterrupt

    out = tmp_path / "meta"
    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        know("--out", out, "--runs", 1, "--preset", "quick", "--archs", "mlp", "--quiet")
    assert sorted(p.name for p in out.iterdir()) == ["index.json"]
    assert index(out) == {}
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    know("--out", out, "--runs", 1, "--preset", "quick", "--archs", "mlp", "--quiet")
    assert index(out)["run_0000"]["status"] == "ok"


def test_dry_run_and_import_mat(tmp_path, capsys):
    assert know("--dry-run", "--runs", 4, "--preset", "quick") == 0
    plan = capsys.readouterr().out
    assert "run_0003" in plan and "4 runs" in plan and "training samples" in plan

    mat = tmp_path / "resnet_cifar10_r0.5_lr0.001_bs64.mat"
    with h5py.File(mat, "w") as fh:
        fh["FCWeights"] = np.arange(14, dtype=np.float64).reshape(7, 2)
    assert know("--out", tmp_path / "meta", "--import-mat", mat) == 0
    assert index(tmp_path / "meta")["resnet_cifar10_r0.5_lr0.001_bs64"]["rows"] == {"fc": 2}


@pytest.mark.parametrize("argv,error,match", [
    (["--runs", 0], ValueError, "--runs must be >= 1"),
    (["--runs", 1, "--datasets", "digits,svhn"], ValueError, "svhn"),
    (["--runs", 1, "--archs", "vgg"], ValueError, "vgg"),
    (["--runs", 1, "--stages", 1], ValueError, "--stages must be >= 2"),
    (["--runs", 1, "--threads", 0], ValueError, "--threads"),
    (["--runs", 1, "--jobs", 0], ValueError, "--jobs must be >= 1"),
    (["--runs", 1, "--datasets", "mnist", "--data-dir", "."], FileNotFoundError,
     "mnist not found"),
])
def test_bad_options(tmp_path, argv, error, match):
    with pytest.raises(error, match=match):
        know("--out", tmp_path / "meta", "--preset", "quick", "--quiet", *argv)


def test_out_required():
    with pytest.raises(ValueError, match="--out"):
        know("--runs", 1)


@pytest.mark.parametrize("name,seed,scale", [("default", 0, "linear"), ("default", 7, "log"),
                                             ("quick", 3, "linear")])
def test_every_combination_draws_a_learning_rate_from_every_stratum(name, seed, scale):
    preset = replace(collection_plan.PRESETS[name], lr_scale=scale)
    n = preset.lr_strata
    size = len(preset.archs) * len(preset.datasets)
    to_scale = np.log if scale == "log" else (lambda v: v)
    lo, hi = to_scale(np.asarray(preset.lr_range))
    edges = np.linspace(lo, hi, n + 1)
    seen = {}
    for k in range(2 * n * size):  # two full groups of n blocks
        plan = collection_plan.plan_run(preset, seed, k)
        lr = collection_plan.draw_settings(preset, seed, k, 10000)["lr"]
        assert preset.lr_range[0] <= lr <= preset.lr_range[1]
        stratum = int(np.searchsorted(edges, to_scale(lr), side="right")) - 1
        assert stratum == collection_plan.lr_stratum(preset, seed, k)
        seen.setdefault((plan["arch"], plan["dataset"], k // (n * size)), []).append(stratum)
    assert len(seen) == 2 * size
    assert all(sorted(strata) == list(range(n)) for strata in seen.values())
