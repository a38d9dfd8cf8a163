"""A synthetic 3-class task of 8x8 images and width-4 ResNets: the transfer and probe tests
run in seconds on them."""
import torch
from torch.utils.data import TensorDataset

from know_kernels.research.data import DataSplit
from know_kernels.research.transfer import FineTune
from know_kernels.research.zoo import build_model

SHAPE = (1, 8, 8)
RECIPE = FineTune(shots=6, epochs=2, batch_size=6, lr=1e-2)


def toy_task(n_train=60, n_test=30, classes=3, shape=SHAPE, seed=0, name="toy"):
    """Images whose mean depends on the class, so fine-tuning can learn something."""
    g = torch.Generator().manual_seed(seed)

    def part(n):
        y = torch.arange(n) % classes
        x = torch.randn(n, *shape, generator=g) + y[:, None, None, None].float()
        return TensorDataset(x, y)

    return DataSplit(name, part(n_train), part(n_test), classes)


def model_fn(classes=3):
    return lambda: build_model("resnet", SHAPE, classes, width=4)


def source_weights(seed=0, classes=5):
    torch.manual_seed(seed)
    return build_model("resnet", SHAPE, classes, width=4).state_dict()
