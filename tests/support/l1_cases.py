"""What the l1_loss tests of the op and of the CPU kernel share (test_l1.py,
test_l1_cpu.py): targets kept clear of the prediction, the float64 autograd reference and
the comparison of every gradient."""
import copy

import torch

from know_kernels import l1_loss
from know_kernels.kernels.reference import normalise, nowcast_ref

from support.heads import params64
from support.rows import windows

TOL = 1e-5


def clear_targets(rows, head, norm, seed):
    """Targets 1% to 31% of the row's normalisation scale (1 for raw) above or below the
    float64 prediction: residuals of the size a head's errors have, far enough from 0 that
    float32 rounding of the prediction (~1e-7 of its magnitude) neither flips a sign(e),
    which would flip that row's whole gradient, nor dominates |e|."""
    g = torch.Generator().manual_seed(seed)
    x = rows.double()
    pred = nowcast_ref(x, params64(head), norm)
    scale = normalise(x, norm)[1] * torch.ones_like(pred)
    gap = (0.01 + 0.3 * torch.rand(rows.shape[0], generator=g, dtype=torch.float64)) * scale
    sign = torch.randint(0, 2, (rows.shape[0],), generator=g) * 2 - 1
    return (pred + sign * gap).float()


def case(n, S, seed, head, norm):
    rows, _ = windows(n, S, seed)
    return rows, clear_targets(rows, head, norm, seed + 1)


def grads_of(loss, head):
    loss.backward()
    return {k: v.grad.detach().clone() for k, v in head.params_dict().items()}


def reference(rows, target, head, norm, loss_space):
    """float64 autograd on exactly the values the kernel sees (rows already rounded)."""
    head64 = copy.deepcopy(head).double()
    loss = l1_loss(rows.double(), target.double(), head64, backend="reference", norm=norm,
                   loss_space=loss_space)
    return loss.detach(), grads_of(loss, head64)


def fused(rows, target, head, backend, norm, loss_space):
    head.zero_grad(set_to_none=True)
    loss = l1_loss(rows, target, head, backend=backend, norm=norm, loss_space=loss_space)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    return loss.detach(), grads_of(loss, head)


def relative(got, want):
    want = want.double()
    if want.norm() == 0:
        return float((got.double() - want).norm())
    return float((got.double() - want).norm() / want.norm())


def assert_matches(got_loss, got, want_loss, want, tol=TOL):
    """Loss, every gradient tensor and all of them together within tol (relative norm)."""
    assert relative(got_loss, want_loss) <= tol, (float(got_loss), float(want_loss))
    errors = {k: relative(got[k], want[k]) for k in want}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= tol, f"{worst}: relative error {errors[worst]:.2e} > {tol:.0e}"
    flat = torch.cat([got[k].double().flatten() for k in want])
    assert relative(flat, torch.cat([want[k].flatten() for k in want])) <= tol
