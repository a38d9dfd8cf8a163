"""Linear probes and the more-data yardstick: the paired design with frozen features,
BatchNorm recalibration and the nested more-data sets trained with Θ^0's own recipe.  Synthetic 8x8 tasks and width-4 ResNets (seconds)."""
import numpy as np
import pytest
import torch
from torch import nn

from know_kernels.research.forgetting import derive_seed, progressive_forgetting
from know_kernels.research.more_data import PretrainRecipe, more_data_candidates, nested_prefixes
from know_kernels.research.probe import (LinearProbe, features, fit_probe, recalibrate_batchnorm)
from know_kernels.research.training import Convergence, top1_accuracy
from know_kernels.research.transfer import MORE_DATA, NAIVE, Candidate, transfer
from know_kernels.research.zoo import build_model

from support.toys import RECIPE, SHAPE, model_fn, source_weights, toy_task

pytestmark = pytest.mark.usefixtures("one_thread")

PROBE = LinearProbe(shots=5, max_iter=50)


def test_features_are_the_classifier_inputs_and_leave_the_mode_alone():
    torch.manual_seed(0)
    model = build_model("resnet", SHAPE, 3, width=4)
    model.train()
    x = torch.randn(7, *SHAPE)
    f = features(model, x)
    assert f.dtype == torch.float64 and f.shape == (7, model.fc.in_features)
    assert model.training
    model.eval()
    with torch.no_grad():
        logits = model(x)
    assert torch.allclose(f.float() @ model.fc.weight.T + model.fc.bias, logits, atol=1e-5)
    with pytest.raises(ValueError, match="classifier='head'"):
        features(model, x, classifier="head")


def test_batchnorm_recalibration_measures_the_given_images():
    net = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    images = torch.randn(1000, 4) * 3 + 1
    recalibrate_batchnorm(net, images, batch_size=100)
    with torch.no_grad():
        h = net[0](images)
    bn = net[1]
    assert torch.allclose(bn.running_mean, h.mean(0), atol=1e-5)
    # Cumulative average of per-batch unbiased variances: close to the overall variance.
    assert torch.allclose(bn.running_var, h.var(0), rtol=0.05)
    assert bn.momentum == 0.1 and net.training


def test_probe_fits_separable_features_and_is_deterministic():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(60) % 3
    x = torch.randn(60, 5, generator=g, dtype=torch.float64) + 4 * nn.functional.one_hot(y, 5)
    a = fit_probe(x, y, 3, PROBE)(x)
    b = fit_probe(x, y, 3, PROBE)(x)
    assert torch.equal(a, b) and (a == y).double().mean() > 0.95


def test_same_weights_under_two_names_probe_identically():
    w = source_weights()
    candidates = [Candidate(NAIVE, 0, 1.0, w), Candidate("known", 1, 2.0, w),
                  Candidate(NAIVE, -1, 0.5, source_weights(seed=1))]
    task = toy_task()
    calib = torch.randn(40, *SHAPE)
    res = transfer(candidates, model_fn(), task, in_shape=SHAPE, seeds=3, recipe=PROBE,
                   calibration=calib).to_dict()
    assert res["protocol"] == "linear-probe" and res["recipe"]["shots"] == 5
    naive, twin, other = res["rows"]
    assert twin["acc"] == naive["acc"] and twin["diff"] == [0.0] * 3
    assert all(0.0 <= a <= 100.0 for a in other["acc"])
    again = transfer(candidates, model_fn(), task, in_shape=SHAPE, seeds=3, recipe=PROBE,
                     calibration=calib).to_dict()
    assert [r["acc"] for r in again["rows"]] == [r["acc"] for r in res["rows"]]


def test_calibration_is_refused_for_fine_tuning():
    w = source_weights()
    with pytest.raises(ValueError, match="calibration images are used by a LinearProbe"):
        transfer([Candidate(NAIVE, 0, 1.0, w)], model_fn(), toy_task(), in_shape=SHAPE,
                 seeds=2, recipe=RECIPE, calibration=torch.zeros(2, *SHAPE))


# ---------------------------------------------------------------------------- more data

def test_nested_prefixes_hold_each_other():
    order = torch.from_numpy(np.random.default_rng(0).permutation(100))
    d0, d1, d2 = nested_prefixes(order, 10, (2, 4))
    assert [len(d0), len(d1), len(d2)] == [10, 20, 40]
    assert set(d0.tolist()) < set(d1.tolist()) < set(d2.tolist())
    assert torch.equal(d2, order[:40].sort().values)
    with pytest.raises(ValueError, match="the pool has 100"):
        nested_prefixes(order, 30, (2, 4))
    with pytest.raises(ValueError, match="increasing factors other than 1"):
        nested_prefixes(order, 10, (4, 2))
    with pytest.raises(ValueError, match="increasing factors other than 1"):
        nested_prefixes(order, 10, (1, 2))
    # A factor below 1: a subset of D^0, itself a prefix of the same order.
    d0, half, d1 = nested_prefixes(order, 10, (0.5, 2))
    assert len(half) == 5 and set(half.tolist()) < set(d0.tolist()) < set(d1.tolist())


def test_more_data_models_use_theta0s_recipe_seeds_and_init():
    """Trained on D^0 itself, the yardstick's recipe must reproduce Θ^0 bit for bit: the
    same initialisation, batch order, schedule and convergence check."""
    task = toy_task(n_train=120)
    recipe = PretrainRecipe(samples=240, lr=1e-2, batch_size=12,
                            convergence=Convergence(tol=0.5, max_cycles=2))
    val = toy_task(n_train=30, seed=5).train
    d0 = torch.arange(0, 120, 2)
    init_seed, forget_seed = derive_seed(0, 0), derive_seed(0, 2)
    torch.manual_seed(init_seed)
    theta = model_fn()()
    schedule = progressive_forgetting(
        theta, task.train, indices=d0, r=0.5, stages=2, batch_size=6, lr=1e-3,
        seed=forget_seed, pretrain_epochs=recipe.epochs(len(d0)), pretrain_lr=recipe.lr,
        pretrain_batch_size=recipe.batch_size, val_dataset=val,
        convergence=recipe.convergence)
    more, records = more_data_candidates(model_fn(), task.train, [d0, d0, torch.arange(120)],
                                         recipe, init_seed=init_seed,
                                         order_seed=derive_seed(forget_seed, 1),
                                         val_dataset=val, test_dataset=task.test)
    theta0 = schedule.snapshots[0]
    assert all(torch.equal(more[0].weights[k], theta0[k]) for k in theta0)
    assert records[0]["val_acc"] == schedule.info["pretrain"]["val_acc"]
    assert [(c.method, c.step, c.factor) for c in more] == [(MORE_DATA, 1, 1.0),
                                                            (MORE_DATA, 2, 2.0)]
    assert records[1]["images"] == 120 and records[1]["epochs"] % recipe.epochs(120) == 0
    assert isinstance(records[1]["converged"], bool)
    # Evaluating on the test images leaves the weights as trained (Θ^0's, bit for bit).
    check = model_fn()()
    check.load_state_dict(more[0].weights)
    assert records[0]["test_acc"] == pytest.approx(100 * top1_accuracy(check, task.test))
