"""Dataset readers: IDX (plain/gzip), CIFAR python batches, scikit-learn digits, and their
errors.  Every file is written here in its format; nothing depends on installed data."""
import gzip
import pickle

import numpy as np
import pytest
import torch

from know_kernels.research import data
from know_kernels.research.data import load_dataset, parse_dataset_list, read_cifar_batch, read_idx

from support.datasets import idx_bytes, write_idx, write_mnist_dir


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.float32])
def test_read_idx_roundtrip(tmp_path, compress, dtype):
    array = (np.random.default_rng(1).standard_normal((5, 4, 3)) * 100).astype(dtype)
    got = read_idx(write_idx(tmp_path / "a.idx", array, compress))
    assert got.dtype == np.dtype(dtype) and got.dtype.isnative
    np.testing.assert_array_equal(got, array)


def test_read_idx_errors_name_the_file(tmp_path):
    raw = idx_bytes(np.zeros((4, 28, 28), np.uint8))
    truncated = tmp_path / "train-images-idx3-ubyte"
    truncated.write_bytes(raw[:-7])
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.*truncated"):
        read_idx(truncated)
    short_header = tmp_path / "short"
    short_header.write_bytes(raw[:9])
    with pytest.raises(ValueError, match="short.*truncated IDX header"):
        read_idx(short_header)
    bad_magic = tmp_path / "notidx"
    bad_magic.write_bytes(b"\x89PNG" + raw[4:])
    with pytest.raises(ValueError, match="notidx.*not an IDX file"):
        read_idx(bad_magic)
    bad_gz = tmp_path / "broken.gz"
    bad_gz.write_bytes(gzip.compress(raw)[:-20])
    with pytest.raises(ValueError, match="broken.gz.*gzip"):
        read_idx(bad_gz)


@pytest.mark.parametrize("compress,dotted", [(True, False), (False, True)])
def test_load_mnist_from_idx(tmp_path, compress, dotted):
    arrays = write_mnist_dir(tmp_path / "mnist", compress=compress, dotted=dotted)
    split = load_dataset("mnist", tmp_path)
    x, y = split.train.tensors
    assert x.shape == (30, 1, 28, 28) and x.dtype == torch.float32 and split.in_shape == (1, 28, 28)
    sep = "." if dotted else "-"
    np.testing.assert_array_equal(y.numpy(), arrays[f"train-labels{sep}idx1-ubyte"])
    # standardised with the training split's own statistics
    assert abs(x.mean().item()) < 1e-4 and abs(x.std().item() - 1) < 1e-3
    # the standardisation is affine and increasing: pixel order is kept
    raw = arrays[f"train-images{sep}idx3-ubyte"].reshape(-1).astype(np.float64)
    assert np.corrcoef(raw, x.reshape(-1).double().numpy())[0, 1] > 0.9999
    assert split.test.tensors[0].shape == (12, 1, 28, 28) and split.num_classes == 10


def test_train_and_test_size_keep_seeded_subsets(tmp_path):
    write_mnist_dir(tmp_path)
    a = load_dataset("mnist", tmp_path, train_size=10, test_size=5, seed=3)
    b = load_dataset("mnist", tmp_path, train_size=10, test_size=5, seed=3)
    c = load_dataset("mnist", tmp_path, train_size=10, test_size=500, seed=4)
    assert len(a.train) == 10 and len(a.test) == 5 and len(c.test) == 12  # test_size caps
    assert torch.equal(a.train.tensors[0], b.train.tensors[0])
    assert not torch.equal(a.train.tensors[1], c.train.tensors[1]) or \
        not torch.equal(a.train.tensors[0], c.train.tensors[0])
    with pytest.raises(ValueError, match="train_size"):
        load_dataset("mnist", tmp_path, train_size=0)


def test_mismatched_idx_images_and_labels(tmp_path):
    write_mnist_dir(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(3, np.uint8), compress=True)
    with pytest.raises(ValueError, match="t10k-images.*do not match.*t10k-labels"):
        load_dataset("mnist", tmp_path)


def test_missing_datasets_say_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DEBIAN_DIRS", {"fashion-mnist": tmp_path / "nowhere"})
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", tmp_path)
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte.*--data-dir"):
        load_dataset("mnist", tmp_path)
    with pytest.raises(FileNotFoundError, match="cifar-10-python.tar.gz"):
        load_dataset("cifar10", tmp_path)
    with pytest.raises(FileNotFoundError, match="needs --data-dir"):
        load_dataset("cifar100")
    with pytest.raises(ValueError, match="unknown dataset 'svhn'"):
        load_dataset("svhn")


def test_fashion_mnist_found_in_debian_directory(tmp_path, monkeypatch):
    write_mnist_dir(tmp_path / "debian", n_train=7)
    monkeypatch.setattr(data, "DEBIAN_DIRS", {"fashion-mnist": tmp_path / "debian"})
    assert len(load_dataset("fashion-mnist").train) == 7


def write_cifar_batch(path, n, label_key="labels", seed=0, protocol=2):
    rng = np.random.default_rng(seed)
    batch = {b"batch_label": b"testing batch", b"data": rng.integers(0, 256, (n, 3072),
                                                                     dtype=np.uint8),
             label_key.encode(): rng.integers(0, 10, n).tolist(),
             b"filenames": [b"x.png"] * n}
    path.write_bytes(pickle.dumps(batch, protocol=protocol))
    return batch


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_read_cifar_batch(tmp_path, protocol):
    batch = write_cifar_batch(tmp_path / "data_batch_1", 4, protocol=protocol)
    x, y = read_cifar_batch(tmp_path / "data_batch_1")
    assert x.shape == (4, 3, 32, 32) and x.dtype == np.uint8 and y.dtype == np.int64
    np.testing.assert_array_equal(x.reshape(4, -1), batch[b"data"])
    np.testing.assert_array_equal(y, batch[b"labels"])


def test_cifar10_and_cifar100_directories(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    for i in range(1, 6):
        write_cifar_batch(root / f"data_batch_{i}", 2, seed=i)
    write_cifar_batch(root / "test_batch", 3, seed=9)
    split = load_dataset("cifar10", tmp_path)
    assert split.train.tensors[0].shape == (10, 3, 32, 32) and len(split.test) == 3
    assert split.in_shape == (3, 32, 32) and split.num_classes == 10

    root100 = tmp_path / "c100"
    root100.mkdir()
    write_cifar_batch(root100 / "train", 6, label_key="fine_labels")
    write_cifar_batch(root100 / "test", 2, label_key="fine_labels")
    split = load_dataset("cifar100", root100)  # batches directly in --data-dir
    assert len(split.train) == 6 and split.num_classes == 100

    (root / "data_batch_4").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_4"):
        load_dataset("cifar10", tmp_path)


class _Evil:
    def __reduce__(self):
        import os
        return (os.system, ("echo pwned > /dev/null",))


def test_cifar_unpickler_refuses_code(tmp_path):
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": _Evil(), b"labels": [0]}, protocol=2))
    with pytest.raises(ValueError, match="data_batch_1.*posix.system|data_batch_1.*os.system"):
        read_cifar_batch(path)


def test_cifar_truncated_or_malformed(tmp_path):
    write_cifar_batch(tmp_path / "good", 4)
    truncated = tmp_path / "test_batch"
    truncated.write_bytes((tmp_path / "good").read_bytes()[:-100])
    with pytest.raises(ValueError, match="test_batch.*not a readable CIFAR"):
        read_cifar_batch(truncated)
    wrong = tmp_path / "wrong"
    wrong.write_bytes(pickle.dumps({b"data": np.zeros((2, 10), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(ValueError, match="wrong.*3072"):
        read_cifar_batch(wrong)
    no_labels = tmp_path / "nolabels"
    no_labels.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)}))
    with pytest.raises(ValueError, match="nolabels.*missing"):
        read_cifar_batch(no_labels)


def test_digits_bundled_with_scikit_learn():
    split = load_dataset("digits")
    assert split.in_shape == (1, 28, 28) and split.num_classes == 10
    assert len(split.train) + len(split.test) == 1797
    small = load_dataset("digits", digits_size=8)
    assert small.in_shape == (1, 8, 8)
    # a seeded split: the same test images both times, disjoint from training
    again = load_dataset("digits", digits_size=8)
    assert torch.equal(small.test.tensors[0], again.test.tensors[0])
    train = {tuple(r) for r in small.train.tensors[0].reshape(len(small.train), -1).tolist()}
    test = [tuple(r) for r in small.test.tensors[0].reshape(len(small.test), -1).tolist()]
    assert sum(t in train for t in test) <= len(test) // 50  # digits holds few duplicates


def test_parse_dataset_list():
    assert parse_dataset_list("fashion-mnist, digits") == ("fashion-mnist", "digits")
    with pytest.raises(ValueError, match="imagenet"):
        parse_dataset_list("digits,imagenet")
    with pytest.raises(ValueError, match="empty"):
        parse_dataset_list(" , ")
