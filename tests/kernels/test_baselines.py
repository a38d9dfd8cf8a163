
import pytest
import torch

from know_kernels import KNOWN
from know_kernels.kernels.baselines import extrapolate, fit_exp
from know_kernels.pipeline.predict import predict

from support.checkpoints import forgetting_checkpoints

S = 5
T = torch.arange(1, S + 1, dtype=torch.float64)
AHEAD = torch.arange(S + 1, S + 4, dtype=torch.float64)


def coefficients(n):
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    return (torch.randn(n, 1, generator=g, dtype=torch.float64),
            torch.randn(n, 1, generator=g, dtype=torch.float64))


def test_linear_fit_is_exact_on_lines():
    a, b = coefficients(50)
    rows = a + b * T
    got = extrapolate(rows, "linear", steps=3, all_steps=True)
    torch.testing.assert_close(got, a + b * AHEAD, rtol=1e-12, atol=1e-12)


def test_linear_fit_matches_closed_form_least_squares():
    rows = torch.randn(30, S, dtype=torch.float64)
    X = torch.stack([torch.ones(S, dtype=torch.float64), T], 1)
    coef = torch.linalg.lstsq(X, rows.T).solution  # (2, N)
    want = coef[0] + coef[1] * (S + 1)
    torch.testing.assert_close(extrapolate(rows, "linear"), want, rtol=1e-10, atol=1e-12)


def test_log_fit_is_exact_on_log_curves():
    a, b = coefficients(50)
    rows = a + b * torch.log(T)
    got = extrapolate(rows, "log", steps=3, all_steps=True)
    torch.testing.assert_close(got, a + b * torch.log(AHEAD), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("rho", [0.37, 0.8, 1.6, 2.3])
def test_exp_fit_recovers_exponentials(rho):
    a, b = coefficients(40)
    rows = a + b * rho ** T
    a_fit, b_fit, rho_fit = fit_exp(rows, T)
    torch.testing.assert_close(rho_fit, torch.full_like(rho_fit, rho), rtol=1e-6, atol=1e-6)
    got = extrapolate(rows, "exp", steps=3, all_steps=True)
    torch.testing.assert_close(got, a + b * rho ** AHEAD, rtol=1e-5, atol=1e-6)


def test_exp_fit_is_finite_on_non_monotone_and_constant_rows():
    rows = torch.tensor([[1.0, 3.0, 1.0, 3.0, 1.0], [2.0] * 5, [0.0, 0.0, 0.0, 0.0, 1e-9]],
                        dtype=torch.float64)
    got = extrapolate(rows, "exp", steps=3, all_steps=True)
    assert torch.isfinite(got).all()
    assert torch.allclose(got[1], torch.full((3,), 2.0, dtype=torch.float64))


def test_taskvector_is_iterated():
    rows = torch.randn(20, S, dtype=torch.float64)
    lam = 0.2
    theta0, theta1 = rows[:, -1], rows[:, -2]
    first = theta0 + lam * (theta0 - theta1)
    second = first + lam * (first - theta0)
    got = extrapolate(rows, "taskvector", steps=2, all_steps=True, lam=lam)
    torch.testing.assert_close(got[:, 0], first)
    torch.testing.assert_close(got[:, 1], second)
    torch.testing.assert_close(extrapolate(rows, "taskvector", lam=0.5), theta0 + 0.5 * (theta0 - theta1))


def test_dtype_and_errors():
    rows = torch.randn(4, S)
    assert extrapolate(rows, "linear").dtype == torch.float32
    assert extrapolate(rows.bfloat16(), "log").dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown baseline 'quadratic'"):
        extrapolate(rows, "quadratic")
    with pytest.raises(ValueError, match="S >= 2"):
        extrapolate(torch.randn(4, 1), "linear")
    with pytest.raises(ValueError, match="steps"):
        extrapolate(rows, "linear", steps=0)


@pytest.mark.parametrize("method", ["linear", "log", "exp", "taskvector"])
def test_baselines_through_predict(method):
    cks = forgetting_checkpoints()
    out = predict(cks, method=method, steps=2)
    rows = torch.stack([ck["3.weight"].reshape(-1) for ck in reversed(cks)], dim=1)
    want = extrapolate(rows, method, steps=2, all_steps=True)
    for k in range(2):
        torch.testing.assert_close(out[k]["3.weight"].reshape(-1), want[:, k])
        assert torch.equal(out[k]["1.running_mean"], cks[0]["1.running_mean"])


def test_predict_method_errors():
    cks = forgetting_checkpoints()
    with pytest.raises(ValueError, match="unknown method 'cubic'.*'known', 'linear'"):
        predict(cks, KNOWN.init(), method="cubic")


def test_predict_defaults_to_the_shipped_known():
    cks = forgetting_checkpoints()
    got, want = predict(cks), predict(cks, KNOWN.pretrained())
    assert all(torch.equal(got[0][k], want[0][k]) for k in want[0])
