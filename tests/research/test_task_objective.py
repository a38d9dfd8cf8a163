"""The task objective: predicted weights scored by the replayed network's loss on images
its run never trained on, and the trainer that minimises it."""
import json

import pytest
import torch
import torch.nn.functional as F

from know_kernels import KNOWN
from know_kernels.cli import main
from know_kernels.io.store import MetaDataset, Trajectory
from know_kernels.research.lincomb import LinComb
from know_kernels.research.probe import recalibrate_batchnorm
from know_kernels.research.replay import NotReplayableError, replay
from know_kernels.research.task_metatrain import (TaskTrainConfig, load_task_state,
                                                  meta_train_task)
from know_kernels.research.task_objective import (RunData, evaluate_run, network_loss,
                                                  run_objective)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def runs(replay_store):
    return {run_id: RunData.of(replay(replay_store, run_id)) for run_id in replay_store.runs()}


def test_batchnorm_is_re_estimated_on_the_calibration_images(runs):
    data = runs["run_0001"]                                    # shufflenet: BatchNorm
    x, y = data.run.images("extra")
    calib, _ = data.run.images("subset", 2)
    weights = data.weights({h: rows[:, 3] for h, rows in data.rows.items()}, 3)
    model = data.run.network(3)
    recalibrate_batchnorm(model, calib)
    expected = F.cross_entropy(model.eval()(x), y)
    got = network_loss(data, weights, x, y, calib)
    assert torch.allclose(got, expected, rtol=1e-5), (got, expected)
    other = network_loss(data, weights, x, y, data.run.images("d0")[0])
    assert not torch.allclose(got, other)


def _loss(predictor, data, objective="task", beta=1.0, backend="auto"):
    return run_objective(predictor, data, S=5, objective=objective, beta=beta,
                         gen=torch.Generator().manual_seed(7), backend=backend)


def test_the_gradient_matches_a_finite_difference(runs):
    data = runs["run_0000"]                 # an mlp: no BatchNorm, whose statistics the
    model = LinComb(5)                      # gradient leaves out by design
    with torch.no_grad():
        model.coef["fc"].copy_(torch.tensor([0.05, -0.1, 0.0, -0.2, 1.25]))
    _loss(model, data)["loss"].backward()
    for k in (0, 3, 4):
        eps = 1e-3
        values = []
        for sign in (1, -1):
            with torch.no_grad():
                model.coef["fc"][k] += sign * eps
                values.append(float(_loss(model, data)["loss"]))
                model.coef["fc"][k] -= sign * eps
        fd = (values[0] - values[1]) / (2 * eps)
        assert abs(model.coef["fc"].grad[k] - fd) <= 2e-2 * abs(fd) + 1e-4, (k, fd)


@pytest.mark.parametrize("run_id", ["run_0000", "run_0001"])
def test_known_gradients_through_the_fused_vjp_match_plain_autograd(runs, run_id):
    grads = {}
    for backend in ("cpu", "reference"):
        known = KNOWN.pretrained(5)
        _loss(known, runs[run_id], "mixed", backend=backend)["loss"].backward()
        grads[backend] = {n: p.grad for n, p in known.named_parameters() if p.grad is not None}
    assert grads["cpu"].keys() == grads["reference"].keys() and grads["cpu"]
    for name, ref in grads["reference"].items():
        err = (grads["cpu"][name] - ref).norm() / ref.norm().clamp_min(1e-12)
        assert err < 1e-4, (name, float(err))


def test_the_known_gradient_matches_a_finite_difference(runs):
    data = runs["run_0000"]
    known = KNOWN.pretrained(5)
    _loss(known, data, backend="cpu")["loss"].backward()
    for name, index in (("heads.fc.bo", (0,)), ("heads.fc.wo", (3, 0)),
                        ("heads.bias.wo", (40, 0))):
        param = dict(known.named_parameters())[name]
        eps, values = 1e-2, []
        for sign in (1, -1):
            with torch.no_grad():
                param[index] += sign * eps
                values.append(float(_loss(known, data, backend="cpu")["loss"]))
                param[index] -= sign * eps
        fd = (values[0] - values[1]) / (2 * eps)
        assert abs(param.grad[index] - fd) <= 5e-2 * abs(fd) + 2e-5, (name, float(param.grad[index]), fd)


def test_the_objectives_combine_as_documented(runs):
    data = runs["run_0002"]
    model = LinComb(5)
    l1, task, mixed = (_loss(model, data, o, beta=0.5) for o in ("l1", "task", "mixed"))
    assert set(l1) == {"l1", "loss"} and set(task) == {"task", "loss"}
    assert torch.allclose(mixed["loss"], l1["l1"] + 0.5 * task["task"])
    # copy-last's in-trajectory L1 is the mean step between neighbouring snapshots
    rows = data.rows
    steps = [torch.stack([(rows[h][:, t] - rows[h][:, t - 1]).abs().mean() for h in rows]).mean()
             for t in (1, 2)]
    assert torch.allclose(l1["l1"], torch.stack(steps).mean())


def test_copy_last_predicts_theta0_exactly(runs):
    scores = evaluate_run(LinComb(5), runs["run_0001"], S=5)
    assert [s["step"] for s in scores] == [0, 1, 2]
    assert scores[1]["acc"] == scores[0]["acc"] and scores[2]["ce"] == scores[0]["ce"]


def _config(**changes):
    return TaskTrainConfig(**{**dict(predictor="lincomb", objective="task", lr=1e-2, epochs=2,
                                     runs_per_batch=1, val_architectures=("cnn",),
                                     checkpoint_every=1), **changes})


def test_training_moves_the_predictor_and_resumes_exactly(tmp_path, replay_store):
    whole, _ = meta_train_task(replay_store, _config())
    assert not torch.equal(whole.coef["fc"].detach(), torch.eye(5)[-1])

    class Stop(Exception):
        pass

    def stop_after_two(step, total, loss):
        if step == 2:
            raise Stop

    ckpt = tmp_path / "ckpt"
    with pytest.raises(Stop):
        meta_train_task(replay_store, _config(), checkpoint=ckpt, progress=stop_after_two)
    assert load_task_state(ckpt).step == 2
    resumed, state = meta_train_task(replay_store, _config(), checkpoint=ckpt, resume=True)
    assert state.step == 4
    for h in whole.coef:
        assert torch.equal(resumed.coef[h], whole.coef[h]), h
    with pytest.raises(ValueError, match="different configuration"):
        meta_train_task(replay_store, _config(lr=1e-3), checkpoint=ckpt, resume=True)


def test_bad_settings_are_refused():
    for changes, message in (({"objective": "kl"}, "objective must be"),
                             ({"predictor": "mlp"}, "predictor must be"),
                             ({"S": 6, "predictor": "known"}, "init 'l1' needs"),
                             ({"unroll": 0}, "unroll must be"),
                             ({"beta": -1.0}, "beta >= 0")):
        with pytest.raises(ValueError, match=message):
            _config(**changes).check()


def test_the_cli_trains_lincomb_and_reports_validation(tmp_path, replay_store, capsys):
    out = tmp_path / "lincomb.safetensors"
    assert main(["meta-train", str(replay_store.root), "--out", str(out), "--objective", "task",
                 "--predictor", "lincomb", "--epochs", "1", "--lr", "1e-2",
                 "--runs-per-batch", "2", "--val-arch", "cnn"]) == 0
    text = capsys.readouterr().out
    assert "validation runs: 1" in text and "lincomb step 1: accuracy" in text
    assert LinComb.load(out).S == 5
    report = json.loads(out.with_name(out.name + ".validation.json").read_text())
    assert set(report["validation"]["runs"]) == {"run_0002"}
    assert not out.with_name(out.name + ".ckpt").exists()


def test_the_task_objective_refuses_a_store_it_cannot_replay(tmp_path, replay_store, capsys):
    old = MetaDataset(tmp_path / "old")
    for run_id in replay_store.runs():
        traj = replay_store.open(run_id).load()
        old.add(run_id, Trajectory(heads=traj.heads, params=traj.params,
                                   meta={k: v for k, v in traj.meta.items() if k != "replay"}))
    with pytest.raises(NotReplayableError, match="re-collect"):
        meta_train_task(old, _config())
    assert main(["meta-train", str(old.root), "--out", str(tmp_path / "k.safetensors"),
                 "--objective", "task", "--predictor", "lincomb"]) == 2
    assert "re-collect" in capsys.readouterr().err
    assert not (tmp_path / "k.safetensors").exists()


def test_meta_eval_scores_predictors_on_runs_held_out_from_selection(tmp_path, replay_store,
                                                                     known_path, capsys):
    out = tmp_path / "lc.safetensors"
    assert main(["meta-train", str(replay_store.root), "--out", str(out), "--objective", "task",
                 "--predictor", "lincomb", "--epochs", "1", "--val-arch", "cnn,mlp",
                 "--no-validation"]) == 0
    assert "validation runs" not in capsys.readouterr().out
    assert main(["meta-eval", str(replay_store.root), "--task", "--lincomb", str(out),
                 "--known", known_path, "--val-arch", "cnn",
                 "--json", str(tmp_path / "table.json")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("validation runs: 1;")
    assert [line.split(" step")[0].strip() for line in lines[1:]] == \
        ["KNOWN (shipped)"] * 2 + ["known"] * 2 + ["lc"] * 2
    table = json.loads((tmp_path / "table.json").read_text())
    assert list(table["runs"]) == ["run_0002"]
    assert set(table["runs"]["run_0002"]) == {"theta0", "KNOWN (shipped)", "known", "lc"}
    LinComb(4).save(tmp_path / "s4.safetensors")
    assert main(["meta-eval", str(replay_store.root), "--task", "--lincomb", str(out),
                 "--lincomb", str(tmp_path / "s4.safetensors"), "--val-arch", "cnn"]) == 2
    assert "different numbers of snapshots" in capsys.readouterr().err
