"""pytest-benchmark: one meta-training step (l1_loss forward and backward, then Adam), fused
CPU kernel against autograd on the eager reference, 2 threads.

    pytest bench/test_bench_l1.py --benchmark-only

Not part of the default test run (pytest collects tests/ only).  Numbers for
bench/RESULTS.md come from bench_l1.py, which also measures the matmul ceiling.
"""
import pytest
import torch

from bench_l1 import LOSS_SPACE, batch
from know_kernels import KNOWNHead, l1_loss
from know_kernels.kernels.ops import vjp_cpu

pytest.importorskip("pytest_benchmark")

FUSED, WHY = vjp_cpu.available(torch.device("cpu"))
THREADS = 2


@pytest.fixture(scope="module", params=[1 << 16, 1 << 20], ids=["64K", "1M"])
def data(request):
    return batch(request.param)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_meta_training_step(benchmark, data, backend):
    if backend == "cpu" and not FUSED:
        pytest.skip(f"fused CPU kernels absent: {WHY}")
    rows, target = data
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    head = KNOWNHead(S=5, norm="wnn", seed=0)
    opt = torch.optim.Adam(head.parameters(), lr=1e-3)
    losses = []

    def step():
        opt.zero_grad(set_to_none=True)
        loss = l1_loss(rows, target, head, backend=backend, loss_space=LOSS_SPACE)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))

    benchmark.group = f"meta-training step, N={rows.shape[0]:,}, {THREADS} threads"
    benchmark.extra_info.update(rows=rows.shape[0], threads=THREADS)
    try:
        benchmark.pedantic(step, rounds=3, warmup_rounds=1)
    finally:
        torch.set_num_threads(before)
    assert all(torch.isfinite(torch.tensor(losses)))
