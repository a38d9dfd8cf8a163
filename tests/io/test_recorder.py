"""StageRecorder: snapshots recorded one stage at a time straight into a meta-dataset give
the same run as flattening in-memory snapshots, without holding the stages in memory."""
import subprocess
import sys
import textwrap

import pytest
import torch

from know_kernels.io.recorder import StageRecorder
from know_kernels.io.store import MetaDataset, Trajectory, load_trajectory

from support.checkpoints import small_cnn


def small_model(seed=0):
    torch.manual_seed(seed)
    return small_cnn(1, 4, classes=7, side=8)


def snapshots(stages, seed=0):
    model = small_model(seed)
    out = []
    for s in range(stages):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        out.append({k: v.clone() for k, v in model.state_dict().items()})
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_recorded_run_equals_the_in_memory_one(tmp_path, dtype, monkeypatch):
    import know_kernels.io.recorder as recorder
    monkeypatch.setattr(recorder, "CHUNK_ROWS", 37)  # several chunks, one ragged
    snaps = snapshots(5)
    meta = {"arch": "tiny", "dataset": "none", "r": 0.5}
    recorded = MetaDataset(tmp_path / "a")
    rec = StageRecorder(recorded, "run", 5, dtype=dtype)
    for stage, snap in enumerate(snaps):
        rec.record(stage, snap)
    entry = rec.finish(meta)
    reference = MetaDataset(tmp_path / "b")
    want = reference.add("run", Trajectory.from_snapshots(snaps, dtype=dtype, meta=meta))
    assert entry == want
    got, ref = load_trajectory(recorded.run_path("run")), load_trajectory(reference.run_path("run"))
    assert got.params == ref.params and got.meta == ref.meta
    assert set(got.heads) == set(ref.heads) == {"conv", "fc", "bias"}
    for head in ref.heads:
        assert torch.equal(got.heads[head], ref.heads[head])
    # The scratch arrays are gone; only the run's files and the index remain.
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["index.json", "run.json",
                                                                  "run.safetensors"]


def test_modules_are_read_not_kept(tmp_path):
    model = small_model()
    rec = StageRecorder(MetaDataset(tmp_path), "run", 2)
    rec.record(0, model)
    first = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.mul_(2)      # what was recorded must not follow the live model
    rec.record(1, model)
    rec.finish()
    traj = load_trajectory(tmp_path / "run.safetensors")
    assert torch.equal(traj.state_dict(0)["0.weight"], first)
    assert torch.equal(traj.state_dict(1)["0.weight"], 2 * first)


def test_bad_recordings_are_refused(tmp_path):
    store = MetaDataset(tmp_path)
    with pytest.raises(ValueError, match="stages must be"):
        StageRecorder(store, "run", 1)
    snaps = snapshots(3)
    rec = StageRecorder(store, "run", 3)
    with pytest.raises(ValueError, match="expected stage 0"):
        rec.record(1, snaps[0])
    rec.record(0, snaps[0])
    bad = dict(snaps[1])
    bad["3.weight"] = torch.zeros(7, 5)
    with pytest.raises(ValueError, match=r"'3.weight' is \[7, 5\]"):
        rec.record(1, bad)
    with pytest.raises(ValueError, match="only 1 of 3 stages"):
        rec.finish()
    rec.discard()
    assert not any(p.name.endswith(".rec") for p in tmp_path.iterdir())
    assert "run" not in store


def test_memory_stays_near_one_model_copy(tmp_path):
    # 8M parameters (32 MB) over 6 stages: keeping the stages would add about 190 MB.
    script = textwrap.dedent(f"""
        import resource, torch
        from know_kernels.io.recorder import StageRecorder
        from know_kernels.io.store import MetaDataset
        model = torch.nn.Linear(4000, 2000)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        rec = StageRecorder(MetaDataset({str(tmp_path)!r}), "big", 6)
        for stage in range(6):
            with torch.no_grad():
                model.weight.add_(1e-3)
            rec.record(stage, model)
        rec.finish()
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    grown_mb = float(done.stdout.strip())
    model_mb = 8e6 * 4 / 2 ** 20
    assert grown_mb < 3 * model_mb, f"peak RSS grew {grown_mb:.0f} MB for a {model_mb:.0f} MB model"
