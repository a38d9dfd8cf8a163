"""l1_loss: the public op, its dispatch, autograd, torch.compile and meta-training use."""
import math
import subprocess
import sys

import pytest
import torch

from know_kernels import KNOWNHead, l1_loss
from know_kernels.kernels.l1 import backend_status, l1_reference, resolve_backend
from know_kernels.research.metatrain import MetaTrainConfig, meta_train

from support.heads import packed_of
from support.l1_cases import assert_matches, case, fused, reference
from support.rows import strided, windows
from support.stores import synthetic_store

CPU = torch.device("cpu")
FUSED_CPU = backend_status("cpu", CPU)[0]
needs_cpu = pytest.mark.skipif(not FUSED_CPU, reason="fused CPU VJP kernel absent")
SPACES = ("original", "normalised")


@needs_cpu
@pytest.mark.parametrize("norm", ["wnn", "raw"])
@pytest.mark.parametrize("loss_space", SPACES)
def test_fused_op_matches_float64_autograd(norm, loss_space):
    """Through pack, the custom op and its autograd formula to the head's parameters."""
    head = KNOWNHead(S=5, norm=norm, seed=1)
    rows, target = case(2003, 5, 2, head, norm)
    assert_matches(*fused(rows, target, head, "cpu", norm, loss_space),
                   *reference(rows, target, head, norm, loss_space))


@pytest.mark.parametrize("loss_space", SPACES)
def test_reference_backend_in_float32(loss_space):
    head = KNOWNHead(S=5, norm="wnn", seed=3)
    rows, target = case(500, 5, 4, head, "wnn")
    assert_matches(*fused(rows, target, head, "reference", "wnn", loss_space),
                   *reference(rows, target, head, "wnn", loss_space), tol=1e-4)


def test_normalised_space_is_the_original_divided_by_the_scale():
    head = KNOWNHead(S=5, norm="wnn", seed=5)
    rows, target = case(50, 5, 6, head, "wnn")
    rows, target = rows[:1].double(), target[:1].double()
    scale = 2 * (rows.max() - rows.min() + 1e-8 + 1e-5)
    original = l1_loss(rows, target, head, loss_space="original")
    torch.testing.assert_close(l1_loss(rows, target, head, loss_space="normalised"),
                               original / scale)
    raw = KNOWNHead(S=5, norm="raw", seed=5)
    torch.testing.assert_close(l1_loss(rows, target, raw, loss_space="normalised"),
                               l1_loss(rows, target, raw, loss_space="original"))


@pytest.mark.parametrize("backend", ["reference"] + (["cpu"] if FUSED_CPU else []))
def test_zero_rows_give_zero_loss_and_zero_gradients(backend):
    head = KNOWNHead(S=5, seed=7)
    loss = l1_loss(torch.zeros(0, 5), torch.zeros(0), head, backend=backend)
    assert loss.dim() == 0 and float(loss.detach()) == 0.0
    loss.backward()
    for name, p in head.named_parameters():
        assert p.grad is not None and not p.grad.any(), name


@needs_cpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_rows_through_the_op(dtype):
    head = KNOWNHead(S=5, norm="wnn", seed=8)
    rows, target = case(301, 5, 9, head, "wnn")
    rows = rows.to(dtype)
    assert_matches(*fused(rows, target, head, "cpu", "wnn", "normalised"),
                   *reference(rows, target, head, "wnn", "normalised"))


@needs_cpu
def test_non_contiguous_inputs():
    head = KNOWNHead(S=5, norm="wnn", seed=10)
    rows, target = case(157, 5, 11, head, "wnn")
    view, spaced = strided(rows.t()).t(), strided(target)
    assert not view.is_contiguous() and not spaced.is_contiguous()
    want = fused(rows, target, head, "cpu", "wnn", "original")
    got = fused(view, spaced, head, "cpu", "wnn", "original")
    assert torch.equal(got[0], want[0])
    for k in want[1]:
        assert torch.equal(got[1][k], want[1][k]), k


@needs_cpu
def test_float64_target_and_norm_override():
    head = KNOWNHead(S=5, norm="wnn", seed=12)
    rows, target = case(64, 5, 13, head, "raw")
    got = l1_loss(rows, target.double(), head, backend="cpu", norm="raw")
    want = l1_loss(rows.double(), target.double(), head, backend="reference", norm="raw")
    got, want = float(got.detach()), float(want.detach())
    assert abs(got - want) <= 1e-6 * want


def test_dispatch():
    assert resolve_backend("auto", CPU, torch.float64) == "reference"
    assert resolve_backend("auto", CPU, torch.float32) == ("cpu" if FUSED_CPU else "reference")
    assert backend_status("reference", CPU) == (True, "plain PyTorch")
    ok, why = backend_status("cuda", CPU)
    assert not ok and why
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        backend_status("tpu")
    with pytest.raises(RuntimeError, match="backend 'cuda' is not usable"):
        l1_loss(torch.zeros(2, 5), torch.zeros(2), KNOWNHead(S=5), backend="cuda")


def test_clear_errors():
    head = KNOWNHead(S=5, seed=14)
    rows, target = windows(6, 5, 15)
    cases = [
        ((rows[0], target), ValueError, "rows must be a 2-D"),
        ((rows[:, :4], target), ValueError, "4 snapshots per row but the head expects S=5"),
        ((rows.int(), target), TypeError, "rows dtype"),
        ((rows, target[:5]), ValueError, r"target must be a \(6,\) tensor"),
        ((rows, target[:, None]), ValueError, "target must be"),
        ((rows, target.int()), TypeError, "target must be a floating-point"),
        ((rows, target.to("meta")), ValueError, "target is on meta but rows are on cpu"),
    ]
    for args, error, match in cases:
        with pytest.raises(error, match=match):
            l1_loss(*args, head)
    with pytest.raises(ValueError, match="loss_space must be one of"):
        l1_loss(rows, target, head, loss_space="log")
    with pytest.raises(ValueError, match="norm must be one of"):
        l1_loss(rows, target, head, norm="minmax")
    if FUSED_CPU:
        with pytest.raises(TypeError, match="use backend='reference' for float64"):
            l1_loss(rows.double(), target, head, backend="cpu")
        with pytest.raises(ValueError, match="head only"):
            l1_loss(rows.clone().requires_grad_(), target, head, backend="cpu")


@needs_cpu
def test_custom_op_registration():
    """Schema, fake (meta) implementation and autograd registration, as torch checks them."""
    head = KNOWNHead(S=5, norm="wnn", seed=16)
    rows, _ = case(40, 5, 17, head, "wnn")
    packed = packed_of(head).requires_grad_()
    torch.library.opcheck(torch.ops.know_kernels.nowcast_step.default,
                          (rows, packed, 5, "wnn", "cpu"),
                          test_utils=("test_schema", "test_autograd_registration",
                                      "test_faketensor"))


@needs_cpu
def test_torch_compile():
    """No graph break in l1_loss (the backend choice is constant, the op opaque), and the
    compiled loss and gradients equal the eager ones."""
    head = KNOWNHead(S=5, norm="wnn", seed=18)
    rows, target = case(100, 5, 19, head, "wnn")
    eager = fused(rows, target, head, "cpu", "wnn", "normalised")
    compiled = torch.compile(
        lambda r, t: l1_loss(r, t, head, backend="cpu", loss_space="normalised"),
        fullgraph=True)
    head.zero_grad(set_to_none=True)
    loss = compiled(rows, target)
    loss.backward()
    torch.testing.assert_close(loss.detach(), eager[0], rtol=1e-6, atol=0)
    for k, p in head.params_dict().items():
        torch.testing.assert_close(p.grad, eager[1][k], rtol=1e-5, atol=1e-8)


@needs_cpu
def test_meta_training_with_the_fused_kernel_follows_the_reference(tmp_path):
    """Adam steps with either backend: every step's loss and the trained head agree
    closely.  Adam divides by the gradient's running size, so float32 noise in the tiniest
    gradient entries moves those parameters by up to the learning rate: the heads are
    compared as a whole, not entry by entry."""
    store = synthetic_store(tmp_path / "store", runs=3, rows=300)
    cfg = dict(epochs=1, batch_size=128, lr=1e-3, chunk_rows=200, mix_chunks=3,
               heads=("fc",), reg_bias=0.0, checkpoint_every=1000, loss_space="normalised",
               val_architectures=("densenet",), val_datasets=())
    losses, trained = {}, {}
    for backend in ("cpu", "reference"):
        seen = losses[backend] = []
        known, _ = meta_train(store, MetaTrainConfig(backend=backend, **cfg),
                              progress=lambda head, step, total, loss: seen.append(loss))
        trained[backend] = torch.cat([p.detach().flatten() for p in known["fc"].parameters()])
    assert len(losses["cpu"]) == len(losses["reference"]) > 5
    for a, b in zip(losses["cpu"], losses["reference"]):
        assert math.isclose(a, b, rel_tol=1e-5)
    change = (trained["cpu"] - trained["reference"]).norm() / trained["reference"].norm()
    assert float(change) < 1e-5


def test_reference_is_differentiable_in_the_data():
    head = KNOWNHead(S=5, seed=20)
    rows, target = windows(10, 5, 21)
    rows = rows.double().requires_grad_()
    l1_reference(rows, target.double(), head).backward()
    assert rows.grad is not None and torch.isfinite(rows.grad).all()


def test_reference_fallback_without_the_extension():
    script = r"""
import sys
sys.modules["know_kernels._C"] = None  # makes `from . import _C` raise ImportError
import torch
from know_kernels import KNOWNHead, l1_loss
from know_kernels.kernels.l1 import backend_status, resolve_backend
assert resolve_backend("auto", torch.device("cpu"), torch.float32) == "reference"
assert not backend_status("cpu")[0]
head = KNOWNHead(seed=0)
loss = l1_loss(torch.randn(10, 5), torch.randn(10), head)
loss.backward()
assert torch.isfinite(loss) and head.bo.grad is not None
"""
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
