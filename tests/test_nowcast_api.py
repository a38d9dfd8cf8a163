import pytest
import torch

from know_kernels import KNOWNHead, nowcast
from know_kernels.nowcast import backend_status, resolve_backend


def test_reference_backend_writes_into_out_and_poisoned_rows_are_overwritten():
    head = KNOWNHead(seed=1)
    rows = torch.randn(37, 5)
    out = torch.full((37, 2), float("nan"))
    got = nowcast(rows, head, steps=2, all_steps=True, backend="reference", out=out)
    assert got is out and torch.isfinite(out).all()
    assert torch.equal(out[:, 1], nowcast(rows, head, steps=2, backend="reference"))


def test_non_contiguous_rows_are_handled():
    head = KNOWNHead(seed=2)
    big = torch.randn(5, 40)
    rows = big.t()  # (40, 5), non-contiguous
    assert not rows.is_contiguous()
    assert torch.equal(nowcast(rows, head, backend="reference"),
                       nowcast(rows.contiguous(), head, backend="reference"))


def test_float64_auto_uses_reference_and_returns_float64():
    head = KNOWNHead(seed=3)
    assert resolve_backend("auto", torch.device("cpu"), torch.float64) == "reference"
    assert nowcast(torch.randn(4, 5, dtype=torch.float64), head).dtype == torch.float64


def test_bad_arguments():
    head = KNOWNHead(seed=4)
    with pytest.raises(ValueError, match="S=5"):
        nowcast(torch.randn(3, 4), head)
    with pytest.raises(ValueError, match="2-D"):
        nowcast(torch.randn(3), head)
    with pytest.raises(TypeError, match="not supported"):
        nowcast(torch.zeros(3, 5, dtype=torch.int32), head)
    with pytest.raises(ValueError, match="steps"):
        nowcast(torch.randn(3, 5), head, steps=0)
    with pytest.raises(ValueError, match="norm must be"):
        nowcast(torch.randn(3, 5), head, norm="minmax")
    with pytest.raises(ValueError, match="out must be"):
        nowcast(torch.randn(3, 5), head, out=torch.empty(4))
    with pytest.raises(ValueError, match="unknown backend"):
        nowcast(torch.randn(3, 5), head, backend="fpga")
    assert backend_status("reference") == (True, "plain PyTorch")


def test_empty_input():
    head = KNOWNHead(seed=5)
    assert nowcast(torch.empty(0, 5), head).shape == (0,)
    assert nowcast(torch.empty(0, 5), head, steps=3, all_steps=True).shape == (0, 3)
