import pytest
import torch
from torch import nn

from know_kernels import KNOWN, nowcast
from know_kernels.pipeline.plan import count_rows
from know_kernels.pipeline.predict import predict


def forgetting_checkpoints(S=5, seed=0, dtype=torch.float32):
    """A small model's state dict perturbed stage by stage: [Θ^0, Θ^1, …] (paper order)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(12, 5))
    base = {k: v.clone() for k, v in model.state_dict().items()}
    cks = []
    for i in range(S):
        ck = {}
        for k, v in base.items():
            if v.is_floating_point():
                ck[k] = (v + 0.01 * i * torch.randn_like(v)).to(dtype)
            else:
                ck[k] = v.clone() + i
        cks.append(ck)
    return cks


def test_predict_reverses_to_time_order_and_routes():
    cks = forgetting_checkpoints()
    known = KNOWN.init(seed=5)
    out = predict(cks, known, steps=2, backend="reference")
    assert len(out) == 2
    for name in ("0.weight", "3.weight", "0.bias", "3.bias"):
        head = {"0.weight": "conv", "3.weight": "fc"}.get(name, "bias")
        rows = torch.stack([ck[name].reshape(-1) for ck in reversed(cks)], dim=1)
        want = nowcast(rows, known[head], steps=2, all_steps=True, backend="reference")
        for k in range(2):
            assert out[k][name].shape == cks[0][name].shape
            torch.testing.assert_close(out[k][name].reshape(-1), want[:, k], rtol=1e-6, atol=1e-7)
    for name in ("1.weight", "1.bias", "1.running_mean", "1.num_batches_tracked"):
        for k in range(2):
            assert torch.equal(out[k][name], cks[0][name]), name


def test_chunking_gives_identical_results():
    cks = forgetting_checkpoints()
    known = KNOWN.init(seed=1)
    whole = predict(cks, known, backend="reference")
    tiny = predict(cks, known, backend="reference", chunk_rows=5)
    for k in whole[0]:
        torch.testing.assert_close(whole[0][k], tiny[0][k], rtol=1e-6, atol=1e-7)


def test_half_precision_checkpoints_keep_their_dtype():
    cks = forgetting_checkpoints(dtype=torch.bfloat16)
    out = predict(cks, KNOWN.init(), backend="reference")
    assert out[0]["0.weight"].dtype == torch.bfloat16


def test_paths_are_read(tmp_path):
    cks = forgetting_checkpoints()
    paths = []
    for i, ck in enumerate(cks):
        p = tmp_path / f"ck{i}.pt"
        torch.save(ck, p)
        paths.append(p)
    from_paths = predict(paths, KNOWN.init(), backend="reference")
    from_dicts = predict(cks, KNOWN.init(), backend="reference")
    for k in from_dicts[0]:
        assert torch.equal(from_paths[0][k], from_dicts[0][k])


def test_count_rows():
    cks = forgetting_checkpoints()
    assert count_rows(cks[0]) == {"conv": 27, "fc": 60, "bias": 8}


def test_mismatched_checkpoints_are_named():
    known = KNOWN.init()
    cks = forgetting_checkpoints()
    cks[3]["3.weight"] = torch.zeros(5, 13)
    with pytest.raises(ValueError, match=r"'3.weight'.*checkpoint\[0\].*checkpoint\[3\]"):
        predict(cks, known)
    cks = forgetting_checkpoints()
    cks[2]["3.bias"] = cks[2]["3.bias"].double()
    with pytest.raises(ValueError, match=r"'3.bias'.*float64"):
        predict(cks, known)
    cks = forgetting_checkpoints()
    del cks[4]["0.bias"]
    with pytest.raises(ValueError, match=r"checkpoint\[4\] missing \['0.bias'\]"):
        predict(cks, known)
    cks = forgetting_checkpoints()
    cks[1]["extra"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"checkpoint\[1\] has extra"):
        predict(cks, known)


@pytest.mark.parametrize("count", [1, 4])
def test_too_few_checkpoints_say_how_many_are_needed(count):
    with pytest.raises(ValueError, match=rf"takes S=5 checkpoints \(Θ\^0 … Θ\^4, full data first\), "
                                         rf"got {count}"):
        predict(forgetting_checkpoints(S=count), KNOWN.init())
    with pytest.raises(ValueError, match="at least 2"):
        predict(forgetting_checkpoints(S=1), method="linear")


def test_more_checkpoints_than_S_use_the_most_data_end_and_say_so():
    cks = forgetting_checkpoints(S=7)
    known = KNOWN.init()
    with pytest.warns(UserWarning, match=r"7 checkpoints given.*S=5: using the first 5") as seen:
        out = predict(cks, known, steps=2)
    assert len(seen) == 1
    expected = predict(cks[:5], known, steps=2)
    assert all(torch.equal(out[k][n], expected[k][n]) for k in range(2) for n in expected[k])


def test_nonfinite_rows_error_or_pass_through():
    cks = forgetting_checkpoints()
    cks[2]["3.weight"][1, 2] = float("nan")
    cks[4]["0.weight"][0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"'0.weight' holds NaN or Inf in checkpoint\[4\]"):
        predict(cks, KNOWN.init())
    out = predict(cks, KNOWN.init(), nonfinite="passthrough", steps=2)
    for k in range(2):
        assert out[k]["3.weight"][1, 2] == cks[0]["3.weight"][1, 2]
        assert out[k]["0.weight"][0, 0, 0, 0] == cks[0]["0.weight"][0, 0, 0, 0]
        assert torch.isfinite(out[k]["3.weight"]).all()
    with pytest.raises(ValueError, match="nonfinite must be"):
        predict(cks, KNOWN.init(), nonfinite="ignore")
    with pytest.raises(ValueError, match="precision must be one of"):
        predict(cks, KNOWN.init(), precision="fp8")


def test_missing_head_and_overrides():
    cks = forgetting_checkpoints()
    known = KNOWN({"conv": KNOWN.init()["conv"]})
    with pytest.raises(ValueError, match=r"'0.bias' routes to head 'bias', which this KNOWN lacks"):
        predict(cks, known)
    out = predict(cks, known, route={"3.*": None, "0.bias": None})
    assert torch.equal(out[0]["3.weight"], cks[0]["3.weight"])
    assert not torch.equal(out[0]["0.weight"], cks[0]["0.weight"])


def test_inputs_are_not_modified():
    cks = forgetting_checkpoints()
    copies = [{k: v.clone() for k, v in ck.items()} for ck in cks]
    out = predict(cks, KNOWN.init(), steps=2)
    for ck, cp in zip(cks, copies):
        assert all(torch.equal(ck[k], cp[k]) for k in ck)
    out[0]["1.weight"].add_(1)
    assert torch.equal(cks[0]["1.weight"], copies[0]["1.weight"])


def test_predict_is_public_at_the_package_top():
    import know_kernels
    from know_kernels.io.load import load_into
    from know_kernels.pipeline.predict import predict_files
    assert know_kernels.predict is predict
    assert know_kernels.predict_files is predict_files and know_kernels.load_into is load_into
