"""The clustered standard error of the demo's Δs, against hand computations."""
import math

import numpy as np
import pytest

from know_kernels.research.stats import clustered_difference, paired_difference


def test_unequal_clusters_match_the_hand_computation():
    # d = [[1, 2], [3, 5, 4]]: N = 5, mean 15 / 5 = 3; summed residuals D = (-2 - 1, 0 + 2 + 1)
    # = (-3, 3); V = G / (G - 1) · Σ D² / N² = 2 · 18 / 25 = 1.44; s.e. 1.2.
    mean, se = clustered_difference([[1, 2], [3, 5, 4]], [[0, 0], [0, 0, 0]])
    assert mean == pytest.approx(3.0) and se == pytest.approx(1.2)


def test_equal_clusters_give_the_spread_of_the_cluster_means():
    values = [[11, 13], [12, 12], [16, 14]]
    base = [[10, 10], [10, 10], [10, 10]]
    # Cluster means 2, 2, 5: sd √3, s.e. √3 / √3 = 1; by the formula N = 6, mean 3,
    # D = (-2, -2, 4), V = 3/2 · 24 / 36 = 1.
    mean, se = clustered_difference(values, base)
    assert mean == pytest.approx(3.0) and se == pytest.approx(1.0)
    means = [np.mean(np.subtract(v, b)) for v, b in zip(values, base)]
    assert se == pytest.approx(np.std(means, ddof=1) / math.sqrt(3))


def test_the_between_replicate_spread_is_in_the_error_bar():
    """Seeds that agree inside each replicate but replicates that disagree: the unclustered
    error would call the difference resolved, the clustered one does not."""
    values = [[1.0, 1.1, 0.9, 1.0], [-0.5, -0.4, -0.6, -0.5], [2.0, 2.1, 1.9, 2.0]]
    zeros = [[0.0] * 4] * 3
    mean, se = clustered_difference(values, zeros)
    _, naive_se = paired_difference(np.concatenate(values), np.zeros(12))
    assert mean == pytest.approx(0.8333333)
    assert mean > 2 * naive_se and mean < 2 * se


def test_one_value_per_cluster_is_the_plain_standard_error():
    mean, se = clustered_difference([[1.0], [2.0], [6.0]], [[0.0], [0.0], [0.0]])
    assert mean == pytest.approx(3.0) and se == pytest.approx(np.std([1, 2, 6], ddof=1) / math.sqrt(3))


def test_constant_differences_have_no_spread_and_bad_shapes_are_refused():
    assert clustered_difference([[2, 2], [2, 2]], [[1, 1], [1, 1]]) == (1.0, 0.0)
    with pytest.raises(ValueError, match="same clusters"):
        clustered_difference([[1], [2]], [[1]])
    with pytest.raises(ValueError, match=">= 2 non-empty clusters"):
        clustered_difference([[1, 2]], [[0, 0]])
    with pytest.raises(ValueError, match=">= 2 non-empty clusters"):
        clustered_difference([[1], []], [[0], []])
