"""Fixtures of the kernel tests: the instruction sets of the fused CPU kernels and the
Triton worker processes."""
import pytest
import torch

from know_kernels._ext import _C
from know_kernels.kernels.ops import nowcast_cpu

from support.triton_workers import worker_pool

RUNNABLE = _C.runnable_isas() if nowcast_cpu.available(torch.device("cpu"))[0] else []


@pytest.fixture(params=RUNNABLE)
def isa(request, monkeypatch):
    """Every instruction set this machine can run, forced with KNOW_KERNELS_ISA."""
    monkeypatch.setenv(nowcast_cpu.ISA_ENV, request.param)
    return request.param


# Module scope: each test module gets its own workers.
@pytest.fixture(scope="module")
def interpreter():
    """Runs fn(*args, **kw) where Triton interprets kernels on CPU tensors."""
    pool = worker_pool(True)
    yield lambda fn, *args, **kw: pool.submit(fn, *args, **kw).result()
    pool.shutdown()


@pytest.fixture(scope="module")
def compiler():
    """Runs fn(*args, **kw) where Triton compiles for a GPU (no GPU needed to compile)."""
    pool = worker_pool(False)
    yield lambda fn, *args, **kw: pool.submit(fn, *args, **kw).result()
    pool.shutdown()
