"""``know predict`` over Hugging Face model directories: tiny GPT-2 and ViT built from configs
(nothing downloaded), five checkpoints saved the ways Hugging Face saves them, predictions
loaded back with ``from_pretrained`` and with ``load_into``."""
import copy
import json

import pytest
import torch
from transformers import (AutoModelForCausalLM, AutoModelForImageClassification, GPT2Config,
                          GPT2LMHeadModel, ViTConfig, ViTForImageClassification)

from know_kernels import KNOWN, load_into, predict
from know_kernels.cli import main

S = 5


def gpt2():
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=97,
                                      n_positions=32, bos_token_id=0, eos_token_id=0))


def vit():
    return ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=2,
                                               num_attention_heads=2, intermediate_size=64,
                                               image_size=16, patch_size=4, num_labels=5))


def save_bin(model, directory, shards):
    """What transformers < 5 wrote with safe_serialization=False: pytorch_model.bin, or
    pytorch_model-0000k-of-0000n.bin shards and their index."""
    directory.mkdir(parents=True)
    model.config.save_pretrained(directory)
    state = model.state_dict()
    if shards == 1:
        torch.save(state, directory / "pytorch_model.bin")
        return
    names = list(state)
    weight_map = {}
    for k in range(shards):
        part = names[k::shards]
        file = f"pytorch_model-{k + 1:05d}-of-{shards:05d}.bin"
        torch.save({n: state[n] for n in part}, directory / file)
        weight_map.update((n, file) for n in part)
    (directory / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))


def forgetting_run(model_fn, tmp_path, layout):
    """Θ^0 … Θ^4 of one model (tied weights stay tied), saved as ``layout``; and the state
    dicts."""
    torch.manual_seed(0)
    model = model_fn()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    dirs, states = [], []
    for i in range(S):
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(base[n] + 0.01 * i * torch.randn_like(p))
        d = tmp_path / f"theta{i}"
        if layout == "safetensors":
            model.save_pretrained(d)
        elif layout == "sharded":
            model.save_pretrained(d, max_shard_size="40KB")
        else:
            save_bin(model, d, shards=1 if layout == "bin" else 2)
        dirs.append(str(d))
        states.append(copy.deepcopy(model).state_dict())  # a deep copy keeps the ties
    return model, dirs, states


@pytest.mark.parametrize("layout", ["safetensors", "sharded", "bin", "bin-sharded"])
def test_gpt2_round_trip(tmp_path, layout, capsys):
    model, dirs, states = forgetting_run(gpt2, tmp_path, layout)
    if layout == "sharded":
        assert len(list((tmp_path / "theta0").glob("model-*.safetensors"))) > 1
    out = tmp_path / "out"
    assert main(["predict", *dirs, "--steps", "2", "--out", str(out), "--quiet"]) == 0
    want = predict(states, KNOWN.pretrained(), steps=2)
    for k in (1, 2):
        step = out / f"know_step{k}"
        # every non-weight file of Θ^0's directory travels with the weights
        assert (step / "config.json").read_text() == (tmp_path / "theta0" / "config.json").read_text()
        loaded = AutoModelForCausalLM.from_pretrained(step)
        got = loaded.state_dict()
        assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()
        assert torch.equal(got["lm_head.weight"], got["transformer.wte.weight"])
        for name, w in want[k - 1].items():
            assert torch.equal(got[name], w), name
    # the tie is predicted once: in memory both names hold the same tensor
    assert want[0]["lm_head.weight"] is want[0]["transformer.wte.weight"]
    fresh = gpt2()
    load_into(fresh, out / "know_step1", strict=True)
    assert fresh.lm_head.weight.data_ptr() == fresh.transformer.wte.weight.data_ptr()
    assert torch.equal(fresh.transformer.wte.weight, want[0]["transformer.wte.weight"])


@pytest.mark.parametrize("layout", ["safetensors", "bin"])
def test_vit_round_trip_keeping_the_classifier(tmp_path, layout, capsys):
    _, dirs, states = forgetting_run(vit, tmp_path, layout)
    out = tmp_path / "out"
    assert main(["predict", *dirs, "--out", str(out), "--keep", "classifier.*", "--quiet"]) == 0
    loaded = AutoModelForImageClassification.from_pretrained(out / "know_step1")
    want = predict(states, keep=["classifier.*"])[0]
    got = loaded.state_dict()
    for name, w in want.items():
        assert torch.equal(got[name], w), name
    assert torch.equal(got["classifier.weight"], states[0]["classifier.weight"])
    assert not torch.equal(got["vit.layers.0.attention.q_proj.weight"],
                           states[0]["vit.layers.0.attention.q_proj.weight"])
