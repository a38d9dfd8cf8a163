import pytest
import torch
from torch import nn

from know_kernels.known.routing import default_route, make_router, route_state


def small_model_state():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 26 * 26, 10), nn.LayerNorm(10))
    return model.state_dict()


def test_default_routing_follows_the_authors():
    routes = route_state(small_model_state())
    assert routes == {
        "0.weight": "conv", "0.bias": "bias",
        "1.weight": None, "1.bias": None, "1.running_mean": None, "1.running_var": None,
        "1.num_batches_tracked": None,
        "4.weight": "fc", "4.bias": "bias",
        "5.weight": None, "5.bias": None,
    }


def test_bare_bias_and_integer_tensors():
    state = {"b.bias": torch.zeros(3), "steps": torch.zeros(3, 3, dtype=torch.int64)}
    assert default_route("b.bias", state["b.bias"], state) == "bias"
    assert default_route("steps", state["steps"], state) is None


def test_overrides_by_pattern_then_default():
    state = small_model_state()
    routes = route_state(state, {"4.*": None, "1.bias": "bias"})
    assert routes["4.weight"] is None and routes["4.bias"] is None
    assert routes["1.bias"] == "bias" and routes["0.weight"] == "conv"


def test_callable_router_and_bad_heads():
    state = small_model_state()
    routes = route_state(state, lambda name, t, s: "fc" if name == "0.weight" else None)
    assert routes["0.weight"] == "fc" and routes["4.weight"] is None
    with pytest.raises(ValueError, match="unknown head 'lstm'"):
        make_router({"*": "lstm"})
    with pytest.raises(ValueError, match="unknown head 'lstm'"):
        route_state(state, lambda *a: "lstm")
