"""The lincomb baseline: S coefficients per head, fitted by the same objectives as KNOWN."""
from types import SimpleNamespace

import pytest
import torch

from know_kernels.research.lincomb import LinComb
from know_kernels.research.task_objective import RunData, run_objective


def synthetic_run(coef, rows=500, stages=7, seed=0):
    """Rows whose every next value (towards more data) is Σ c_i of the S before it."""
    g = torch.Generator().manual_seed(seed)
    S = len(coef)
    time_order = [torch.randn(rows, generator=g) * 0.1 for _ in range(S)]
    while len(time_order) < stages:
        window = torch.stack(time_order[-S:], 1)
        time_order.append(window @ coef + 1e-4 * torch.randn(rows, generator=g))
    stage_order = torch.stack(time_order[::-1], 1)            # column 0 = Θ^0
    run = SimpleNamespace(run_id="synthetic", stages=stages)
    return RunData(run=run, rows={"fc": stage_order}, skeleton=None, buffers={})


def test_the_l1_fit_recovers_a_known_combination():
    truth = torch.tensor([0.1, -0.3, 0.2, -0.6, 1.6])
    data = synthetic_run(truth)
    model = LinComb(5, heads=("fc",))
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    for _ in range(600):
        loss = run_objective(model, data, S=5, objective="l1",
                             gen=torch.Generator().manual_seed(0))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.allclose(model.coef["fc"].detach(), truth, atol=2e-2), model.coef["fc"]


def test_it_starts_at_copy_last_and_slides_its_window():
    model = LinComb(3, heads=("conv",))
    rows = torch.randn(10, 3)
    assert torch.equal(model.predict("conv", rows, 2), rows[:, -1:].expand(10, 2))
    with torch.no_grad():
        model.coef["conv"].copy_(torch.tensor([0.0, -1.0, 2.0]))   # linear extrapolation
    ahead = model.predict("conv", rows, 2)
    step1 = 2 * rows[:, 2] - rows[:, 1]
    assert torch.allclose(ahead[:, 0], step1)
    assert torch.allclose(ahead[:, 1], 2 * step1 - rows[:, 2])


def test_save_and_load_round_trip_and_refuse_other_files(tmp_path):
    model = LinComb(4)
    with torch.no_grad():
        model.coef["bias"].add_(0.25)
    model.save(tmp_path / "lc.safetensors", {"objective": "task"})
    back = LinComb.load(tmp_path / "lc.safetensors")
    assert back.S == 4 and all(torch.equal(back.coef[h], model.coef[h]) for h in model.coef)
    from know_kernels import KNOWN
    KNOWN.init(S=4).save(tmp_path / "known.safetensors")
    with pytest.raises(ValueError, match="format"):
        LinComb.load(tmp_path / "known.safetensors")


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="at least 2"):
        LinComb(1)
    with pytest.raises(ValueError, match="heads must be among"):
        LinComb(3, heads=("attention",))
    with pytest.raises(ValueError, match=r"rows must be \(N, 3\)"):
        LinComb(3).step("fc", torch.zeros(2, 4))


def test_demo_candidates_apply_the_coefficients_to_routed_parameters_only():
    from know_kernels.research.replicate import lincomb_candidates
    from know_kernels.research.zoo import build_model
    torch.manual_seed(0)
    model = build_model("resnet", (1, 28, 28), 10, 4)
    states = []
    for _ in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        states.insert(0, {k: v.clone() for k, v in model.state_dict().items()})  # Θ^0 first
    lincomb = LinComb(5, heads=("fc",))
    with torch.no_grad():
        lincomb.coef["fc"].copy_(torch.tensor([0.0, 0.0, 0.0, -1.0, 2.0]))
    step1, step2 = lincomb_candidates(states, lincomb, steps=2, r=0.5)
    assert (step1.method, step1.step, step1.factor, step2.factor) == ("lincomb", 1, 2.0, 4.0)
    for name, value in states[0].items():
        if name == "fc.weight":                     # the one 2-D weight: the fc head
            assert torch.allclose(step1.weights[name], 2 * value - states[1][name])
            assert torch.allclose(step2.weights[name], 3 * value - 2 * states[1][name])
        else:                                       # conv, bias, BatchNorm: Θ^0's values
            assert torch.equal(step1.weights[name], value), name
    with pytest.raises(ValueError, match="reads 5 snapshots"):
        lincomb_candidates(states[:4], lincomb, steps=1, r=0.5)
