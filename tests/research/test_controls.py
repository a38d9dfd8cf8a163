"""Matched-noise controls: the same norm per tensor as the prediction's change, a seeded
direction of its own."""
import pytest
import torch

from know_kernels.research.controls import control_of, matched_noise, noise_candidates, noise_method
from know_kernels.research.transfer import Candidate


def _states():
    g = torch.Generator().manual_seed(0)
    theta0 = {"conv.weight": torch.randn(4, 3, 3, 3, generator=g),
              "fc.weight": torch.randn(5, 8, generator=g),
              "fc.bias": torch.randn(5, generator=g),
              "bn.num_batches_tracked": torch.tensor(7)}
    predicted = {"conv.weight": theta0["conv.weight"] + 0.3 * torch.randn(4, 3, 3, 3, generator=g),
                 "fc.weight": theta0["fc.weight"] * 1.5,
                 "fc.bias": theta0["fc.bias"].clone(),          # left as it was
                 "bn.num_batches_tracked": torch.tensor(7)}
    return theta0, predicted


def test_same_norm_per_tensor_and_a_new_direction_per_seed():
    theta0, predicted = _states()
    a, b = matched_noise(theta0, predicted, seed=1), matched_noise(theta0, predicted, seed=2)
    for name in ("conv.weight", "fc.weight"):
        change = (predicted[name] - theta0[name]).double().norm()
        for noise in (a, b):   # equal up to the float32 rounding of the weights
            assert torch.isclose((noise[name] - theta0[name]).double().norm(), change,
                                 rtol=1e-5)
        da, db = a[name] - theta0[name], b[name] - theta0[name]
        cosine = torch.nn.functional.cosine_similarity(da.flatten(), db.flatten(), dim=0)
        assert abs(cosine) < 0.6                                 # other directions
        dp = (predicted[name] - theta0[name]).flatten()
        assert abs(torch.nn.functional.cosine_similarity(da.flatten(), dp, dim=0)) < 0.6
    assert torch.equal(a["fc.bias"], theta0["fc.bias"])         # no change, no noise
    assert torch.equal(a["bn.num_batches_tracked"], theta0["bn.num_batches_tracked"])
    again = matched_noise(theta0, predicted, seed=1)
    assert all(torch.equal(again[k], a[k]) for k in a)           # seeded


def test_controls_per_candidate_and_their_names():
    theta0, predicted = _states()
    cands = [Candidate("known", 1, 2.0, predicted), Candidate("known", 2, 4.0, predicted)]
    controls = noise_candidates(cands, theta0, seed=5)
    assert [(c.method, c.step, c.factor) for c in controls] == [("noise:known", 1, 2.0),
                                                                ("noise:known", 2, 4.0)]
    assert not torch.equal(controls[0].weights["conv.weight"], controls[1].weights["conv.weight"])
    assert noise_method("exp") == "noise:exp" and control_of("noise:exp") == "exp"
    assert control_of("exp") is None


def test_mismatched_states_are_refused():
    theta0, predicted = _states()
    with pytest.raises(ValueError, match="same tensors"):
        matched_noise(theta0, {k: v for k, v in predicted.items() if k != "fc.bias"}, seed=0)
    with pytest.raises(ValueError, match="fc.weight: prediction shape"):
        matched_noise(theta0, {**predicted, "fc.weight": torch.zeros(2, 2)}, seed=0)
