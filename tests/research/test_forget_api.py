"""forget / forget_and_predict: any training loop, nested subsets, snapshots in memory or
in files, KNOW's predictions."""
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import Subset, TensorDataset

from know_kernels import KNOWN, predict
from know_kernels.research.forget import (StageSubset, forget, forget_and_predict,
                                          prediction_names, snapshot_names)

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g))


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 3))


class Recorder:
    """A train_fn: a few full-batch SGD steps on the subset, remembering what it was given
    and the weights it left."""

    def __init__(self):
        self.calls, self.after = [], []

    def __call__(self, model, subset):
        self.calls.append(subset)
        x, y = subset.dataset.tensors[0][subset.indices], subset.dataset.tensors[1][subset.indices]
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(3):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        self.after.append({k: v.clone() for k, v in model.state_dict().items()})
        return len(subset)


def test_train_fn_sees_nested_subsets_and_each_stage_is_snapshotted():
    data, model, train = tiny_data(), tiny_model(), Recorder()
    theta0 = {k: v.clone() for k, v in model.state_dict().items()}
    scores = iter(range(10))
    result = forget(model, data, train, r=0.5, stages=5, seed=3,
                    evaluate_fn=lambda m: next(scores))
    assert result.sizes == [64, 32, 16, 8, 4]
    assert [s.stage for s in train.calls] == [1, 2, 3, 4]
    assert all(isinstance(s, Subset) and isinstance(s, StageSubset) and s.dataset is data
               for s in train.calls)
    subsets = [set(range(64))] + [set(s.indices) for s in train.calls]
    assert [len(s) for s in subsets] == result.sizes
    assert all(b < a for a, b in zip(subsets, subsets[1:]))
    assert all(isinstance(i, int) for i in train.calls[0].indices)
    assert [s.indices for s in train.calls] == [result.schedule.subset(i).tolist()
                                                for i in range(1, 5)]
    # Θ^0 is the model as given, Θ^i what train_fn left after stage i; the model ends as Θ^4.
    assert len(result.snapshots) == 5
    for expected, snap in zip([theta0] + train.after, result.snapshots):
        assert all(torch.equal(expected[k], snap[k]) for k in expected)
    assert all(torch.equal(v, result.snapshots[-1][k]) for k, v in model.state_dict().items())
    assert result.samples == [None, 32, 16, 8, 4] and result.test_acc == [0, 1, 2, 3, 4]
    assert result.seconds[0] is None and all(t > 0 for t in result.seconds[1:])
    assert result.schedule.test_acc == result.test_acc and result.predictions == []
    assert list(result.named) == snapshot_names(5)


def test_pretrain_fn_trains_theta0_on_d0_and_indices_choose_d0():
    seen = []
    d0 = list(range(10, 60))
    result = forget(tiny_model(), tiny_data(), lambda m, s: seen.append(s), r=0.5, stages=3,
                    indices=d0, pretrain_fn=lambda m, s: seen.append(s) or 7)
    assert [s.stage for s in seen] == [0, 1, 2]
    assert seen[0].indices == d0 and set(seen[2].indices) < set(seen[1].indices) < set(d0)
    assert result.samples == [7, None, None] and result.seconds[0] is not None


def test_predictions_are_know_of_the_snapshots_and_both_modes_agree(tmp_path):
    memory = forget_and_predict(tiny_model(), tiny_data(), Recorder(), r=0.5, stages=4,
                                steps=2)
    assert len(memory.predictions) == 2
    expected = predict(memory.snapshots, KNOWN.pretrained(4), steps=2)
    for got, want in zip(memory.predictions, expected):
        assert all(torch.equal(got[k], want[k]) for k in want)
    assert not torch.equal(memory.predictions[0]["0.weight"], memory.snapshots[0]["0.weight"])
    # LayerNorm is no head's: copied from Θ^0.
    assert torch.equal(memory.predictions[0]["1.weight"], memory.snapshots[0]["1.weight"])

    files = forget_and_predict(tiny_model(), tiny_data(), Recorder(), r=0.5, stages=4,
                               steps=2, out_dir=tmp_path)
    names = snapshot_names(4) + prediction_names(2)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{n}.safetensors"
                                                                for n in names)
    assert list(files.named) == names and files.named["know_step2"] == tmp_path / \
        "know_step2.safetensors"
    # Bounded memory: nothing of the run is held but the files it wrote.
    assert files.schedule.snapshots == []
    for held, path in zip(memory.snapshots + memory.predictions,
                          files.snapshots + files.predictions):
        on_disk = load_file(path)
        assert set(on_disk) == set(held) and all(torch.equal(held[k], on_disk[k]) for k in held)


def test_existing_files_are_refused_before_training_unless_forced(tmp_path):
    (tmp_path / "know_step1.safetensors").write_bytes(b"old")
    train = Recorder()
    with pytest.raises(FileExistsError, match="know_step1.safetensors exists; pass force=True"):
        forget_and_predict(tiny_model(), tiny_data(), train, r=0.5, stages=3, out_dir=tmp_path)
    assert train.calls == [] and not (tmp_path / "theta0.safetensors").exists()
    result = forget_and_predict(tiny_model(), tiny_data(), train, r=0.5, stages=3,
                                out_dir=tmp_path, force=True)
    assert set(load_file(result.predictions[0])) == set(tiny_model().state_dict())


def test_stages_must_match_the_known_heads():
    with pytest.raises(ValueError, match=r"stages=6.*shipped KNOWN exists for S in \(3, 4, 5\)"):
        forget_and_predict(tiny_model(), tiny_data(), Recorder(), r=0.5, stages=6)
    with pytest.raises(ValueError, match="stages must equal the KNOWN heads' S"):
        forget_and_predict(tiny_model(), tiny_data(), Recorder(), r=0.5, stages=4,
                           known=KNOWN.pretrained(5))
    # Any S works with a KNOWN meta-trained for it (here untrained), and forget() needs none.
    result = forget_and_predict(tiny_model(), tiny_data(256), Recorder(), r=0.5, stages=6,
                                known=KNOWN.init(S=6))
    assert len(result.snapshots) == 6 and len(result.predictions) == 1
    assert len(forget(tiny_model(), tiny_data(256), Recorder(), r=0.5, stages=7).snapshots) == 7


@pytest.mark.parametrize("change, error, match", [
    ({"r": 1.5}, ValueError, r"r must lie in \(0, 1\)"),
    ({"stages": 1}, ValueError, "stages must be an integer >= 2"),
    ({"steps": 0}, ValueError, "steps must be a positive integer"),
    ({"train_fn": None}, TypeError, "train_fn must be a callable"),
    ({"pretrain_fn": 3}, TypeError, "pretrain_fn must be a callable"),
    ({"evaluate_fn": "acc"}, TypeError, "evaluate_fn must be a callable"),
    ({"model": {"w": torch.zeros(2)}}, TypeError, "model must be a torch.nn.Module"),
    ({"dataset": iter(range(64))}, TypeError, "dataset must be a map-style dataset"),
    ({"indices": [0, 5, 64, 9, 7]}, ValueError, r"indices must lie in 0\.\.63"),
    ({"route": {"*.weight": "attention"}}, ValueError, "unknown head 'attention'"),
    ({"known": "missing.safetensors"}, FileNotFoundError, "missing.safetensors"),
    ({"known": KNOWN({"fc": KNOWN.pretrained(3)["fc"]})}, ValueError,
     r"routed to KNOWN head\(s\) \['bias'\], which known= lacks"),
    ({"r": 0.1}, ValueError, "too small for r=0.1"),
])
def test_bad_arguments_are_refused_before_any_training(change, error, match):
    train = Recorder()
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    settings = dict(model=model, dataset=tiny_data(), train_fn=train, r=0.5, stages=3)
    settings.update(change)
    with pytest.raises(error, match=match):
        forget_and_predict(settings.pop("model"), settings.pop("dataset"),
                           settings.pop("train_fn"), **settings)
    assert train.calls == []
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

