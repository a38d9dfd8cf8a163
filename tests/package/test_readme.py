"""The README's Python examples run as written, on small checkpoints of a model of the
shape they assume (one with an ``fc`` layer)."""
import re
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from support import README
from support.checkpoints import drifting_checkpoints, save_checkpoints


def python_blocks(section: str) -> list[str]:
    """The ```python blocks between the heading ``section`` and the next (sub)heading."""
    text = README.read_text()
    start = text.index(section + "\n") + len(section)
    after = re.search(r"\n##+ ", text[start:])  # code comments have a single #
    body = text[start:start + after.start() if after else None]
    return re.findall(r"```python\n(.*?)```", body, flags=re.S)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc(self.conv(x).flatten(1))


def fine_tune(model, subset):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for x, y in DataLoader(subset, batch_size=8, shuffle=True):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = Net()
    # The global generator goes on to draw the training set below.
    cks = drifting_checkpoints(lambda: model, 5, seed=None)
    save_checkpoints(cks, tmp_path, ["safetensors"] + ["pt"] * 4)
    monkeypatch.chdir(tmp_path)
    train_set = TensorDataset(torch.randn(64, 1, 4, 4), torch.randint(0, 3, (64,)))
    return {"model": model, "train_set": train_set, "fine_tune": fine_tune}


def test_use_it_from_python(workspace):
    (block,) = python_blocks("## Use it from Python")
    exec(compile(block, "README.md", "exec"), dict(workspace))
    assert Path("know_out/know_step1.safetensors").is_file()


def test_from_your_own_training_loop(workspace):
    (block,) = python_blocks("### From your own training loop")
    namespace = dict(workspace)
    exec(compile(block, "README.md", "exec"), namespace)
    assert len(namespace["result"].predictions) == 2
