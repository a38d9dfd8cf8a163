"""The forgetting schedule (nested seeded subsets, snapshots) and the ready training loop."""
import math

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from know_kernels.research.forgetting import (ForgettingSchedule, progressive_forgetting,
                                              subset_sizes)
from know_kernels.research.training import (Convergence, NonFiniteLossError, pretrain,
                                            top1_accuracy, train_steps)
from know_kernels.known.routing import route_state


def tiny_data(n=240, seed=0, classes=3):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = torch.randn(n, 6, generator=g) + 2.0 * nn.functional.one_hot(y, 6).float()
    return TensorDataset(x, y)


def tiny_model(seed=0, classes=3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, classes))


class ListDataset(Dataset):
    """A plain map-style dataset (no .tensors), to exercise the generic batching path."""

    def __init__(self, tensor_dataset):
        self.x, self.y = tensor_dataset.tensors

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def test_subsets_are_nested_seeded_and_sized():
    schedule = ForgettingSchedule(1000, r=0.37, stages=6, seed=11)
    sizes = [1000]
    for _ in range(5):
        sizes.append(math.floor(0.37 * sizes[-1]))
    assert schedule.sizes == sizes == subset_sizes(1000, 0.37, 6)
    subsets = [set(idx.tolist()) for _, idx in schedule]
    assert all(len(s) == n for s, n in zip(subsets, sizes))
    assert all(b <= a for a, b in zip(subsets, subsets[1:]))
    again = ForgettingSchedule(1000, r=0.37, stages=6, seed=11)
    other = ForgettingSchedule(1000, r=0.37, stages=6, seed=12)
    assert all(torch.equal(again.subset(i), schedule.subset(i)) for i in range(6))
    assert not torch.equal(other.subset(1), schedule.subset(1))
    depth = schedule.depth()
    for i in range(6):
        assert set(schedule.d0_indices[depth >= i].tolist()) == subsets[i]


def test_explicit_d0_indices():
    d0 = torch.arange(100, 400, 3)
    schedule = ForgettingSchedule(d0, r=0.5, stages=3, seed=0)
    assert torch.equal(schedule.subset(0), d0)
    assert set(schedule.subset(2).tolist()) <= set(d0.tolist())
    with pytest.raises(ValueError, match="duplicates"):
        ForgettingSchedule([1, 2, 2, 3], r=0.5, stages=2)


@pytest.mark.parametrize("r", [0.0, 1.0, -0.2, 1.5, float("nan")])
def test_r_outside_unit_interval(r):
    with pytest.raises(ValueError, match=r"r must lie in \(0, 1\)"):
        ForgettingSchedule(100, r=r, stages=3)


@pytest.mark.parametrize("stages", [1, 0, 2.5, True])
def test_fewer_than_two_stages(stages):
    with pytest.raises(ValueError, match="stages must be an integer >= 2"):
        ForgettingSchedule(100, r=0.5, stages=stages)


def test_empty_last_subset():
    with pytest.raises(ValueError, match="too small.*subsets would be"):
        ForgettingSchedule(10, r=0.3, stages=4)


def test_subset_smaller_than_a_batch_fails_before_training():
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # 240 -> 120 -> 60 -> 30: the last stage cannot hold a batch of 32, even though
    # pretraining on D^0 could.
    with pytest.raises(ValueError, match="stage 3's subset has 30 samples, fewer than one "
                                         "batch of 32"):
        progressive_forgetting(model, tiny_data(), r=0.5, stages=4, batch_size=32,
                               pretrain_epochs=1)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_model_without_trainable_parameters():
    model = tiny_model()
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        progressive_forgetting(model, tiny_data(), r=0.5, stages=2)


@pytest.mark.parametrize("kwargs,match", [
    (dict(lr=0.0), "lr must be a positive"), (dict(lr=float("nan")), "lr must be a positive"),
    (dict(batch_size=0), "batch_size"), (dict(epochs_per_stage=0), "epochs_per_stage"),
    (dict(optimizer="lbfgs"), "optimizer"), (dict(pretrain_epochs=-1), "pretrain_epochs"),
    (dict(indices=[0, 1, 999] + list(range(2, 100))), "indices must lie"),
])
def test_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        progressive_forgetting(tiny_model(), tiny_data(), **{"r": 0.5, "stages": 2,
                                                             "batch_size": 8, **kwargs})


def test_nan_loss_abandons_the_run():
    x, y = tiny_data().tensors
    bad = TensorDataset(torch.full_like(x, float("nan")), y)
    with pytest.raises(NonFiniteLossError, match="non-finite loss nan at stage 0, step 0"):
        progressive_forgetting(tiny_model(), bad, r=0.5, stages=3, batch_size=8,
                               pretrain_epochs=1)


def run(dataset=None, seed=3, **kwargs):
    model = tiny_model(seed)
    settings = dict(r=0.5, stages=4, batch_size=16, lr=5e-3, pretrain_epochs=2,
                    pretrain_lr=1e-2, seed=seed, test_dataset=tiny_data(90, seed=7))
    settings.update(kwargs)
    return model, progressive_forgetting(model, dataset or tiny_data(), **settings)


def test_progressive_forgetting_records_every_stage():
    model, schedule = run()
    assert schedule.complete and len(schedule.snapshots) == 4
    assert schedule.sizes == [240, 120, 60, 30]
    # snapshot S-1 is the returned model; successive snapshots differ (each stage trained)
    final = model.state_dict()
    assert all(torch.equal(schedule.snapshots[-1][k], final[k]) for k in final)
    w = [s["0.weight"] for s in schedule.snapshots]
    assert all(not torch.equal(a, b) for a, b in zip(w, w[1:]))
    # samples: full batches only
    assert schedule.samples == [2 * (240 // 16) * 16, 112, 48, 16]
    assert all(t > 0 for t in schedule.seconds)
    assert schedule.test_acc[0] > 0.6  # the synthetic task is easy once trained
    assert schedule.test_acc[-1] == pytest.approx(top1_accuracy(model, tiny_data(90, seed=7)))
    report = schedule.time_report()
    assert report["paper_ratio"] == pytest.approx((1 - 0.5 ** 3) / (1 - 0.5))
    assert report["measured_ratio"] == pytest.approx(sum(schedule.seconds[1:]) /
                                                     schedule.seconds[0])
    assert report["sample_ratio"] == pytest.approx((112 + 48 + 16) / 480)
    meta = schedule.metadata()
    for key in ("r", "subset_sizes", "test_acc", "lr", "batch_size", "seed",
                "epochs_per_stage", "pretrain_epochs", "optimizer"):
        assert key in meta
    assert meta["subset_sizes"] == [240, 120, 60, 30] and len(meta["test_acc"]) == 4


def test_trajectory_columns_are_the_snapshots():
    _, schedule = run()
    traj = schedule.trajectory()
    assert traj.stages == 4 and set(traj.heads) == {"fc", "bias"}
    routes = route_state(schedule.snapshots[0])
    assert routes["1.weight"] is None and routes["1.bias"] is None  # BatchNorm stays out
    for stage in range(4):
        rebuilt = traj.state_dict(stage)
        assert set(rebuilt) == {k for k, h in routes.items() if h}
        for name, tensor in rebuilt.items():
            assert torch.equal(tensor, schedule.snapshots[stage][name])
    assert torch.equal(traj.subset_indices(2), schedule.subset(2))
    assert traj.meta["subset_sizes"] == schedule.sizes


def test_deterministic_and_both_batching_paths_agree():
    _, a = run(seed=5)
    _, b = run(seed=5)
    _, c = run(dataset=ListDataset(tiny_data()), seed=5)
    _, d = run(seed=6)
    for other in (b, c):
        for sa, so in zip(a.snapshots, other.snapshots):
            assert all(torch.equal(sa[k], so[k]) for k in sa)
    assert not torch.equal(a.snapshots[-1]["0.weight"], d.snapshots[-1]["0.weight"])


def test_given_model_is_theta0_without_pretraining():
    model = tiny_model(1)
    theta0 = {k: v.clone() for k, v in model.state_dict().items()}
    schedule = progressive_forgetting(model, tiny_data(), r=0.6, stages=3, batch_size=8,
                                      lr=1e-3, optimizer="sgd")
    assert all(torch.equal(schedule.snapshots[0][k], theta0[k]) for k in theta0)
    assert schedule.seconds[0] is None and schedule.test_acc == [None, None, None]
    report = schedule.time_report()
    assert report["measured_ratio"] is None and report["paper_ratio"] == pytest.approx(1.6)
    assert schedule.info["momentum"] == 0.9


def test_schedule_with_a_user_training_loop():
    data = tiny_data()
    model = tiny_model()
    schedule = ForgettingSchedule(len(data), r=0.5, stages=3, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for stage, indices in schedule:
        if stage:
            x, y = data.tensors[0][indices], data.tensors[1][indices]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        schedule.record(stage, model, test_acc=top1_accuracy(model, data))
    traj = schedule.trajectory(dtype="bfloat16")
    assert traj.heads["fc"].dtype == torch.bfloat16 and traj.stages == 3
    assert len(schedule.metadata()["test_acc"]) == 3


def test_record_checks_order_and_shapes():
    schedule = ForgettingSchedule(100, r=0.5, stages=2)
    with pytest.raises(ValueError, match="expected stage 0"):
        schedule.record(1, tiny_model())
    with pytest.raises(ValueError, match="only 0 of 2 stages"):
        schedule.trajectory()
    schedule.record(0, tiny_model())
    with pytest.raises(ValueError, match="differs in names or shapes"):
        schedule.record(1, tiny_model(classes=4))
    with pytest.raises(TypeError, match="nn.Module or a state dict"):
        schedule.record(1, [1, 2])
    schedule.record(1, tiny_model(2).state_dict())
    with pytest.raises(ValueError, match="already recorded"):
        schedule.record(2, tiny_model())


# ------------------------------------------------------------------ convergence, budgets

def test_convergence_criterion_compares_the_last_quarter_with_the_rest():
    crit = Convergence(tol=0.5)
    # 8 epochs: the last quarter is epochs 7-8; best before them 0.80.
    assert crit.gain([0.5, 0.7, 0.75, 0.78, 0.80, 0.79, 0.803, 0.802]) == pytest.approx(0.3)
    assert crit.holds([0.5, 0.7, 0.75, 0.78, 0.80, 0.79, 0.803, 0.802])
    assert not crit.holds([0.5, 0.6, 0.65, 0.7, 0.72, 0.74, 0.76, 0.78])  # still climbing
    assert crit.holds([0.5, 0.7, 0.8, 0.85, 0.86, 0.86, 0.84, 0.83])      # over-fitting
    with pytest.raises(ValueError, match=">= 4 epochs"):
        crit.gain([0.5, 0.6, 0.7])
    with pytest.raises(ValueError, match="tol"):
        Convergence(tol=0)
    with pytest.raises(ValueError, match="max_cycles"):
        Convergence(max_cycles=0)


class NeverConverged(Convergence):
    def holds(self, history):
        return False


def test_pretraining_adds_cycles_until_the_criterion_holds():
    """A criterion that never holds runs max_cycles cycles and says so; an easy one stops
    after the first."""
    data, val = tiny_data(), tiny_data(90, seed=3)
    records = {}
    for name, crit in (("strict", NeverConverged(max_cycles=3)),
                       ("easy", Convergence(tol=100.0, max_cycles=3))):
        model = tiny_model(0)
        records[name] = pretrain(model, data, torch.arange(240), epochs=4, lr=1e-2,
                                 batch_size=16, generator=torch.Generator().manual_seed(0),
                                 val_dataset=val, convergence=crit)
    easy, strict = records["easy"], records["strict"]
    assert easy["cycles"] == 1 and easy["epochs"] == 4 and easy["converged"] is True
    assert len(easy["val_acc"]) == 4 and easy["samples"] == 4 * (240 // 16) * 16
    assert easy["gain_last_quarter"] == pytest.approx(Convergence().gain(easy["val_acc"]))
    assert strict["cycles"] == 3 and strict["epochs"] == 12 and len(strict["val_acc"]) == 12
    assert strict["converged"] is False
    # Without held-out images: one cycle, nothing checked.
    plain = pretrain(tiny_model(0), data, torch.arange(240), epochs=4, lr=1e-2, batch_size=16,
                     generator=torch.Generator().manual_seed(0))
    assert plain["cycles"] == 1 and plain["converged"] is None and plain["val_acc"] == []


def test_forgetting_records_the_convergence_check_and_a_fixed_stage_budget():
    model, schedule = run(val_dataset=tiny_data(90, seed=3), pretrain_epochs=4,
                          stage_samples=96)
    record = schedule.info["pretrain"]
    assert record["converged"] is Convergence().holds(record["val_acc"])
    assert schedule.metadata()["pretrain"] == record
    # Every stage sees the same budget, however small its subset (30 images: 6 passes).
    assert schedule.samples[1:] == [96, 96, 96]
    assert schedule.metadata()["stage_budget_samples"] == 96


@pytest.mark.parametrize("kwargs, match", [
    ({"stage_samples": 0}, "stage_samples"),
    ({"stage_samples": 8}, "less than one batch"),
    ({"val_dataset": tiny_data(30), "pretrain_epochs": 3}, ">= 4 epochs"),
])
def test_bad_regime_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        run(**kwargs)


def test_a_step_budget_without_a_full_batch_is_refused():
    model = tiny_model(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="5 samples hold no full batch of 8"):
        train_steps(model, tiny_data(), torch.arange(5), stage=1, steps=3, batch_size=8,
                    optimizer=opt, cosine=False, generator=torch.Generator(), device="cpu")
