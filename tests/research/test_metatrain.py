import pytest
import torch

from know_kernels.cli import build_parser
from know_kernels.research.metatrain import (MetaTrainConfig, baseline_predictors,
                                             known_predictor, load_state, meta_train,
                                             prediction_errors, split_runs, window_batches,
                                             windows)

from support.stores import synthetic_store


def test_windows_slide_in_time_order():
    rows = torch.arange(14.0).reshape(2, 7)
    x, y = windows(rows, 5)
    assert x.shape == (4, 5) and y.shape == (4,)
    assert torch.equal(x[0], torch.arange(5.0)) and float(y[0]) == 5.0
    assert torch.equal(x[2], torch.arange(1.0, 6.0)) and float(y[2]) == 6.0
    with pytest.raises(ValueError, match="no window"):
        windows(rows[:, :5], 5)


def test_split_is_by_whole_runs(tmp_path):
    store = synthetic_store(tmp_path)
    train, val = split_runs(store, ("densenet",), ())
    assert sorted(val) == ["run2", "run5"] and len(train) == 4
    assert not set(train) & set(val)


def test_batches_cover_every_window_once(tmp_path):
    store = synthetic_store(tmp_path, runs=3, rows=100)
    seen = torch.cat([y for _, y in window_batches(store, "fc", ["run0", "run1", "run2"], 5, 64,
                                                   chunk_rows=30, mix_chunks=4, seed=1)])
    want = torch.cat([windows(store.open(r).read("fc", order="time"), 5)[1]
                      for r in ("run0", "run1", "run2")])
    assert seen.shape == want.shape
    assert torch.equal(seen.sort().values, want.sort().values)


def config(**kw):
    # The synthetic store is all "digits": hold out by architecture only.
    base = dict(epochs=2, batch_size=256, lr=3e-3, chunk_rows=200, mix_chunks=3,
                checkpoint_every=5, heads=("fc", "bias"), reg_bias=0.0,
                val_architectures=("densenet",), val_datasets=())
    base.update(kw)
    return MetaTrainConfig(**base)


def test_meta_training_learns_and_beats_copy_last(tmp_path):
    store = synthetic_store(tmp_path / "store")
    known, state = meta_train(store, config(epochs=6))
    _, val = split_runs(store, ("densenet",), ())
    for head in ("fc", "bias"):
        table = prediction_errors(store, val, head, 5,
                                  {"KNOWN": known_predictor(known[head]),
                                   **baseline_predictors()})
        assert table["KNOWN"] < 0.8 * table["copy-last"], table
        first, last = state.history[head][0][1], state.history[head][-1][1]
        assert last < first


def test_resume_reproduces_an_uninterrupted_run(tmp_path):
    store = synthetic_store(tmp_path / "store", runs=3, rows=300)
    cfg = config()
    whole, _ = meta_train(store, cfg)

    class Stop(Exception):
        pass

    def interrupt(head, step, total, loss):
        if head == "bias" and step == 7:
            raise Stop

    ckpt = tmp_path / "known.ckpt"
    with pytest.raises(Stop):
        meta_train(store, cfg, checkpoint=ckpt, progress=interrupt)
    saved = load_state(ckpt)
    assert "fc" in saved.done and saved.current == "bias" and saved.step == 5
    resumed, _ = meta_train(store, cfg, checkpoint=ckpt, resume=True)
    for head in ("fc", "bias"):
        for k, v in whole[head].state_dict().items():
            torch.testing.assert_close(resumed[head].state_dict()[k], v, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="different configuration"):
        meta_train(store, config(lr=1.0), checkpoint=ckpt, resume=True)


def test_bad_configuration(tmp_path):
    store = synthetic_store(tmp_path / "store", runs=3, rows=10)
    with pytest.raises(ValueError, match="loss_space"):
        meta_train(store, config(loss_space="log"))
    with pytest.raises(ValueError, match="no training runs"):
        meta_train(store, config(val_architectures=("cnn", "resnet", "densenet")))
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        meta_train(store, config(), checkpoint=tmp_path / "none.ckpt", resume=True)
    with pytest.raises(ValueError, match="no training windows"):
        meta_train(store, config(S=7))
    with pytest.raises(ValueError, match="backend must be one of"):
        meta_train(store, config(backend="tpu"))


def test_cli_backend_option():
    parser = build_parser()
    args = parser.parse_args(["meta-train", "store", "--out", "k.safetensors"])
    assert args.backend == "auto" == MetaTrainConfig.backend
    args = parser.parse_args(["meta-train", "store", "--out", "k", "--backend", "reference"])
    assert args.backend == "reference"
    with pytest.raises(SystemExit):
        parser.parse_args(["meta-train", "store", "--out", "k", "--backend", "tpu"])


def test_meta_train_and_eval_commands_report_pooled_and_per_run(tmp_path, capsys):
    import json

    from know_kernels.cli import main
    synthetic_store(tmp_path / "store", runs=6, rows=300)
    out = tmp_path / "known.safetensors"
    split = ["--val-arch", "densenet", "--val-dataset", ""]
    assert main(["meta-train", str(tmp_path / "store"), "--out", str(out), "--epochs", "1",
                 "--heads", "fc,bias", *split]) == 0
    report = json.loads((tmp_path / "known.safetensors.validation.json").read_text())
    for head in ("fc", "bias"):
        runs = report["per_run"][head]
        assert sorted(runs) == ["run2", "run5"] and all(r["windows"] == 600 for r in runs.values())
        for name, pooled in report["validation"][head].items():
            # Equal window counts: the pooled mean is the mean of the runs' means.
            assert pooled == pytest.approx(sum(r[name] for r in runs.values()) / 2, rel=1e-12)
    text = capsys.readouterr().out
    assert "validation runs: 2" in text and "median ratio (2 runs)" in text
    assert main(["meta-eval", str(tmp_path / "store"), "--known", str(out), *split]) == 0
    again = capsys.readouterr().out
    assert again.strip() in text
    assert "copy-last" in again and "  0/2  1.000" in again  # copy-last never beats itself


def test_sign_flip_negates_whole_windows_with_their_targets(tmp_path):
    store = synthetic_store(tmp_path, runs=2, rows=300)
    kw = dict(chunk_rows=100, mix_chunks=3, seed=4)
    plain = list(window_batches(store, "fc", ["run0", "run1"], 5, 128, **kw))
    flipped = list(window_batches(store, "fc", ["run0", "run1"], 5, 128, sign_flip=True, **kw))
    signs = []
    for (x, y), (fx, fy) in zip(plain, flipped, strict=True):
        sign = torch.where(torch.isclose(fy, y), 1.0, -1.0)
        assert torch.equal(fy, sign * y) and torch.equal(fx, sign[:, None] * x)
        signs.append(sign)
    share = float((torch.cat(signs) < 0).float().mean())
    assert 0.4 < share < 0.6
    with pytest.raises(ValueError, match="sign_flip"):
        config(sign_flip=1).check()


def test_cli_sign_flip_option():
    parser = build_parser()
    assert parser.parse_args(["meta-train", "s", "--out", "k"]).sign_flip is MetaTrainConfig.sign_flip
    assert parser.parse_args(["meta-train", "s", "--out", "k", "--sign-flip"]).sign_flip is True
    assert parser.parse_args(["meta-train", "s", "--out", "k", "--no-sign-flip"]).sign_flip is False
