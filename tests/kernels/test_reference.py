import numpy as np
import pytest
import torch

from know_kernels import KNOWNHead, num_params
from know_kernels.kernels.packing import fold, pack, packed_offsets, packed_size, folded_shapes
from know_kernels.kernels.reference import nowcast_ref, normalise, param_shapes, step_ref

from support import spec_numpy


def fresh_head(S=5, norm="wnn"):
    return KNOWNHead(S, norm, seed=int(torch.randint(0, 2**31, (1,))))


def test_parameter_count_matches_paper():
    assert num_params(5) == 9425
    head = KNOWNHead(5)
    assert sum(p.numel() for p in head.parameters()) == 9425
    assert sum(p.numel() for p in head.x.parameters()) == 4712
    assert sum(p.numel() for p in head.d.parameters()) == 4648


@pytest.mark.parametrize("S", [2, 5, 7])
def test_param_shapes_scale_with_S(S):
    shapes = param_shapes(S)
    assert shapes["x.w1"] == (S, 64) and shapes["d.w1"] == (S - 1, 64)
    assert num_params(S) == num_params(5) + 64 * 2 * (S - 5)


def test_S_below_two_refused():
    with pytest.raises(ValueError, match="S must be at least 2"):
        KNOWNHead(1)


@pytest.mark.parametrize("norm", ["wnn", "raw"])
@pytest.mark.parametrize("S", [3, 5])
def test_reference_matches_independent_numpy_derivation(norm, S):
    head = fresh_head(S, norm)
    rows = torch.randn(301, S, dtype=torch.float64) * 0.1
    params = {k: v.detach().double() for k, v in head.params_dict().items()}
    ours = nowcast_ref(rows, params, norm, steps=3, all_steps=True).numpy()
    theirs = spec_numpy.predict(rows.numpy(), spec_numpy.layers_of(head), norm, 3)
    np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-12)


def test_float32_reference_close_to_float64():
    head = fresh_head()
    rows = torch.randn(500, 5, dtype=torch.float64) * 0.05
    p32 = {k: v.detach() for k, v in head.params_dict().items()}
    p64 = {k: v.double() for k, v in p32.items()}
    out32 = nowcast_ref(rows.float(), p32, "wnn", steps=2)
    out64 = nowcast_ref(rows, p64, "wnn", steps=2)
    assert out32.dtype == torch.float32 and out64.dtype == torch.float64
    assert float((out32.double() - out64).norm() / out64.norm()) < 1e-6


def test_window_slides_with_each_prediction():
    head = fresh_head()
    p = {k: v.detach().double() for k, v in head.params_dict().items()}
    w = torch.randn(40, 5, dtype=torch.float64)
    all3 = nowcast_ref(w, p, "wnn", steps=3, all_steps=True)
    manual = []
    for _ in range(3):
        nxt = step_ref(w, p, "wnn")
        manual.append(nxt)
        w = torch.cat([w[:, 1:], nxt[:, None]], dim=1)
    torch.testing.assert_close(all3, torch.stack(manual, 1), rtol=0, atol=0)
    assert torch.equal(nowcast_ref(w, p, "wnn", steps=3), nowcast_ref(w, p, "wnn", steps=3, all_steps=True)[:, -1])


def test_chunking_does_not_change_reference():
    head = fresh_head()
    p = {k: v.detach().double() for k, v in head.params_dict().items()}
    w = torch.randn(1000, 5, dtype=torch.float64)
    torch.testing.assert_close(nowcast_ref(w, p, "raw", chunk_rows=7),
                               nowcast_ref(w, p, "raw"), rtol=1e-12, atol=1e-15)


def test_wnn_normalisation_spec():
    w = torch.tensor([[1.0, 3.0, 2.0, 5.0, 4.0]], dtype=torch.float64)
    x, s, m0 = normalise(w, "wnn")
    assert float(m0) == 1.0
    assert float(s) == pytest.approx(2 * (4.0 + 1e-8 + 1e-5))
    torch.testing.assert_close(x * s[:, None] + m0, w)
    with pytest.raises(ValueError, match="norm must be one of"):
        normalise(w, "zscore")


def test_raw_normalisation_is_identity():
    w = torch.randn(3, 5, dtype=torch.float64)
    x, s, m0 = normalise(w, "raw")
    assert torch.equal(x, w) and float(s) == 1.0 and float(m0) == 0.0


def folded_residual(x, packed, S):
    """The folded computation every kernel implements, evaluated from the packed vector."""
    off, shapes = packed_offsets(S), folded_shapes(S)
    get = lambda name: packed[off[name]:off[name] + int(np.prod(shapes[name]))].reshape(shapes[name])
    us = []
    for prefix, inp in (("x", x), ("d", x[:, 1:] - x[:, :-1])):
        g = lambda r: get(f"{prefix}.{r}")
        h = inp @ g("w1") + g("b1")
        z = torch.relu(inp @ g("g") + g("gb"))
        e = torch.exp((z @ g("wc") + g("bc")) * h)
        pre = ((z @ g("wb") + g("bb")) * e) @ g("w2") + z @ g("a2") + g("b2")
        us.append(torch.nn.functional.leaky_relu(pre, 0.3))
    return torch.tanh(torch.cat(us, 1) @ get("wo") + get("bo"))


@pytest.mark.parametrize("S", [3, 5])
def test_packed_folding_computes_the_same_function(S):
    head = fresh_head(S)
    params = {k: v.detach().double() for k, v in head.params_dict().items()}
    packed = pack(params, S)
    assert packed.dtype == torch.float32 and packed.numel() == packed_size(S)
    folded64 = torch.cat([t.reshape(-1) for t in fold(params).values()])
    x = torch.rand(200, S, dtype=torch.float64) - 0.5
    from know_kernels.kernels.reference import residual_ref
    torch.testing.assert_close(folded_residual(x, folded64, S), residual_ref(x, params),
                               rtol=1e-10, atol=1e-12)


def test_packed_size_for_paper_setting():
    assert packed_size(5) == 7833


def test_pack_is_differentiable_back_to_head_parameters():
    head = fresh_head()
    pack(head.params_dict(), 5).sum().backward()
    assert all(p.grad is not None for p in head.parameters())
