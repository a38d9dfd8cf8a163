"""Trajectory files and the meta-dataset: layout, round trips, atomic writes, streaming."""
import json

import pytest
import safetensors.torch
import torch

from know_kernels.io.store import (MetaDataset, Trajectory, TrajectoryFile, load_trajectory,
                                save_trajectory)

from support.checkpoints import drifting_checkpoints, small_cnn


def snapshots(stages=4, seed=0, width=5):
    """State dicts of a small conv net with BatchNorm, drifting a little per stage."""
    return drifting_checkpoints(lambda: small_cnn(2, width, classes=3), stages, seed=seed,
                                count_ints=False)


def trajectory(stages=4, seed=0, width=5, meta=None):
    return Trajectory.from_snapshots(snapshots(stages, seed, width),
                                     meta=meta or {"arch": "toy", "test_acc": [0.9, 0.8]})


def test_layout_and_param_table():
    snaps = snapshots()
    traj = Trajectory.from_snapshots(snaps)
    assert {p["name"]: (p["head"], p["offset"]) for p in traj.params} == {
        "0.weight": ("conv", 0), "0.bias": ("bias", 0), "3.weight": ("fc", 0),
        "3.bias": ("bias", 5)}
    assert traj.heads["conv"].shape == (5 * 2 * 9, 4)
    assert traj.heads["fc"].shape == (60, 4) and traj.heads["bias"].shape == (8, 4)
    # column i is stage i; row offset + k is element k of the flattened parameter
    for i, snap in enumerate(snaps):
        assert torch.equal(traj.heads["conv"][:, i], snap["0.weight"].reshape(-1))
        assert torch.equal(traj.heads["bias"][5:, i], snap["3.bias"])
    assert torch.equal(traj.rows("fc", order="time"), traj.heads["fc"].flip(1))
    with pytest.raises(ValueError, match="order"):
        traj.rows("fc", order="reversed")


def test_from_snapshots_errors():
    snaps = snapshots()
    with pytest.raises(ValueError, match="at least 2 snapshots"):
        Trajectory.from_snapshots(snaps[:1])
    bad = dict(snaps[1])
    bad["3.weight"] = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="snapshot 1"):
        Trajectory.from_snapshots([snaps[0], bad])
    with pytest.raises(ValueError, match="no parameter"):
        Trajectory.from_snapshots([{"x.running_mean": torch.zeros(3)}] * 2)
    with pytest.raises(ValueError, match="dtype"):
        Trajectory.from_snapshots(snaps, dtype=torch.float16)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_file_roundtrip_and_lazy_reads(tmp_path, dtype):
    traj = trajectory()
    traj.d0_indices = torch.tensor([4, 8, 15, 16, 23, 42])
    traj.subset_depth = torch.tensor([0, 3, 1, 2, 0, 1], dtype=torch.uint8)
    path = tmp_path / "run.safetensors"
    save_trajectory(traj, path, dtype=dtype)
    back = load_trajectory(path)
    for head, rows in traj.heads.items():
        assert back.heads[head].dtype == getattr(torch, dtype)
        assert torch.equal(back.heads[head], rows.to(getattr(torch, dtype)))
    assert back.params == traj.params and back.meta == traj.meta
    assert back.subset_indices(1).tolist() == [8, 15, 16, 42]
    for name, tensor in back.state_dict(2).items():
        assert tensor.shape == snapshots()[2][name].shape
    reader = TrajectoryFile(path)
    assert reader.heads == {"conv": 90, "fc": 60, "bias": 8} and reader.stages == 4
    assert reader.meta["column_order"] == "stage"
    assert torch.equal(reader.read("conv", 10, 17), back.heads["conv"][10:17])
    assert torch.equal(reader.read("conv", 10, 17, order="time"),
                       back.heads["conv"][10:17].flip(1))
    with pytest.raises(KeyError, match="no 'fc2' rows"):
        reader.read("fc2")


def test_unreadable_files(tmp_path):
    path = tmp_path / "run.safetensors"
    save_trajectory(trajectory(), path)
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(path.read_bytes()[:50])
    with pytest.raises(ValueError, match="cut.safetensors"):
        TrajectoryFile(truncated)
    foreign = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(ValueError, match="plain.safetensors.*not a trajectory"):
        TrajectoryFile(foreign)
    with pytest.raises(FileNotFoundError):
        TrajectoryFile(tmp_path / "missing.safetensors")


def test_interrupted_write_leaves_no_file(tmp_path, monkeypatch):
    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"partial")
        raise KeyboardInterrupt

    store = MetaDataset(tmp_path)
    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        store.add("run_0", trajectory())
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    store.add("run_0", trajectory())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.json", "run_0.json",
                                                           "run_0.safetensors"]


def filled_store(root, n=3):
    store = MetaDataset(root)
    trajs = {}
    for i in range(n):
        meta = {"arch": "toy", "r": 0.5, "test_acc": [0.9, 0.8 + i / 50]}
        trajs[f"run_{i}"] = trajectory(seed=i, width=3 + i, meta=meta)
        store.add(f"run_{i}", trajs[f"run_{i}"])
    return store, trajs


def test_meta_dataset_index_and_reopen(tmp_path):
    store, trajs = filled_store(tmp_path)
    store.add_failed("run_9", {"arch": "toy"}, "non-finite loss nan at stage 2, step 5")
    index = json.loads((tmp_path / "index.json").read_text())
    assert index["column_order"] == "stage" and set(index["runs"]) == {"run_0", "run_1",
                                                                         "run_2", "run_9"}
    assert index["runs"]["run_9"]["status"] == "failed"
    sidecar = json.loads((tmp_path / "run_1.json").read_text())
    assert sidecar["arch"] == "toy" and sidecar["params"] == trajs["run_1"].params
    again = MetaDataset(tmp_path, create=False)
    assert len(again) == 3 and "run_9" in again and set(again.runs(None)) == set(index["runs"])
    assert again.num_rows("conv") == sum(t.heads["conv"].shape[0] for t in trajs.values())
    assert torch.equal(again.open("run_2").load().heads["fc"], trajs["run_2"].heads["fc"])
    with pytest.raises(KeyError, match="run_9"):
        again.open("run_9")
    with pytest.raises(FileExistsError, match="run_1"):
        again.add("run_1", trajs["run_1"])
    again.add("run_1", trajs["run_0"], overwrite=True)
    assert torch.equal(again.open("run_1").load().heads["conv"], trajs["run_0"].heads["conv"])
    summary = again.summary()
    assert summary["runs"] == 3 and summary["fell"] == 3 and list(summary["failed"]) == ["run_9"]


@pytest.mark.parametrize("run_id", ["", "../evil", "a/b", ".hidden", "index", 7])
def test_bad_run_ids(tmp_path, run_id):
    with pytest.raises(ValueError, match="run_id"):
        MetaDataset(tmp_path).add(run_id, trajectory())


def test_claim_checks_a_run_id_before_anything_is_written(tmp_path):
    store, _ = filled_store(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    store.claim("run_new")
    with pytest.raises(FileExistsError, match="run_1"):
        store.claim("run_1")
    store.claim("run_1", overwrite=True)
    with pytest.raises(ValueError, match="run_id"):
        store.claim("../evil", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == before and "run_new" not in store


def test_missing_or_corrupt_index(tmp_path):
    with pytest.raises(FileNotFoundError, match="no meta-dataset"):
        MetaDataset(tmp_path, create=False)
    (tmp_path / "index.json").write_text("{not json")
    with pytest.raises(ValueError, match="index.json.*unreadable"):
        MetaDataset(tmp_path)


def test_iter_chunks_streams_every_row(tmp_path):
    store, trajs = filled_store(tmp_path)
    chunks = list(store.iter_chunks("conv", chunk_rows=16))
    assert all(0 < rows.shape[0] <= 16 and rows.shape[1] == 4 for rows, _ in chunks)
    for run_id, traj in trajs.items():
        mine = [rows for rows, info in chunks if info["run"] == run_id]
        assert torch.equal(torch.cat(mine), traj.heads["conv"])
    assert chunks[0][1]["meta"]["arch"] == "toy"

    shuffled = list(store.iter_chunks("conv", chunk_rows=16, shuffle=True, seed=1))
    keys = [(i["run"], i["start"]) for _, i in chunks]
    shuffled_keys = [(i["run"], i["start"]) for _, i in shuffled]
    assert sorted(shuffled_keys) == sorted(keys) and shuffled_keys != keys
    assert shuffled_keys == [(i["run"], i["start"])
                             for _, i in store.iter_chunks("conv", 16, shuffle=True, seed=1)]
    for rows, info in shuffled:
        assert torch.equal(rows, trajs[info["run"]].heads["conv"][info["start"]:info["stop"]])

    timed = next(store.iter_chunks("fc", 1000, order="time", runs=["run_1"]))
    assert torch.equal(timed[0], trajs["run_1"].heads["fc"].flip(1))
    with pytest.raises(ValueError, match="chunk_rows"):
        next(store.iter_chunks("conv", 0))
    with pytest.raises(ValueError, match="head"):
        next(store.iter_chunks("norm"))
    with pytest.raises(KeyError, match="run_7"):
        next(store.iter_chunks("conv", runs=["run_7"]))


def test_summary_counts_forgetting_and_convergence(tmp_path):
    """The forgetting check (accuracy at the last stage below Θ^0's) and the convergence
    record, counted over the finished runs; runs without a check are not counted."""
    store = MetaDataset(tmp_path)
    runs = [([0.90, 0.85], True), ([0.90, 0.90], False), ([0.80, 0.81], True),
            ([0.70, 0.60], None)]
    for i, (acc, converged) in enumerate(runs):
        meta = {"arch": "toy", "r": 0.5, "test_acc": acc}
        if converged is not None:
            meta["pretrain"] = {"converged": converged}
        store.add(f"run_{i}", trajectory(seed=i, meta=meta))
    summary = store.summary()
    assert summary["fell"] == 2 and summary["with_accuracy"] == 4
    assert summary["mean_drop"] == pytest.approx((0.05 + 0.0 - 0.01 + 0.10) / 4)
    assert summary["convergence_checked"] == 3 and summary["converged"] == 2
    assert [r["converged"] for r in summary["per_run"]] == [True, False, True, None]
