"""The fused nowcast VJP's checks, shared by its GPU backends' tests (test_vjp_gpu.py) and
their CPU stand-ins (the Triton interpreter in test_vjp_triton.py, the CUDA emulator in
test_vjp_cuda_build.py).

Ground truth: torch autograd on ``reference.step_ref`` in float64, the gradient of
sum_i u_i pred_i with respect to every head parameter and to the rows.  The kernel's packed
gradient is carried back to the head's parameters through ``packing.pack`` by autograd, so
the comparison is per parameter of the head; the rows' gradient is compared separately on
constant rows (all values tied: the normalisation's scale is 2e-5, so their gradient is
about 1e5 times the others' and would hide them in one norm) and on the others.
"""
import torch

from know_kernels.kernels.packing import pack, packed_size
from know_kernels.kernels.reference import step_ref

from support.heads import make_head, packed_of, params64
from support.rows import rows_and_target

TOL = 1e-5
# bfloat16 / float16 rows: the kernel reads the same rounded values the reference does, so
# only its float32 arithmetic differs; the looser bound leaves room for the larger share of
# ties and exactly-zero differences that coarse values bring.
HALF_TOL = 1e-4


def reference(rows, head, upstream, norm):
    """float64 d(sum u pred)/d(head parameters) (dict) and d(...)/d(rows)."""
    params = params64(head, rows.device, requires_grad=True)
    w = rows.double().requires_grad_(True)
    total = (upstream.double() * step_ref(w, params, norm)).sum()
    grads = torch.autograd.grad(total, [w, *params.values()])
    return dict(zip(params, grads[1:])), grads[0]


def _rel(got, ref):
    got, ref = got.double(), ref.double()
    size = ref.norm()
    return ((got - ref).norm() / size).item() if size > 0 else (got - ref).norm().item()


def errors(grad_packed, grad_rows, rows, head, upstream, norm, constant=None):
    """Relative error of every head parameter's gradient and of the rows' gradient (on the
    rows where ``constant`` is True and on the others, when given)."""
    ref_params, ref_rows = reference(rows, head, upstream, norm)
    params = params64(head, rows.device, requires_grad=True)
    carried = torch.autograd.grad(pack(params, head.S), list(params.values()),
                                  grad_outputs=grad_packed.double())
    out = {f"head {name}": _rel(got, ref_params[name]) for name, got in zip(params, carried)}
    if grad_rows is not None:
        if constant is None or not constant.any():
            out["rows"] = _rel(grad_rows, ref_rows)
        else:
            out["rows (constant)"] = _rel(grad_rows[constant], ref_rows[constant])
            out["rows (others)"] = _rel(grad_rows[~constant], ref_rows[~constant])
    return out


def assert_close(errs, tol=TOL):
    worst = max(errs, key=errs.get)
    assert errs[worst] <= tol, f"{worst}: relative error {errs[worst]:.3g} > {tol}"


def call(run, rows, head, upstream, norm, *, row_grad=True, **kw):
    """One kernel call with its outputs poisoned with NaN first; returns (grad_packed,
    grad_rows or None)."""
    grad_packed = torch.full((packed_size(head.S),), float("nan"), device=rows.device)
    grad_rows = (torch.full(rows.shape, float("nan"), device=rows.device) if row_grad
                 else None)
    result = run(rows, packed_of(head, rows.device), upstream, S=head.S, norm=norm,
                 grad_packed=grad_packed, grad_rows=grad_rows, **kw)
    assert result is None
    assert not grad_packed.isnan().any(), "some grad_packed entries were not written"
    assert grad_rows is None or not grad_rows.isnan().any(), "some grad_rows entries were not written"
    return grad_packed, grad_rows


def case(n, *, dtype=torch.float32, norm="wnn", S=5, seed=0, constant_every=0, tied=False,
         biases=True, device="cpu"):
    """A head, weight-like rows, the constant rows' mask and a random upstream gradient.
    Every ``constant_every``-th row is constant (when > 0); with ``tied`` every 3rd row
    has two equal maxima and two equal minima (when S >= 5)."""
    head = make_head(S, norm, seed, biases=biases)
    rows, _ = rows_and_target(n, dtype, seed + 100, S=S, device=device)
    if tied and S >= 5:
        pattern = torch.zeros(S, device=device)
        pattern[1:3], pattern[3:5] = 2.0, -1.0
        rows[1::3] = (rows[1::3, :1].float() + 0.01 * pattern).to(dtype)
    constant = torch.zeros(n, dtype=torch.bool, device=device)
    if constant_every:
        constant[::constant_every] = True
        rows[constant] = rows[constant][:, :1].expand(-1, S).clone()
    gen = torch.Generator(device=device).manual_seed(seed + 200)
    upstream = torch.randn(n, generator=gen, device=device)
    return head, rows, constant, upstream


def check(run, n, *, norm="wnn", row_grad=True, run_kw=None, **kw):
    """Relative errors of one call (with the backend's own knobs ``run_kw``) on
    ``case(n, norm=norm, **kw)``."""
    head, rows, constant, upstream = case(n, norm=norm, **kw)
    grad_packed, grad_rows = call(run, rows, head, upstream, norm, row_grad=row_grad,
                                  **(run_kw or {}))
    if n == 0:
        return {"grad_packed max": float(grad_packed.abs().max())}
    return errors(grad_packed, grad_rows, rows, head, upstream, norm, constant)


def kink_case(run, *, device="cpu"):
    """Constant rows on a head with zero biases: x = d = 0, so the bottleneck's
    pre-activation is exactly 0 (relu'(0) = 0) and so is v (leaky_relu'(0) = slope), in
    float32 and float64 alike; and the scale's max and min tie on every value."""
    head, rows, constant, upstream = case(40, seed=3, constant_every=2, biases=False,
                                          device=device)
    grad_packed, grad_rows = call(run, rows, head, upstream, "wnn")
    return errors(grad_packed, grad_rows, rows, head, upstream, "wnn", constant)
