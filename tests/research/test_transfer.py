"""Transfer evaluation: the paired-seed design, the statistics, and refusals of bad input.
Everything runs on a synthetic 3-class task of 8x8 images and a width-4 ResNet (seconds)."""
import math

import numpy as np
import pytest
import torch

from know_kernels import KNOWN
from know_kernels.research.forgetting import progressive_forgetting
from know_kernels.research.report import format_table
from know_kernels.research.stats import paired_difference, t_critical
from know_kernels.research.transfer import (NAIVE, Candidate, FineTune, Row, check_methods,
                                            check_seeds, factor_label, fine_tune,
                                            know_candidates, plan_seed, select_classes,
                                            transfer)
from know_kernels.research.zoo import build_model

from support.toys import RECIPE, SHAPE, model_fn, source_weights, toy_task

pytestmark = pytest.mark.usefixtures("one_thread")


def test_same_weights_under_two_labels_give_a_paired_difference_of_exactly_zero():
    task = toy_task()
    theta0, other = source_weights(0), source_weights(1)
    candidates = [Candidate(NAIVE, 0, 1.0, theta0), Candidate("taskvector", 1, 2.0, theta0),
                  Candidate("known", 1, 2.0, other)]
    result = transfer(candidates, model_fn(), task, in_shape=SHAPE, seeds=3, recipe=RECIPE)
    naive, same, different = (row.summary() for row in result.rows)
    assert same["acc"] == naive["acc"]
    assert same["diff"] == [0.0, 0.0, 0.0]
    assert same["diff_mean"] == 0.0 and same["diff_se"] == 0.0 and not same["significant"]
    assert different["acc"] != naive["acc"]  # the starting weights do matter
    assert result.seeds == (0, 1, 2) and result.train_images == 18
    # Seeds differ from each other: the spread the pairing removes is there.
    assert len(set(naive["acc"])) > 1


def test_a_seed_fixes_subset_head_and_batch_order_for_every_candidate():
    task = toy_task()
    a, b = (plan_seed(7, task, model_fn(), RECIPE) for _ in range(2))
    assert torch.equal(a.indices, b.indices)
    assert a.head.keys() == {"fc.weight", "fc.bias"}
    assert all(torch.equal(a.head[k], b.head[k]) for k in a.head)
    assert (a.order_seed, a.torch_seed) == (b.order_seed, b.torch_seed)
    labels = task.train.tensors[1][a.indices]
    assert torch.bincount(labels).tolist() == [RECIPE.shots] * 3
    c = plan_seed(8, task, model_fn(), RECIPE)
    assert not torch.equal(a.indices, c.indices)
    assert not torch.equal(a.head["fc.weight"], c.head["fc.weight"])
    assert a.order_seed != c.order_seed


def test_fine_tuning_is_deterministic_and_leaves_the_global_stream_alone():
    task = toy_task()
    plan = plan_seed(0, task, model_fn(), RECIPE)
    torch.manual_seed(123)
    first = fine_tune(source_weights(), model_fn(), task, plan, RECIPE)
    after = torch.rand(1)
    torch.manual_seed(123)
    assert fine_tune(source_weights(), model_fn(), task, plan, RECIPE) == first
    assert torch.equal(torch.rand(1), after)
    assert 0.0 <= first[0] <= 100.0 and first[1] is None


def test_paired_standard_error():
    mean, se = paired_difference([1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 1.0, 1.0])
    # d = [1, 2, 2, 3]: mean 2, sample std sqrt(2/3), s.e. = sqrt(2/3) / sqrt(4)
    assert mean == pytest.approx(2.0)
    assert se == pytest.approx(math.sqrt(2 / 3) / 2)
    d = np.random.default_rng(0).normal(size=9)
    assert paired_difference(d + 5, np.full(9, 5.0))[1] == pytest.approx(
        d.std(ddof=1) / 3)
    assert t_critical(2) == pytest.approx(12.706)
    assert t_critical(5) == pytest.approx(2.776)
    assert t_critical(1000) == pytest.approx(2.042)
    with pytest.raises(ValueError, match=">= 2 paired values"):
        paired_difference([1.0], [0.0])
    # The same shift on every seed, up to float rounding: no spread, no interval, no star.
    acc = [100 * 181 / 359, 100 * 201 / 359]
    base = [100 * 179 / 359, 100 * 199 / 359]
    assert paired_difference(acc, base) == (pytest.approx(200 / 359), 0.0)
    row = Row("known", 1, 2.0, tuple(acc), tuple(base)).summary()
    assert not row["significant"]
    # d = [1, 2, 1.5]: s.e. 0.29, 95% half-width 4.303 × 0.29 = 1.24 < 1.5.
    assert Row("known", 1, 2.0, (51.0, 52.0, 51.5), (50.0, 50.0, 50.0)).summary()["significant"]


def test_downstream_input_shape_mismatch_names_both_shapes():
    task = toy_task(shape=(1, 12, 12), name="digits")
    candidates = [Candidate(NAIVE, 0, 1.0, source_weights())]
    with pytest.raises(ValueError, match=r"'digits' has input shape \(1, 12, 12\).*"
                                         r"network takes \(1, 8, 8\).*digits_size"):
        transfer(candidates, model_fn(), task, in_shape=SHAPE, seeds=2, recipe=RECIPE)


def test_unknown_method_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown method.*'foo'.*known, taskvector, linear, "
                                         "log, exp"):
        know_candidates([source_weights()] * 5, r=0.5, methods=["known", "foo"],
                        known=KNOWN.init())
    assert check_methods("exp, known,linear") == ("known", "linear", "exp")


@pytest.mark.parametrize("seeds", [0, 1, [3], [1, 1]])
def test_too_few_seeds_are_refused(seeds):
    with pytest.raises(ValueError, match="seeds must"):
        check_seeds(seeds)


def test_bad_candidate_sets_and_recipes_are_refused():
    task, w = toy_task(), source_weights()
    with pytest.raises(ValueError, match="exactly one candidate must be naive"):
        transfer([Candidate("known", 1, 2.0, w)], model_fn(), task, in_shape=SHAPE,
                 seeds=2, recipe=RECIPE)
    with pytest.raises(ValueError, match="repeat"):
        transfer([Candidate(NAIVE, 0, 1.0, w)] * 2, model_fn(), task, in_shape=SHAPE,
                 seeds=2, recipe=RECIPE)
    with pytest.raises(ValueError, match="classifier='head' names no entry"):
        plan_seed(0, task, model_fn(), FineTune(shots=6, batch_size=6, classifier="head"))
    with pytest.raises(ValueError, match="shots=50: class 0 of 'toy' has only 20"):
        plan_seed(0, task, model_fn(), FineTune(shots=50))
    with pytest.raises(ValueError, match="epochs must be a positive integer"):
        FineTune(epochs=0)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        FineTune(optimizer="lbfgs")
    plan = plan_seed(0, task, model_fn(), RECIPE)
    misshapen = {**w, "features.0.0.weight": torch.zeros(4, 3, 3, 3)}
    with pytest.raises(ValueError, match=r"'features.0.0.weight': the weights have shape "
                                         r"\(4, 3, 3, 3\), the network \(4, 1, 3, 3\)"):
        fine_tune(misshapen, model_fn(), task, plan, RECIPE)
    with pytest.raises(ValueError, match="missing"):
        fine_tune({k: v for k, v in w.items() if not k.startswith("features.1")}, model_fn(),
                  task, plan, RECIPE)


def test_a_diverging_candidate_is_recorded_with_a_finite_accuracy():
    task, w = toy_task(), source_weights()
    # BatchNorm would absorb a mere scaling; an infinite first conv makes the loss NaN.
    blown = {**w, "features.0.0.weight": torch.full_like(w["features.0.0.weight"], math.inf)}
    result = transfer([Candidate(NAIVE, 0, 1.0, w), Candidate("exp", 1, 2.0, blown)],
                      model_fn(), task, in_shape=SHAPE, seeds=2, recipe=RECIPE)
    row = result.rows[1].summary()
    assert row["diverged"] == [0, 1]
    assert all(math.isfinite(a) and 0 <= a <= 100 for a in row["acc"])
    assert "(diverged 2/2)" in format_table(result)


def test_candidates_from_a_forgetting_run_and_their_labels():
    task = toy_task(n_train=120)
    torch.manual_seed(0)
    model = build_model("resnet", SHAPE, 3, width=4)
    schedule = progressive_forgetting(model, task.train, r=0.5, stages=5, batch_size=6,
                                      lr=1e-3, seed=0)
    candidates = know_candidates(schedule.snapshots, r=0.5, known=KNOWN.init(), steps=3)
    assert [(c.method, c.label) for c in candidates[:2]] == [(NAIVE, "×1"), (NAIVE, "×0.5")]
    assert [c.label for c in candidates[2:]] == ["×2", "×4", "×8"] * 5
    assert [c.method for c in candidates[2::3]] == ["known", "taskvector", "linear", "log",
                                                     "exp"]
    assert all(torch.equal(candidates[0].weights[k], v)
               for k, v in schedule.snapshots[0].items())
    assert [factor_label(0.7 ** -k) for k in (1, 2, 3)] == ["×1.43", "×2.04", "×2.92"]
    result = transfer(candidates[:3], model_fn(), task, in_shape=SHAPE, seeds=2, recipe=RECIPE)
    table = format_table(result)
    assert "| Naive transfer | ×1 |" in table and "| KNOWN | ×2 |" in table
    assert "reference" in table and "2 seeds" in table


def test_select_classes_relabels_and_subsets():
    task = toy_task(n_train=60, n_test=30, classes=3)
    split = select_classes(task, [2, 0], name="held", test_size=5, seed=1)
    assert split.num_classes == 2 and split.name == "held"
    assert sorted(split.train.tensors[1].unique().tolist()) == [0, 1]
    assert len(split.train) == 40 and len(split.test) == 5
    x, y = split.train.tensors
    # Class 2 of the toy task has mean 2 and became label 0.
    assert x[y == 0].mean() > x[y == 1].mean() + 1
    with pytest.raises(ValueError, match="classes must be"):
        select_classes(task, [0, 3])
