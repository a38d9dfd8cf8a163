"""The fused L1 training step's checks, shared by its GPU backends' tests (test_l1_gpu.py)
and their CPU stand-ins (the Triton interpreter in test_l1_triton.py, the CUDA emulator in
test_l1_cuda_build.py).  Every check compares the loss and, tensor by tensor, the gradient
two ways:

* per folded tensor of the packed vector, against autograd through a float64 forward of
  the folded head (``packing.py``'s algebra) on the kernel's own float32 weights;
* per parameter of the head, against autograd through ``reference.step_ref`` in float64,
  the kernel's packed gradient being carried back through ``packing.pack`` by autograd.

A gradient's relative error is taken against the larger of the reference gradient and the
gradient of the plain sum of residuals (same rows, every sign(e) replaced by +1).  An L1
gradient sums terms whose signs come from the residuals, and where those cancel no float32
sum can be more accurate than the terms' own size allows: in the kink test bo's gradient is
1e-3, from 40 terms of size about 1, and float32 summation leaves 1e-5 of it.  A wrong sign
anywhere still shows at full size against either measure.
"""
import torch

from know_kernels.kernels.packing import folded_shapes, pack, packed_offsets, packed_size
from know_kernels.kernels.reference import LEAKY_SLOPE, normalise, step_ref

from support.heads import make_head, packed_of, params64
from support.rows import rows_and_target

TOL = 1e-5


def _l1(pred, target, scale, loss_space, keep):
    """The L1 loss and the plain sum of the residuals it takes the absolute values of."""
    e = pred - target
    if loss_space == "normalised":
        e = e / scale
    if keep is not None:
        e = e * keep
    return e.abs().sum(), e.sum()


def folded_reference(rows, target, packed, S, norm, loss_space, keep=None):
    """float64 loss, d loss / d packed and d(sum of residuals) / d packed, through the
    folded head's forward."""
    p = packed.detach().to(torch.float64).requires_grad_(True)
    offsets = packed_offsets(S)
    t = {name: p[offsets[name]:offsets[name] + torch.Size(shape).numel()].view(shape)
         for name, shape in folded_shapes(S).items()}
    x, scale, shift = normalise(rows.double(), norm)
    y = t["bo"][0]
    for i, (prefix, inp) in enumerate((("x", x), ("d", x[:, 1:] - x[:, :-1]))):
        f = {role: t[f"{prefix}.{role}"] for role in ("w1", "b1", "g", "gb", "wb", "bb", "wc",
                                                      "bc", "w2", "a2", "b2")}
        h = inp @ f["w1"] + f["b1"]
        z = torch.relu(inp @ f["g"] + f["gb"])
        b = z @ f["wb"] + f["bb"]
        c = z @ f["wc"] + f["bc"]
        v = (b * torch.exp(c * h)) @ f["w2"] + z @ f["a2"] + f["b2"]
        y = y + torch.nn.functional.leaky_relu(v, LEAKY_SLOPE) @ t["wo"][32 * i:32 * (i + 1)]
    pred = (x[:, -1] + torch.tanh(y)) * scale + shift
    loss, plain = _l1(pred, target.double(), scale, loss_space, keep)
    (grad,) = torch.autograd.grad(loss, p, retain_graph=True)
    (unsigned,) = torch.autograd.grad(plain, p)
    return loss.detach(), grad, unsigned


def head_reference(rows, target, head, loss_space, keep=None):
    """float64 loss, and its gradient and that of the sum of residuals for every head
    parameter, through step_ref."""
    params = params64(head, rows.device, requires_grad=True)
    w = rows.double()
    _, scale, _ = normalise(w, head.norm)
    loss, plain = _l1(step_ref(w, params, head.norm), target.double(), scale, loss_space, keep)
    grads = torch.autograd.grad(loss, list(params.values()), retain_graph=True)
    unsigned = torch.autograd.grad(plain, list(params.values()))
    return loss.detach(), dict(zip(params, zip(grads, unsigned)))


def _rel(got, ref, unsigned=None):
    got, ref = got.double(), ref.double()
    size = ref.norm() if unsigned is None else torch.maximum(ref.norm(), unsigned.norm())
    return ((got - ref).norm() / size).item()


def errors(loss, grad, rows, target, head, loss_space, keep=None):
    """Relative error of the loss and of every gradient tensor (folded and head)."""
    S, norm = head.S, head.norm
    packed = packed_of(head, rows.device)
    ref_loss, ref_grad, unsigned = folded_reference(rows, target, packed, S, norm, loss_space,
                                                    keep)
    out = {"loss": abs(float(loss) - float(ref_loss)) / abs(float(ref_loss))}
    offsets = packed_offsets(S)
    for name, shape in folded_shapes(S).items():
        at = slice(offsets[name], offsets[name] + torch.Size(shape).numel())
        out[f"packed {name}"] = _rel(grad[at], ref_grad[at], unsigned[at])
    # The kernel's packed gradient, carried back to the head's parameters.
    params = params64(head, rows.device, requires_grad=True)
    carried = torch.autograd.grad(pack(params, S), list(params.values()), grad_outputs=grad)
    head_loss, head_grads = head_reference(rows, target, head, loss_space, keep)
    out["loss vs step_ref"] = abs(float(loss) - float(head_loss)) / abs(float(head_loss))
    for (name, (ref, ref_unsigned)), got in zip(head_grads.items(), carried):
        out[f"head {name}"] = _rel(got, ref, ref_unsigned)
    return out


def assert_close(errs, tol=TOL):
    worst = max(errs, key=errs.get)
    assert errs[worst] <= tol, f"{worst}: relative error {errs[worst]:.3g} > {tol}"


def call(run, rows, target, head, loss_space, **kw):
    """One kernel call with the gradient poisoned first; returns (loss, grad)."""
    grad = torch.full((packed_size(head.S),), float("nan"), device=rows.device)
    loss = run(rows, target, packed_of(head, rows.device), S=head.S, norm=head.norm,
               loss_space=loss_space, grad=grad, **kw)
    assert loss.dim() == 0 and loss.dtype == torch.float32
    assert not grad.isnan().any(), "some gradient entries were not written"
    return loss, grad


ZERO_EVERY = 64  # a multiple of every block size the kernels use


def zero_residual_case(run, n, norm, loss_space, *, device="cpu", seed=0):
    """Rows 0, 64, 128, ... get as target the kernel's own float32 prediction, so their
    residual is exactly 0 and (sign(0) = 0) they must add nothing to the gradient; the
    others are ordinary rows.  The reference masks the same rows out.  A kernel that took
    sign(0) as +1 or -1 would be off by those rows' whole share of the gradient (returned
    as the second value, so the test can check that it is far above the tolerance).

    The prediction is read off the kernel itself: for one row alone with target 0 in
    original units, the loss is |pred| exactly (one subtraction of 0, one abs, a sum of one
    term), and the sign comes from the float64 reference, which is far from 0 on these
    rows.  A row's float32 prediction may depend on where it sits in a block (the
    interpreter's numpy matmul gives some rows of a tile a different instruction sequence:
    1-ulp differences were seen), so the zero rows sit where the one-row call puts its row,
    first in a block, for any block size dividing 64."""
    head = make_head(5, norm, seed)
    rows, target = rows_and_target(n, torch.float32, seed + 7, device=device)
    zero = torch.arange(n, device=device) % ZERO_EVERY == 0
    packed = packed_of(head, device)
    pred64 = step_ref(rows.double(), params64(head, device, requires_grad=True), norm).detach()
    grad = torch.empty(packed_size(5), device=device)
    for i in zero.nonzero()[:, 0].tolist():
        magnitude = run(rows[i:i + 1], torch.zeros(1, device=device), packed, S=5, norm=norm,
                        loss_space="original", grad=grad)
        target[i] = torch.copysign(magnitude, pred64[i].float())
    loss, grad = call(run, rows, target, head, loss_space)
    keep = (~zero).double()
    errs = errors(loss, grad, rows, target, head, loss_space, keep)
    # The same rows counted with sign +1 would differ from the reference by this much.
    counted = folded_reference(rows, target, packed, 5, norm, loss_space)[1]
    masked = folded_reference(rows, target, packed, 5, norm, loss_space, keep)[1]
    return errs, _rel(counted, masked)


def kink_case(run, *, device="cpu"):
    """Constant rows (every snapshot equal) on a head with zero biases: x = d = 0, so the
    bottleneck's pre-activation is exactly 0 (relu'(0) = 0) and so is v (leaky_relu'(0) =
    slope), in float32 and in float64 alike.  Mixed with ordinary rows.  The loss is in
    normalised units: a constant row's scale is 2e-5, which in original units would shrink
    its share of the gradient below the tolerance."""
    head = make_head(5, "wnn", 3, biases=False)
    rows, target = rows_and_target(40, torch.float32, 11, device=device)
    rows[::2] = rows[::2, :1].expand(-1, 5).clone()
    loss, grad = call(run, rows, target, head, "normalised")
    return errors(loss, grad, rows, target, head, "normalised")


