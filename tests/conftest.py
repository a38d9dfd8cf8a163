"""Fixtures that tests in more than one folder use.  Helpers that are not fixtures live in
support/."""
import pytest
import torch

from support.datasets import write_mnist_dir


@pytest.fixture(scope="module")
def one_thread():
    """Tiny networks gain nothing from more threads and run 10x slower when another job
    shares the cores (docs/collection.md).  A module opts in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data_args(tmp_path_factory):
    """The CLI arguments that give the demo Fashion-MNIST: none where Debian's
    dataset-fashion-mnist is installed, else --data-dir with small random IDX files (the
    numbers are then meaningless, but every stage runs)."""
    from know_kernels.research import data
    if all(any(data.DEBIAN_DIRS["fashion-mnist"].glob(f"{stem}*")) for stem in
           ("train-images", "train-labels", "t10k-images", "t10k-labels")):
        return []
    directory = tmp_path_factory.mktemp("fashion-mnist")
    write_mnist_dir(directory, n_train=6000, n_test=600)
    return ["--data-dir", str(directory)]


@pytest.fixture(scope="module")
def known_path(tmp_path_factory):
    """An untrained KNOWN saved to a file, for --known."""
    from know_kernels import KNOWN
    path = tmp_path_factory.mktemp("known") / "known.safetensors"
    KNOWN.init(seed=0).save(path)
    return str(path)


@pytest.fixture(scope="session")
def replay_store(tmp_path_factory):
    """Three quick replayable runs on scikit-learn's digits (an mlp, without BatchNorm, a
    shufflenet and a cnn, with it), collected once per session (about 15 s)."""
    from know_kernels.cli import main
    from know_kernels.io.store import MetaDataset
    root = tmp_path_factory.mktemp("replay") / "store"
    threads = torch.get_num_threads()
    try:
        assert main(["collect", "--out", str(root), "--runs", "3", "--preset", "quick",
                     "--quiet"]) == 0
    finally:
        torch.set_num_threads(threads)
    return MetaDataset(root, create=False)
