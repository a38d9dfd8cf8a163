import importlib
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from know_kernels import KNOWN
from know_kernels.cli import main
from know_kernels.kernels.ops import nowcast_cpu
from know_kernels.pipeline.predict import predict

from support.checkpoints import forgetting_checkpoints, read_output, save_checkpoints

# The package exports functions under these modules' names.
nowcast_module = importlib.import_module("know_kernels.kernels.nowcast")
run_module = importlib.import_module("know_kernels.pipeline.run")


@pytest.fixture
def setup(tmp_path):
    cks = forgetting_checkpoints()
    kinds = ["safetensors" if i % 2 else "pt" for i in range(len(cks))]
    paths = [str(p) for p in save_checkpoints(cks, tmp_path, kinds)]
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
    assert "takes S=5 checkpoints (Θ^0 … Θ^4, full data first), got 4" in capsys.readouterr().err
    bad = tmp / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["predict", str(bad), *paths[1:], "--out", str(tmp / "o"), "--known", kpath,
                 "--quiet"]) == 2
    assert "bad.pt: not a weights-only torch checkpoint" in capsys.readouterr().err
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
    from know_kernels.io.sinks import save_sharded
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

    monkeypatch.setattr(run_module, "nowcast", spy)
    args = ["predict", *paths, "--out", str(out), "--known", kpath, "--quiet"]
    assert main(args + ["--precision", "tf32"]) == 0
    assert seen and set(seen) == {"tf32"}
    # On the CPU "tf32" computes in float32: the same bits as the default precision.
    want = predict(cks, known)[0]
    got = load_file(str(out / "know_step1.safetensors"))
    assert all(torch.equal(got[name], want[name]) for name in want)
    # "bf16" runs the CPU's bfloat16 products where the processor has them, else is refused.
    seen.clear()
    if nowcast_cpu.bf16_kernel()[0] is None:
        assert main(args + ["--precision", "bf16", "--force"]) == 2
        assert "precision='bf16' needs bfloat16 matrix products" in capsys.readouterr().err
    else:
        assert main(args + ["--precision", "bf16", "--force"]) == 0
        assert seen and set(seen) == {"bf16"}
        want = predict(cks, known, precision="bf16")[0]
        got = load_file(str(out / "know_step1.safetensors"))
        assert all(torch.equal(got[name], want[name]) for name in want)
    with pytest.raises(SystemExit):
        main(["predict", *paths, "--out", str(tmp / "x"), "--known", kpath, "--precision", "fp8"])
    assert "invalid choice: 'fp8'" in capsys.readouterr().err


def tree(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_a_file_as_out_is_a_one_line_error_and_changes_nothing(setup, capsys):
    _, paths, kpath, _, tmp = setup
    before, content = tree(tmp), open(paths[0], "rb").read()
    assert main(["predict", *paths, "--out", paths[0], "--known", kpath, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a file; give a directory" in err
    assert tree(tmp) == before and open(paths[0], "rb").read() == content


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal needs a machine without a GPU")
def test_refused_runs_create_nothing(setup, capsys):
    cks, _, kpath, _, tmp = setup
    cks[2]["3.weight"][0, 0] = float("nan")
    paths = [str(p) for p in save_checkpoints(cks, tmp, "safetensors", stem="nan")]
    before = tree(tmp)
    assert main(["predict", *paths, "--out", str(tmp / "new" / "out"), "--known", kpath,
                 "--quiet"]) == 2
    err = capsys.readouterr().err
    # the CLI names its own flag, not the Python argument
    assert "--nonfinite passthrough" in err and "nonfinite=" not in err
    assert tree(tmp) == before
    assert main(["predict", *paths, "--out", str(tmp / "new"), "--backend", "triton",
                 "--known", kpath, "--quiet"]) == 2
    assert "backend 'triton' cannot run" in capsys.readouterr().err
    assert tree(tmp) == before


def test_a_pickled_module_gets_a_plain_message(tmp_path, capsys):
    torch.save(torch.nn.Linear(2, 2), tmp_path / "model.pt")
    model = str(tmp_path / "model.pt")
    assert main(["predict", model, model, "--method", "linear", "--out", str(tmp_path / "o"),
                 "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "\x1b" not in err and err.count("\n") == 1
    assert "pickled torch.nn.modules.linear.Linear" in err and "state_dict()" in err


def test_keep_copies_matching_entries_from_theta0(setup, capsys):
    cks, paths, kpath, known, tmp = setup
    out = tmp / "out"
    assert main(["predict", *paths, "--out", str(out), "--known", kpath, "--keep", "3.*",
                 "--keep", "0.bias", "--quiet"]) == 0
    got = load_file(str(out / "know_step1.safetensors"))
    want = predict(cks, known, keep=["3.*", "0.bias"])[0]
    for name in ("3.weight", "3.bias", "0.bias"):
        assert torch.equal(got[name], cks[0][name]), name
    assert not torch.equal(got["0.weight"], cks[0]["0.weight"])
    assert all(torch.equal(got[n], want[n]) for n in want)


def test_more_checkpoints_than_S_are_used_from_the_full_data_end(setup, capsys):
    cks, paths, kpath, known, tmp = setup
    extra = tmp / "theta5.safetensors"
    save_file(cks[4], str(extra))
    with pytest.warns(UserWarning, match="using the first 5"):
        assert main(["predict", *paths, str(extra), "--out", str(tmp / "o"), "--known", kpath,
                     "--quiet"]) == 0
    got = load_file(str(tmp / "o" / "know_step1.safetensors"))
    assert all(torch.equal(got[n], w) for n, w in predict(cks, known)[0].items())


def test_lightning_ckpt_files_are_read(setup, capsys):
    cks, _, kpath, known, tmp = setup
    paths = []
    for i, ck in enumerate(cks):
        # what Lightning's save_checkpoint writes: the weights under state_dict, and more
        torch.save({"epoch": i, "global_step": 10 * i, "state_dict": ck,
                    "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.1}]}],
                    "hyper_parameters": {"width": 3}}, tmp / f"epoch{i}.ckpt")
        paths.append(str(tmp / f"epoch{i}.ckpt"))
    assert main(["predict", *paths, "--out", str(tmp / "o"), "--known", kpath, "--quiet"]) == 0
    got = load_file(str(tmp / "o" / "know_step1.safetensors"))
    assert all(torch.equal(got[n], w) for n, w in predict(cks, known)[0].items())


def test_the_cli_warning_format_ends_with_the_command(setup, capsys):
    import warnings
    before = warnings.formatwarning
    _, paths, kpath, _, tmp = setup
    assert main(["predict", *paths, "--out", str(tmp / "o"), "--known", kpath, "--quiet"]) == 0
    assert warnings.formatwarning is before
