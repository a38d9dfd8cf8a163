"""Replayable runs: a collected run rebuilt as its network at any stage, bit for bit, and
the image sets it was and was not trained on."""
import pytest
import torch

from know_kernels.io.store import MetaDataset, Trajectory, load_trajectory, save_trajectory
from know_kernels.research.collection_plan import PRESETS, draw_settings, split_sizes
from know_kernels.research.replay import NotReplayableError, check_replayable, replay
from know_kernels.research.training import top1_accuracy

pytestmark = pytest.mark.usefixtures("one_thread")


def test_every_stage_rebuilds_the_run_network_bit_for_bit(replay_store):
    for run_id in replay_store.runs():
        run = replay(replay_store, run_id)
        # The collection scored each stage on the test split as it went: the rebuilt
        # networks, BatchNorm statistics included, score exactly the same.
        accs = [top1_accuracy(run.network(stage), run.data.test) for stage in range(run.stages)]
        assert accs == run.meta["test_acc"], run_id


def test_batchnorm_statistics_are_recorded_per_stage(replay_store):
    run = replay(replay_store, "run_0001")           # a shufflenet
    assert run.trajectory.unrouted, "no statistics recorded"
    means = [run.state_dict(s) for s in (0, run.stages - 1)]
    name = next(k for k in means[0] if k.endswith("running_mean"))
    assert not torch.equal(means[0][name], means[1][name])


def test_image_sets_are_the_runs_draws(replay_store):
    preset = PRESETS["quick"]
    for k, run_id in enumerate(replay_store.runs()):
        run = replay(replay_store, run_id)
        n_train = len(run.data.train)
        draws = draw_settings(preset, 0, k, n_train)
        assert torch.equal(run.indices("d0"), draws["d0"])
        assert torch.equal(run.indices("val"), draws["val"])
        d0, val, extra = (set(run.indices(w).tolist()) for w in ("d0", "val", "extra"))
        assert not (d0 & val or d0 & extra or val & extra)
        assert len(extra) >= len(d0) == split_sizes(preset, n_train)[0]
        for stage in range(1, run.stages):
            inner, outer = (set(run.indices("subset", s).tolist()) for s in (stage, stage - 1))
            assert inner < outer
            assert set(run.indices("forgot", stage).tolist()) == outer - inner
        x, y = run.images("forgot", 1)
        ix = run.indices("forgot", 1)
        assert torch.equal(x, run.data.train.tensors[0][ix])
        assert torch.equal(y, run.data.train.tensors[1][ix])
        assert len(run.indices("test")) == len(run.data.test)


def test_bad_image_set_requests_are_refused(replay_store):
    run = replay(replay_store, "run_0000")
    with pytest.raises(ValueError, match="image set must be one of"):
        run.indices("train")
    with pytest.raises(ValueError, match="needs a stage in 1"):
        run.indices("forgot", 0)
    with pytest.raises(ValueError, match="needs a stage in 0"):
        run.indices("subset", run.stages)


def test_a_store_without_replay_records_is_refused_with_how_to_recollect(tmp_path, replay_store):
    old = MetaDataset(tmp_path / "old")
    traj = replay_store.open("run_0000").load()
    meta = {k: v for k, v in traj.meta.items() if k != "replay"}
    old.add("run_0000", Trajectory(heads=traj.heads, params=traj.params, meta=meta,
                                   d0_indices=traj.d0_indices, subset_depth=traj.subset_depth))
    with pytest.raises(NotReplayableError, match=r"run_0000.*--preset replay"):
        replay(old, "run_0000")


def test_a_too_small_extra_pool_is_refused(replay_store):
    meta = check_replayable(replay_store, "run_0000", extra_ratio=1.0)
    n0 = meta["subset_sizes"][0]
    with pytest.raises(NotReplayableError, match="extra pool of"):
        check_replayable(replay_store, "run_0000", extra_ratio=10.0 * meta["replay"]
                         ["extra_size"] / n0)


def test_the_replay_preset_leaves_an_extra_pool_on_digits():
    # digits' training split holds 1,438 images; the default's D^0 takes all but the
    # held-out ones, the replay preset half of the rest.
    assert split_sizes(PRESETS["default"], 1438) == (1079, 359)
    assert split_sizes(PRESETS["replay"], 1438) == (539, 359)
    assert split_sizes(PRESETS["replay"], 60000) == (2000, 1000)


def test_splits_and_statistics_round_trip_through_the_file(tmp_path, replay_store):
    traj = replay_store.open("run_0001").load()
    path = tmp_path / "copy.safetensors"
    save_trajectory(traj, path)
    back = load_trajectory(path)
    assert set(back.splits) == {"val", "extra"}
    for name in back.splits:
        assert torch.equal(back.splits[name], traj.splits[name])
    assert len(back.unrouted) == traj.stages
    for a, b in zip(back.unrouted, traj.unrouted):
        assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
