import warnings

import pytest
import torch

from know_kernels import KNOWN, nowcast
from know_kernels.pipeline.plan import count_rows
from know_kernels.pipeline.predict import predict

from support.checkpoints import forgetting_checkpoints, save_checkpoints


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
    paths = save_checkpoints(cks, tmp_path, "pt", stem="ck")
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


@pytest.mark.parametrize("count,S", [(3, 3), (4, 4), (5, 5), (7, 5)])
def test_without_a_known_the_shipped_one_for_the_count_is_used(count, S):
    cks = forgetting_checkpoints(S=count)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        got = predict(cks)
    assert bool(seen) == (count > S)  # only a cut to the first S is announced
    want = predict(cks[:S], KNOWN.pretrained(S))
    assert all(torch.equal(got[0][n], w) for n, w in want[0].items())
    with pytest.raises(ValueError, match=r"shipped KNOWN takes S = 3, 4, 5 checkpoints .* got 2"):
        predict(forgetting_checkpoints(S=2))


def test_options_are_checked_before_anything_is_read():
    with pytest.raises(TypeError, match=r"predict\(\) got unknown options \['stpes'\]"):
        predict(["missing.pt"] * 5, KNOWN.init(), stpes=2)
    for bad, pattern in [({"steps": 0}, "steps must be"), ({"chunk_rows": 0}, "chunk_rows"),
                         ({"out_dtype": "int8"}, "out_dtype must be"),
                         ({"keep": [3]}, "keep must be glob patterns"),
                         ({"threads": 0}, "threads must be")]:
        with pytest.raises((ValueError, TypeError), match=pattern):
            predict(["missing.pt"] * 5, KNOWN.init(), **bad)


def test_progress_counts_rows_in_memory_as_in_files():
    cks = forgetting_checkpoints()
    seen = []
    predict(cks, KNOWN.init(), chunk_rows=50, progress=lambda done, total: seen.append((done, total)))
    total = sum(count_rows(cks[0]).values())
    assert seen[-1] == (total, total) and len(seen) > 2
    assert all(a[0] < b[0] for a, b in zip(seen, seen[1:]))
