"""l1_loss on the cpu backend (the fused nowcast step, and its VJP kernel with a sign
upstream: ops/vjp_cpu.py) against float64 autograd on the reference, on every instruction
set this machine can run (the ``isa`` fixture, kernels/conftest.py).  The VJP kernel's own
tests: test_vjp_cpu.py."""
import math

import pytest
import torch

from know_kernels import KNOWNHead, l1_loss, nowcast
from know_kernels.kernels.ops import nowcast_cpu, vjp_cpu

from support.l1_cases import assert_matches, case, clear_targets, reference
from support.rows import windows

AVAILABLE, WHY = vjp_cpu.available(torch.device("cpu"))
pytestmark = pytest.mark.skipif(not AVAILABLE, reason=f"fused VJP kernel absent: {WHY}")
SPACES = ("original", "normalised")


def kernel(rows, target, head, norm, loss_space):
    """l1_loss as a sum: the loss and the head's gradients times N, and all the gradients
    as one flat tensor."""
    head.zero_grad(set_to_none=True)
    loss = l1_loss(rows, target, head, backend="cpu", norm=norm, loss_space=loss_space)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    loss.backward()
    n = max(rows.shape[0], 1)
    grads = {k: p.grad * n for k, p in head.params_dict().items()}
    return loss.detach() * n, grads, torch.cat([g.flatten() for g in grads.values()])


def reference_sum(rows, target, head, norm, loss_space):
    loss, grads = reference(rows, target, head, norm, loss_space)
    n = max(rows.shape[0], 1)
    return loss * n, {k: g * n for k, g in grads.items()}


def check(rows, target, head, norm, loss_space):
    total, grads, _ = kernel(rows, target, head, norm, loss_space)
    assert_matches(total, grads, *reference_sum(rows, target, head, norm, loss_space))


@pytest.mark.parametrize("norm", ["wnn", "raw"])
@pytest.mark.parametrize("loss_space", SPACES)
def test_matches_float64_autograd(isa, norm, loss_space):
    head = KNOWNHead(S=5, norm=norm, seed=1)
    check(*case(1031, 5, 2, head, norm), head, norm, loss_space)


def test_row_counts_around_tiles_and_blocks(isa):
    """Each size with another of the four norm / loss space pairs."""
    tile = nowcast_cpu.tile_rows()
    block = tile * 32  # csrc/cpu/vjp_kernel.h: kVjpBlockTiles
    pairs = [(norm, space) for norm in ("wnn", "raw") for space in SPACES]
    for i, n in enumerate((0, 1, tile - 1, tile, tile + 1, block - 1, block + 1, 10007)):
        norm, space = pairs[i % len(pairs)]
        head = KNOWNHead(S=5, norm=norm, seed=3)
        rows, target = case(n, 5, n, head, norm)
        if n == 0:
            total, _, grad = kernel(rows, target, head, norm, space)
            assert float(total) == 0.0 and not grad.any()
            continue
        check(rows, target, head, norm, space)


@pytest.mark.parametrize("S", [2, 3, 9])
def test_window_lengths(isa, S):
    for norm, space in (("wnn", "normalised"), ("raw", "original")):
        head = KNOWNHead(S=S, norm=norm, seed=S)
        check(*case(307, S, S, head, norm), head, norm, space)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_rows(isa, dtype):
    """The reference runs on the same rounded rows, upcast to float64."""
    for norm in ("wnn", "raw"):
        head = KNOWNHead(S=5, norm=norm, seed=4)
        rows, _ = windows(409, 5, 5)
        rows = rows.to(dtype)
        target = clear_targets(rows.float(), head, norm, 6)
        for space in SPACES:
            check(rows, target, head, norm, space)


@pytest.mark.parametrize("norm", ["wnn", "raw"])
@pytest.mark.parametrize("loss_space", SPACES)
def test_exactly_zero_residuals_have_zero_gradient(isa, norm, loss_space):
    """sign(0) = 0.  Targets equal to the kernel's own float32 prediction (nowcast on the
    same instruction set computes it with the same instructions) make every e exactly 0:
    the loss and the whole gradient must be exactly 0.  With half of the rows so, the
    gradient must be the reference's over the other half alone; a kernel taking sign(0)
    as +-1 would add the zero rows' gradients."""
    head = KNOWNHead(S=5, norm=norm, seed=7)
    rows, target = case(611, 5, 8, head, norm)
    with torch.no_grad():
        own = nowcast(rows, head, backend="cpu", out_dtype=torch.float32)
    total, _, grad = kernel(rows, own, head, norm, loss_space)
    assert float(total) == 0.0 and not grad.any()

    zero = torch.arange(rows.shape[0]) % 2 == 0
    mixed = torch.where(zero, own, target)
    total, grads, _ = kernel(rows, mixed, head, norm, loss_space)
    assert_matches(total, grads, *reference_sum(rows[~zero], target[~zero], head, norm,
                                                loss_space))


def test_nan_target_counts_in_the_loss_not_the_gradient(isa):
    """sign(NaN) = 0, as torch's sgn: the loss is NaN, the gradient that of the other rows."""
    head = KNOWNHead(S=5, norm="wnn", seed=9)
    rows, target = case(100, 5, 10, head, "wnn")
    target[17] = math.nan
    total, grads, _ = kernel(rows, target, head, "wnn", "original")
    assert math.isnan(float(total))
    keep = torch.arange(100) != 17
    _, want = reference_sum(rows[keep], target[keep], head, "wnn", "original")
    assert_matches(torch.zeros(()), grads, torch.zeros(()), want)


def test_threads_give_identical_results(isa):
    """Rows are summed in fixed blocks added in block order, whatever the thread count."""
    head = KNOWNHead(S=5, norm="wnn", seed=11)
    rows, target = case(5 * 32 * nowcast_cpu.tile_rows() + 7, 5, 12, head, "wnn")
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            total, _, grad = kernel(rows, target, head, "wnn", "normalised")
            results.append((total, grad))
    finally:
        torch.set_num_threads(before)
    for total, grad in results[1:]:
        assert torch.equal(total, results[0][0]) and torch.equal(grad, results[0][1])
