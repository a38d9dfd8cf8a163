"""The collection zoo: every architecture builds for 28x28x1 and 32x32x3, stays under 3M
parameters, trains (gradients reach every parameter) and routes into KNOWN heads."""
import pytest
import torch
import torch.nn.functional as F

from know_kernels.known.routing import route_state
from know_kernels.research.zoo import ARCHITECTURES, DEFAULT_WIDTH, build_model, count_parameters

SHAPES = [(1, 28, 28), (3, 32, 32)]


@pytest.mark.parametrize("in_shape", SHAPES)
@pytest.mark.parametrize("name", ARCHITECTURES)
def test_builds_trains_and_routes(name, in_shape):
    torch.manual_seed(0)
    model = build_model(name, in_shape, 10)
    n = count_parameters(model)
    assert 10_000 < n < 3_000_000
    x = torch.randn(3, *in_shape)
    out = model(x)
    assert out.shape == (3, 10) and torch.isfinite(out).all()
    F.cross_entropy(out, torch.tensor([0, 1, 2])).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    heads = {h for h in route_state(model.state_dict()).values() if h}
    assert heads == ({"fc", "bias"} if name == "mlp" else {"conv", "fc", "bias"})


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_width_scales_and_seed_reproduces(name):
    small = count_parameters(build_model(name, (1, 28, 28), 10, width=4))
    large = count_parameters(build_model(name, (1, 28, 28), 10, width=2 * DEFAULT_WIDTH[name]))
    assert small < large < 3_000_000
    torch.manual_seed(5)
    a = build_model(name, (3, 32, 32), 7, width=4)
    torch.manual_seed(5)
    b = build_model(name, (3, 32, 32), 7, width=4)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown architecture 'vgg'"):
        build_model("vgg", (1, 28, 28), 10)
    with pytest.raises(ValueError, match="in_shape"):
        build_model("cnn", (28, 28), 10)
    with pytest.raises(ValueError, match="at least 8x8"):
        build_model("cnn", (1, 4, 4), 10)
    with pytest.raises(ValueError, match="num_classes"):
        build_model("mlp", (1, 28, 28), 1)
    with pytest.raises(ValueError, match="width"):
        build_model("resnet", (1, 28, 28), 10, width=1)
