"""pytest-benchmark: the eager reference and the fused CPU kernel on the same rows.

    pytest bench/test_bench_nowcast_cpu.py --benchmark-only

Not part of the default test run (pytest collects tests/ only).  Numbers for
bench/RESULTS.md come from bench_nowcast_cpu.py, which also measures the matmul ceiling.
"""
import pytest
import torch

from know_kernels import KNOWNHead, nowcast
from know_kernels.kernels.ops import nowcast_cpu
from support.rows import trajectories  # tests/support, on the path by pyproject's pytest options

pytest.importorskip("pytest_benchmark")

N = 200_000
S = 5
FUSED, WHY = nowcast_cpu.available(torch.device("cpu"))


@pytest.fixture(scope="module")
def head():
    return KNOWNHead(S=S, norm="wnn", seed=0)


@pytest.fixture(scope="module")
def rows():
    return trajectories(N, S, 0, drift=False)


def run(benchmark, rows, head, backend, steps, precision="float32"):
    out = torch.empty(rows.shape[0])
    benchmark.extra_info.update(rows=rows.shape[0], steps=steps, threads=torch.get_num_threads(),
                                precision=precision)
    benchmark.pedantic(nowcast, args=(rows, head),
                       kwargs=dict(steps=steps, backend=backend, out=out, precision=precision),
                       rounds=3, warmup_rounds=1)
    return out


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_nowcast_float32(benchmark, rows, head, backend, steps):
    if backend == "cpu" and not FUSED:
        pytest.skip(f"fused CPU kernel absent: {WHY}")
    benchmark.group = f"nowcast N={N:,} float32 steps={steps}"
    out = run(benchmark, rows, head, backend, steps)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_nowcast_bfloat16(benchmark, rows, head, backend):
    if backend == "cpu" and not FUSED:
        pytest.skip(f"fused CPU kernel absent: {WHY}")
    benchmark.group = f"nowcast N={N:,} bfloat16 steps=1"
    out = run(benchmark, rows.to(torch.bfloat16), head, backend, 1)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("precision", ["float32", "bf16"])
def test_nowcast_cpu_products(benchmark, rows, head, precision):
    """The CPU kernel's float32 and bfloat16 products (bench_nowcast_cpu_bf16.py for the
    table against the matmul ceilings)."""
    if not FUSED:
        pytest.skip(f"fused CPU kernel absent: {WHY}")
    if precision == "bf16" and nowcast_cpu.bf16_kernel()[0] is None:
        pytest.skip(f"no bf16 kernel here: {nowcast_cpu.bf16_kernel()[1]}")
    benchmark.group = f"nowcast cpu N={N:,} bfloat16 rows steps=1, products"
    out = run(benchmark, rows.to(torch.bfloat16), head, "cpu", 1, precision)
    assert torch.isfinite(out).all()
