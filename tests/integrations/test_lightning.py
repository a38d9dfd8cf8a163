"""The Lightning adapter on a tiny LightningModule, and the python/lightning_know.py recipe."""
import logging

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from know_kernels import KNOWN, predict
from know_kernels.integrations.lightning import forget_and_predict_lightning

from support import RECIPES
from support.recipes import run_recipe_smoke

pytestmark = [pytest.mark.usefixtures("one_thread"),
              # Lightning's own use of a deprecated torch API.
              pytest.mark.filterwarnings(r"ignore:`isinstance\(treespec, LeafSpec\)`")]
TRAINER = dict(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False)


class TinyMLP(L.LightningModule):
    def __init__(self, hidden: int = 8, lr: float = 1e-2):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(6, hidden), nn.LayerNorm(hidden), nn.ReLU(),
                                 nn.Linear(hidden, 3))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


class TinyData(L.LightningDataModule):
    def setup(self, stage):
        g = torch.Generator().manual_seed(0)
        self.train = TensorDataset(torch.randn(64, 6, generator=g),
                                   torch.randint(0, 3, (64,), generator=g))

    def train_dataloader(self):
        return DataLoader(self.train, batch_size=8, shuffle=True)


@pytest.fixture(autouse=True)
def quiet_lightning():
    """Lightning announces devices and tips at INFO for every Trainer."""
    logger = logging.getLogger("lightning.pytorch")
    level = logger.level
    logger.setLevel(logging.WARNING)
    yield
    logger.setLevel(level)


def pretrained(hidden=8):
    torch.manual_seed(0)
    data = TinyData()
    module = TinyMLP(hidden=hidden)
    L.Trainer(**TRAINER).fit(module, datamodule=data)
    return module, data


def test_module_with_a_dataloader_and_a_trainer_factory(tmp_path):
    module, data = pretrained(hidden=12)
    stages_seen = []

    def make_trainer(stage):
        stages_seen.append(stage)
        return L.Trainer(**TRAINER)

    out = tmp_path / "know"
    result = forget_and_predict_lightning(module, out, trainer=make_trainer, r=0.5, stages=3,
                                          steps=2, train_dataloader=data.train_dataloader())
    assert stages_seen == [1, 2] and result.sizes == [64, 32, 16]
    assert result.predictions == [out / "know_step1", out / "know_step2"]
    thetas = [TinyMLP.load_from_checkpoint(d / "model.ckpt").state_dict()
              for d in result.snapshots]
    assert not torch.equal(thetas[0]["net.0.weight"], thetas[1]["net.0.weight"])
    expected = predict(thetas, KNOWN.pretrained(3), steps=2)
    for directory, want in zip(result.predictions, expected):
        loaded = TinyMLP.load_from_checkpoint(directory / "model.ckpt")
        assert loaded.hparams.hidden == 12  # rebuilt from the saved hyper-parameters
        got = loaded.state_dict()
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
        plain = TinyMLP(hidden=12)
        plain.load_state_dict(torch.load(directory / "model.ckpt")["state_dict"])
    assert all(torch.equal(v, thetas[-1][k]) for k, v in module.state_dict().items())
    with pytest.raises(FileExistsError, match="theta0 exists; pass force=True"):
        forget_and_predict_lightning(module, out, trainer=TRAINER, r=0.5, stages=3,
                                     train_dataloader=data.train_dataloader())


def test_module_with_a_datamodule_and_trainer_arguments(tmp_path):
    module, _ = pretrained()
    result = forget_and_predict_lightning(module, tmp_path, trainer=TRAINER, r=0.5, stages=4,
                                          datamodule=TinyData())
    assert result.sizes == [64, 32, 16, 8]
    thetas = [TinyMLP.load_from_checkpoint(d / "model.ckpt").state_dict()
              for d in result.snapshots]
    got = TinyMLP.load_from_checkpoint(result.predictions[0] / "model.ckpt").state_dict()
    want = predict(thetas, KNOWN.pretrained(4))[0]
    assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(module=nn.Linear(2, 2)), TypeError, "module must be a lightning.LightningModule"),
    (dict(trainer=3), TypeError, "trainer must be a dict of lightning.Trainer arguments"),
    (dict(datamodule=TinyData()), ValueError, "exactly one of train_dataloader= and datamodule="),
    (dict(train_dataloader=None), ValueError, "exactly one of"),
    (dict(train_dataloader=[1, 2]), TypeError, "must come as a torch DataLoader"),
    (dict(stages=6), ValueError, "shipped KNOWN exists for S in"),
    (dict(r=2), ValueError, r"r must lie in \(0, 1\)"),
])
def test_bad_arguments(tmp_path, kwargs, error, match):
    g = torch.Generator().manual_seed(0)
    settings = dict(module=TinyMLP(), trainer=TRAINER, r=0.5,
                    train_dataloader=DataLoader(TensorDataset(torch.randn(64, 6, generator=g),
                                                              torch.zeros(64, dtype=torch.long)),
                                                batch_size=8))
    settings.update(kwargs)
    with pytest.raises(error, match=match):
        forget_and_predict_lightning(settings.pop("module"), tmp_path / "know", **settings)
    assert not (tmp_path / "know").exists()


def test_recipe_smoke(tmp_path, capsys):
    out = tmp_path / "know"
    run_recipe_smoke(RECIPES / "lightning_know.py", out, capsys)
    state = torch.load(out / "know_step1" / "model.ckpt")["state_dict"]
    assert set(state) == {"net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"}
