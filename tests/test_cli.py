import importlib
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from know_kernels import KNOWN
from know_kernels.cli import main
from know_kernels.pipeline.predict import predict
from test_predict import forgetting_checkpoints

# The package exports functions under these modules' names.
nowcast_module = importlib.import_module("know_kernels.kernels.nowcast")
predict_module = importlib.import_module("know_kernels.pipeline.predict")


@pytest.fixture
def setup(tmp_path):
    cks = forgetting_checkpoints()
    paths = []
    for i, ck in enumerate(cks):
        if i % 2:
            p = tmp_path / f"theta{i}.safetensors"
            save_file(ck, str(p))
        else:
            p = tmp_path / f"theta{i}.pt"
            torch.save(ck, p)
        paths.append(str(p))
    known = KNOWN.init(seed=9)
    kpath = tmp_path / "known.safetensors"
    known.save(kpath)
    return cks, paths, str(kpath), known, tmp_path


def test_predict_end_to_end(setup, capsys):
    cks, paths, kpath, known, tmp = setup
    out = tmp / "out"
    assert main(["predict", *paths, "--steps", "3", "--out", str(out), "--known", kpath,
                 "--quiet"]) == 0
    want = predict(cks, known, steps=3)
    for k in range(3):
        got = load_file(str(out / f"know_step{k + 1}.safetensors"))
        assert set(got) == set(want[k])
        for name in got:
            assert torch.equal(got[name], want[k][name]), name
    assert not list(out.glob(".*tmp"))


def test_predict_refuses_existing_output_unless_forced(setup, capsys):
    _, paths, kpath, _, tmp = setup
    out = tmp / "out"
    out.mkdir()
    (out / "know_step1.safetensors").write_bytes(b"keep me")
    assert main(["predict", *paths, "--out", str(out), "--known", kpath, "--quiet"]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert (out / "know_step1.safetensors").read_bytes() == b"keep me"
    assert main(["predict", *paths, "--out", str(out), "--known", kpath, "--quiet", "--force"]) == 0
    assert load_file(str(out / "know_step1.safetensors"))


def test_predict_never_overwrites_an_input(setup, capsys):
    _, paths, kpath, _, tmp = setup
    clash = tmp / "know_step1.safetensors"
    save_file(load_file(paths[1]), str(clash))
    before = clash.read_bytes()
    paths[1] = str(clash)
    assert main(["predict", *paths, "--out", str(tmp), "--known", kpath, "--force",
                 "--quiet"]) == 2
    assert "would overwrite an input" in capsys.readouterr().err
    assert clash.read_bytes() == before


def test_predict_errors_are_clear(setup, capsys):
    _, paths, kpath, _, tmp = setup
    assert main(["predict", *paths[:4], "--out", str(tmp / "o"), "--known", kpath, "--quiet"]) == 2
    assert "S=5 snapshots but 4 checkpoints" in capsys.readouterr().err
    bad = tmp / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["predict", str(bad), *paths[1:], "--out", str(tmp / "o"), "--known", kpath,
                 "--quiet"]) == 2
    assert "bad.pt: not a readable" in capsys.readouterr().err
    assert main(["predict", *paths, "--out", str(tmp / "o"), "--known", str(tmp / "nope"),
                 "--quiet"]) == 2
    assert "KNOWN file not found" in capsys.readouterr().err


def test_pickled_code_is_refused(tmp_path, capsys):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    p = tmp_path / "evil.pt"
    torch.save({"w": Evil()}, p)
    from know_kernels.fileio import load_state_dict
    with pytest.raises(ValueError, match="weights-only"):
        load_state_dict(p)


def test_info_and_selftest_run_as_module():
    info = subprocess.run([sys.executable, "-m", "know_kernels", "info"], capture_output=True,
                          text=True, check=True)
    assert "know-kernels" in info.stdout and "reference  cpu   usable" in info.stdout
    st = subprocess.run([sys.executable, "-m", "know_kernels", "selftest", "--rows", "101"],
                        capture_output=True, text=True)
    assert st.returncode == 0, st.stdout + st.stderr
    assert " 0 failed" in st.stdout and "reference  cpu    float32" in st.stdout


def test_predict_with_a_baseline_needs_no_known(setup, capsys):
    cks, paths, _, _, tmp = setup
    out = tmp / "lin"
    assert main(["predict", *paths, "--method", "linear", "--steps", "2", "--out", str(out),
                 "--quiet"]) == 0
    want = predict(cks, method="linear", steps=2)
    got = load_file(str(out / "know_step2.safetensors"))
    assert all(torch.equal(got[k], want[1][k]) for k in got)
    # Without --known, --method known uses the shipped weights.
    assert main(["predict", *paths, "--out", str(tmp / "k"), "--quiet"]) == 0
    want = predict(cks, KNOWN.pretrained())
    got = load_file(str(tmp / "k" / "know_step1.safetensors"))
    assert all(torch.equal(got[k], want[0][k]) for k in got)


def test_predict_sharded_checkpoints_with_out_dtype(tmp_path, capsys):
    from know_kernels.io.streaming import save_sharded
    from test_streaming import read_output
    cks = forgetting_checkpoints(dtype=torch.bfloat16)
    paths = [str(save_sharded(ck, tmp_path / f"ck{i}", max_shard_bytes=100))
             for i, ck in enumerate(cks)]
    out = tmp_path / "out"
    assert main(["predict", *paths, "--method", "linear", "--out", str(out), "--chunk-rows", "7",
                 "--out-dtype", "float32", "--quiet"]) == 0
    assert f"wrote {out / 'know_step1'}" in capsys.readouterr().out
    assert (out / "know_step1" / "model.safetensors.index.json").is_file()
    got = read_output(out / "know_step1")
    want = predict(cks, method="linear")[0]
    for name, w in want.items():
        assert got[name].dtype == (torch.float32 if w.is_floating_point() else w.dtype), name
        if w.is_floating_point():
            torch.testing.assert_close(got[name].to(torch.bfloat16), w, rtol=1e-2, atol=1e-2)
        else:
            assert torch.equal(got[name], w), name
    # Protected like single files: refused without --force, an input never overwritten.
    assert main(["predict", *paths, "--method", "linear", "--out", str(out), "--quiet"]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert main(["predict", paths[0], str(out / "know_step1"), *paths[2:], "--method", "linear",
                 "--out", str(out), "--force", "--quiet"]) == 2
    assert "would overwrite an input" in capsys.readouterr().err


def test_predict_precision_option(setup, capsys, monkeypatch):
    cks, paths, kpath, known, tmp = setup
    out = tmp / "bf16"
    seen = []
    real = nowcast_module.nowcast

    def spy(*args, **kw):
        seen.append(kw["precision"])
        return real(*args, **kw)

    monkeypatch.setattr(predict_module, "nowcast", spy)
    assert main(["predict", *paths, "--out", str(out), "--known", kpath, "--quiet",
                 "--precision", "bf16"]) == 0
    assert seen and set(seen) == {"bf16"}
    # On the CPU the products stay float32: the same bits as the default precision.
    want = predict(cks, known)[0]
    got = load_file(str(out / "know_step1.safetensors"))
    assert all(torch.equal(got[name], want[name]) for name in want)
    with pytest.raises(SystemExit):
        main(["predict", *paths, "--out", str(tmp / "x"), "--known", kpath, "--precision", "fp8"])
    assert "invalid choice: 'fp8'" in capsys.readouterr().err
