import importlib

import pytest
import torch

from know_kernels import KNOWNHead, nowcast
from know_kernels.kernels.nowcast import backend_status, resolve_backend


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


def test_precision_switch_reaches_every_backend_as_a_mode_it_has():
    from know_kernels.kernels.nowcast import PRECISION_ARGS, PRECISIONS
    from know_kernels.kernels.ops import nowcast_cpu, nowcast_cuda, nowcast_triton
    accepted = {"cpu": lambda kw: kw.get("products", "float32") in nowcast_cpu.PRODUCTS,
                "triton": lambda kw: kw["input_precision"] in nowcast_triton.PRECISIONS,
                "cuda": lambda kw: kw["mode"] in nowcast_cuda.MODES}
    assert set(PRECISION_ARGS) == set(accepted)
    for backend, modes in PRECISION_ARGS.items():
        assert set(modes) == set(PRECISIONS)
        assert all(accepted[backend](kw) for kw in modes.values()), backend
    # "float32" must stay the backends' accurate modes, the ones the 1e-5 tests hold.
    assert PRECISION_ARGS["triton"]["float32"] == {"input_precision": "ieee"}
    assert PRECISION_ARGS["cuda"]["float32"] == {"mode": "precise"}
    assert PRECISION_ARGS["cpu"]["float32"] == {}


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_cpu_backends_compute_in_float32_whatever_precision_allows(backend):
    # The CPU backend's "bf16" has its own tests (test_nowcast_cpu_bf16.py).
    if not backend_status(backend)[0]:
        pytest.skip(backend_status(backend)[1])
    head = KNOWNHead(seed=6)
    rows = torch.randn(129, 5)
    want = nowcast(rows, head, steps=2, backend=backend)
    for precision in ("tf32", "bf16") if backend == "reference" else ("tf32",):
        assert torch.equal(nowcast(rows, head, steps=2, backend=backend, precision=precision),
                           want)
    with pytest.raises(ValueError, match="precision must be one of"):
        nowcast(rows, head, backend=backend, precision="fp8")


def test_precision_is_passed_to_the_kernel(monkeypatch):
    # The package exports the function under the module's name.
    nowcast_module = importlib.import_module("know_kernels.kernels.nowcast")
    seen = []

    class Fake:
        MAX_WINDOW = None

        @staticmethod
        def run(rows, packed, *, out, **kw):
            seen.append(kw)
            out.zero_()

    monkeypatch.setattr(nowcast_module, "resolve_backend", lambda *a, **k: "triton")
    monkeypatch.setattr(nowcast_module, "fused_module", lambda name, op, S: Fake)
    nowcast(torch.randn(3, 5), KNOWNHead(seed=7), precision="bf16")
    assert seen[-1]["input_precision"] == "bf16"
