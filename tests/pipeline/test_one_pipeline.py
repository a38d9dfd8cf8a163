"""``predict`` (state dicts in memory) and ``predict_files`` (files to files) are one pipeline:
the same options give the same values, over every input format, dtype, number of steps,
routing and NaN policy."""
import itertools

import pytest
import torch
from safetensors.torch import save_file

from know_kernels import KNOWN, predict, predict_files
from know_kernels.io.sinks import save_sharded

from support.checkpoints import CHUNK, THREE_SHARDS, read_output, trajectory

FORMATS = ("safetensors", "pt", "sharded", "hf-bin")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ROUTES = {"default": {},
          "custom": {"route": {"fc2.*": None, "conv.bias": "bias"}, "keep": ["fc1.bias"]}}


def save_as(ck, path, fmt):
    """Θ in one of the formats ``predict_files`` reads; returns the path to pass it by."""
    if fmt == "safetensors":
        save_file(ck, str(path.with_suffix(".safetensors")))
        return path.with_suffix(".safetensors")
    if fmt == "pt":
        torch.save(ck, path.with_suffix(".pt"))
        return path.with_suffix(".pt")
    if fmt == "sharded":
        return save_sharded(ck, path, max_shard_bytes=THREE_SHARDS // 2)
    path.mkdir()
    torch.save(ck, path / "pytorch_model.bin")
    (path / "config.json").write_text('{"model_type": "net"}\n')
    return path


@pytest.mark.parametrize("fmt,dtype,steps,route,nonfinite",
                         list(itertools.product(FORMATS, DTYPES, (1, 3), ROUTES,
                                                ("error", "passthrough"))))
def test_predict_and_predict_files_are_identical(tmp_path, fmt, dtype, steps, route, nonfinite):
    cks = trajectory(dtype=dtype)
    if nonfinite == "passthrough":
        cks[3]["fc1.weight"][2, 5] = float("nan")
        cks[1]["conv.weight"][0, 0, 0, 0] = float("inf")
    paths = [save_as(ck, tmp_path / f"theta{i}", fmt) for i, ck in enumerate(cks)]
    options = dict(steps=steps, nonfinite=nonfinite, chunk_rows=CHUNK, **ROUTES[route])
    known = KNOWN.init(seed=1)
    in_memory = predict(cks, known, **options)
    from_files = predict(paths, known, **options)
    written = predict_files(paths, tmp_path / "out", known, **options)
    assert len(in_memory) == len(from_files) == len(written) == steps
    for k in range(steps):
        on_disk = read_output(written[k])
        assert list(in_memory[k]) == list(cks[0])
        for name, want in in_memory[k].items():
            assert want.dtype == cks[0][name].dtype, name
            assert torch.equal(from_files[k][name], want), name
            assert torch.equal(on_disk[name], want), name
    if route == "custom":
        for name in ("fc2.weight", "fc2.bias", "fc1.bias"):
            assert torch.equal(in_memory[0][name], cks[0][name])
        assert not torch.equal(in_memory[0]["conv.bias"], cks[0]["conv.bias"])
