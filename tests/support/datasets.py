"""Dataset files written in their formats, so that no test depends on installed data."""
import gzip

import numpy as np

_IDX_CODES = {np.uint8: 0x08, np.int32: 0x0C, np.float32: 0x0D}


def idx_bytes(array: np.ndarray) -> bytes:
    code = _IDX_CODES[array.dtype.type]
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_idx(path, array, compress=False):
    raw = idx_bytes(array)
    path.write_bytes(gzip.compress(raw) if compress else raw)
    return path


def write_mnist_dir(directory, n_train=30, n_test=12, compress=True, dotted=False, seed=0):
    """An (Fashion-)MNIST directory of random images and labels; returns the arrays."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    sep = "." if dotted else "-"
    suffix = ".gz" if compress else ""
    arrays = {
        f"train-images{sep}idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        f"train-labels{sep}idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        f"t10k-images{sep}idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        f"t10k-labels{sep}idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for name, array in arrays.items():
        write_idx(directory / (name + suffix), array, compress)
    return arrays
