"""Importing the authors' MATLAB v7.3 meta-dataset files (written here with h5py)."""
import h5py
import numpy as np
import pytest
import torch

from know_kernels.io.mat_import import import_mat, parse_mat_name, read_mat
from know_kernels.io.store import MetaDataset


def write_mat(path, n_kernels=5, m=7, k=3, stages=7, seed=0, dtype=np.float64, skip=()):
    """A file as MATLAB v7.3 writes it: a 512-byte user block with the MAT header, and each
    MATLAB array (d1, ..., dn) stored as an HDF5 dataset of shape (dn, ..., d1)."""
    rng = np.random.default_rng(seed)
    # MATLAB-order arrays, last axis = stage (0 = smallest data, stages-1 = full data)
    arrays = {"ConvWeights": rng.standard_normal((3, 3, n_kernels, stages)),
              "FCWeights": rng.standard_normal((m, stages)),
              "Bias": rng.standard_normal((k, stages))}
    with h5py.File(path, "w", userblock_size=512) as fh:
        for name, array in arrays.items():
            if name not in skip:
                fh[name] = np.ascontiguousarray(array.T).astype(dtype)  # h5py sees it reversed
    with open(path, "r+b") as fh:
        fh.write(b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 "
                 b"HDF5 schema 1.00 .".ljust(116))
    return arrays


def test_parse_mat_name():
    assert parse_mat_name("resnet_cifar10_r0.5_lr0.001_bs64.mat") == {
        "source": "resnet_cifar10", "r": 0.5, "lr": 0.001, "batch_size": 64}
    assert parse_mat_name("/x/y/cnn_r0.35_bs128_lr1e-4.mat") == {
        "source": "cnn", "r": 0.35, "lr": 1e-4, "batch_size": 128}
    assert parse_mat_name("trajectory_017.mat") == {
        "source": "trajectory_017", "r": None, "lr": None, "batch_size": None}
    with pytest.raises(ValueError, match="r=1.5"):
        parse_mat_name("net_r1.5_lr0.1_bs8.mat")


def test_read_mat_reverses_dimensions_and_stage_order(tmp_path):
    path = tmp_path / "mobilenet_fmnist_r0.6_lr0.0005_bs32.mat"
    arrays = write_mat(path)
    traj = read_mat(path)
    assert traj.stages == 7 and traj.meta["r"] == 0.6 and traj.meta["batch_size"] == 32
    conv, fc, bias = (traj.heads[h] for h in ("conv", "fc", "bias"))
    assert conv.shape == (45, 7) and fc.shape == (7, 7) and bias.shape == (3, 7)
    assert conv.dtype == torch.float32
    mat_conv = arrays["ConvWeights"]
    # column i (this package) = MATLAB stage index 6 - i; row = (n, b, a) flattened
    for i in range(7):
        for n in range(5):
            for b in range(3):
                for a in range(3):
                    assert conv[n * 9 + b * 3 + a, i].item() == pytest.approx(
                        mat_conv[a, b, n, 6 - i], rel=1e-6)
        np.testing.assert_allclose(fc[:, i].numpy(), arrays["FCWeights"][:, 6 - i], rtol=1e-6)
        np.testing.assert_allclose(bias[:, i].numpy(), arrays["Bias"][:, 6 - i], rtol=1e-6)
    assert {p["name"]: p["shape"] for p in traj.params} == {
        "ConvWeights": [3, 3, 5], "FCWeights": [7], "Bias": [3]}


def test_import_into_store_and_stream(tmp_path):
    files = []
    for seed in range(2):
        path = tmp_path / f"cnn_mnist_r0.{5 + seed}_lr0.001_bs64.mat"
        write_mat(path, n_kernels=4 + seed, seed=seed, dtype=np.float32)
        files.append(path)
    store = MetaDataset(tmp_path / "meta")
    ids = [import_mat(f, store, dtype="bfloat16") for f in files]
    assert ids == ["cnn_mnist_r0.5_lr0.001_bs64", "cnn_mnist_r0.6_lr0.001_bs64"]
    assert store.num_rows("conv") == 9 * (4 + 5)
    rows = torch.cat([r for r, _ in store.iter_chunks("conv", chunk_rows=10, order="time")])
    assert rows.dtype == torch.bfloat16 and rows.shape == (81, 7)
    first = read_mat(files[0]).heads["conv"]
    # time order = the authors' order: smallest data first
    assert torch.equal(rows[:36], first.flip(1).to(torch.bfloat16))
    assert store.runs()[ids[1]]["meta"]["r"] == 0.6


def test_partial_files_and_errors(tmp_path):
    only_fc = tmp_path / "a.mat"
    write_mat(only_fc, skip=("ConvWeights", "Bias"))
    assert set(read_mat(only_fc).heads) == {"fc"}

    empty = tmp_path / "empty.mat"
    with h5py.File(empty, "w") as fh:
        fh["Other"] = np.zeros((7, 3))
    with pytest.raises(ValueError, match="empty.mat.*none of"):
        read_mat(empty)

    wrong_rank = tmp_path / "rank.mat"
    with h5py.File(wrong_rank, "w") as fh:
        fh["ConvWeights"] = np.zeros((7, 9))
    with pytest.raises(ValueError, match="rank.mat.*ConvWeights must be a 4-D"):
        read_mat(wrong_rank)

    mismatch = tmp_path / "mismatch.mat"
    with h5py.File(mismatch, "w") as fh:
        fh["FCWeights"] = np.zeros((7, 4))
        fh["Bias"] = np.zeros((5, 4))
    with pytest.raises(ValueError, match="mismatch.mat.*Bias has 5 stages"):
        read_mat(mismatch)

    not_hdf5 = tmp_path / "text.mat"
    not_hdf5.write_bytes(b"MATLAB 5.0 MAT-file" + bytes(200))
    with pytest.raises(ValueError, match="text.mat.*not a MATLAB v7.3"):
        read_mat(not_hdf5)
    with pytest.raises(FileNotFoundError, match="nothing.mat"):
        read_mat(tmp_path / "nothing.mat")


def test_truncated_file_is_named(tmp_path):
    path = tmp_path / "big_r0.5.mat"
    write_mat(path, n_kernels=400)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="big_r0.5.mat"):
        read_mat(path)
