"""Offline image-classification data for collecting forgetting trajectories.

Readers for the usual on-disk formats, never a download:

* IDX (MNIST, Fashion-MNIST), plain or gzip-compressed.  Debian's ``dataset-fashion-mnist``
  package installs Fashion-MNIST in ``/usr/share/datasets/fashion-mnist``, which is searched
  when no directory is given.
* CIFAR-10 / CIFAR-100 "python version" pickle batches, read through an unpickler that only
  admits the few numpy reconstructors such a batch needs, so a hostile file cannot run code.
* scikit-learn's bundled 8x8 digits (ships inside scikit-learn), optionally resized to 28x28.

``load_dataset(name, ...)`` returns a :class:`DataSplit` of float32 tensors standardised per
channel with the training split's statistics.  A file that is missing, truncated or not in the
expected format raises an error naming it (and, when missing, saying how to get it).
"""
from __future__ import annotations

import math
import os
import pickle
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import TensorDataset

PathLike = Union[str, os.PathLike]

DATASETS = ("mnist", "fashion-mnist", "cifar10", "cifar100", "digits")
DEBIAN_DIRS = {"fashion-mnist": Path("/usr/share/datasets/fashion-mnist")}

# IDX type byte -> big-endian numpy dtype (the format's own table).
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IDX_NAMES = {
    "train_images": ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
    "train_labels": ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte"),
    "test_images": ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
    "test_labels": ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"),
}
_CIFAR_LAYOUT = {
    # name: (sub-directory in the official archive, train files, test file, label key, classes)
    "cifar10": ("cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)),
                "test_batch", "labels", 10),
    "cifar100": ("cifar-100-python", ("train",), "test", "fine_labels", 100),
}
_HOW_TO_GET = {
    "fashion-mnist": "install it with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu) or "
                     "put the four IDX files (train-images-idx3-ubyte[.gz], ...) in --data-dir",
    "mnist": "put the four MNIST IDX files (train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte"
             "[.gz], t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz]) in --data-dir "
             "or in its mnist/ sub-directory",
    "cifar10": "extract cifar-10-python.tar.gz (the 'python version') into --data-dir, giving "
               "--data-dir/cifar-10-batches-py/data_batch_1 ...",
    "cifar100": "extract cifar-100-python.tar.gz (the 'python version') into --data-dir, giving "
                "--data-dir/cifar-100-python/train and test",
}


@dataclass(frozen=True)
class DataSplit:
    """A dataset ready for training: ``train``/``test`` are TensorDatasets of
    (float32 images (N, C, H, W), int64 labels (N,))."""
    name: str
    train: TensorDataset
    test: TensorDataset
    num_classes: int

    @property
    def in_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.tensors[0].shape[1:])


# ----------------------------------------------------------------------------------- IDX

# An IDX file's header is at most 4 + 4 * 255 bytes.
_IDX_MAX_HEADER = 4 + 4 * 255


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{path}: cannot read ({exc})") from exc


def _gunzip(raw: bytes, limit: int, path: Path) -> bytes:
    """At most the first ``limit`` bytes of gzip data ``raw`` (all its members), decompressed
    no further: a small file cannot expand past what its reader asks for."""
    parts, total, data = [], 0, raw
    stream = zlib.decompressobj(wbits=31)
    try:
        while data and total < limit:
            chunk = stream.decompress(data, min(limit - total, 1 << 26))
            parts.append(chunk)
            total += len(chunk)
            data = stream.unconsumed_tail
            if stream.eof:
                data = stream.unused_data
                if data:
                    stream = zlib.decompressobj(wbits=31)   # another member follows
            elif not chunk and not data:
                break
    except zlib.error as exc:
        raise ValueError(f"{path}: corrupt or truncated gzip data ({exc})") from exc
    if total < limit and not stream.eof:
        raise ValueError(f"{path}: corrupt or truncated gzip data (the stream ends early)")
    return b"".join(parts)


def read_idx(path: PathLike) -> np.ndarray:
    """An IDX file (plain or gzip) as a numpy array in native byte order."""
    path = Path(path)
    raw = _read_bytes(path)
    compressed = raw[:2] == b"\x1f\x8b"
    data = _gunzip(raw, _IDX_MAX_HEADER, path) if compressed else raw
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (bad magic number {data[:4].hex() or 'empty'})")
    ndim = data[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise ValueError(f"{path}: truncated IDX header")
    shape = tuple(int(v) for v in np.frombuffer(data, ">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = math.prod(shape) * dtype.itemsize   # Python integers: no overflow
    if compressed:   # one byte past what the header declares tells an oversized file
        data = _gunzip(raw, header + expected + 1, path)
    if len(data) - header != expected:
        more = "more than " if len(data) - header > expected else ""
        raise ValueError(f"{path}: truncated or oversized IDX data: header says shape {shape} "
                         f"({expected} bytes) but {more}{min(len(data) - header, expected)} "
                         f"bytes follow")
    array = np.frombuffer(data, dtype, offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=False)


def _find_idx(directory: Path, key: str) -> Optional[Path]:
    for stem in _IDX_NAMES[key]:
        for suffix in ("", ".gz"):
            candidate = directory / (stem + suffix)
            if candidate.is_file():
                return candidate
    return None


def _idx_dirs(name: str, data_dir: Optional[PathLike]) -> list[Path]:
    dirs = []
    if data_dir is not None:
        base = Path(data_dir)
        dirs += [base / name, base]
    if name in DEBIAN_DIRS:
        dirs.append(DEBIAN_DIRS[name])
    return dirs


def load_idx_arrays(name: str, data_dir: Optional[PathLike] = None):
    """(train images, train labels, test images, test labels) of an IDX dataset, searched in
    ``data_dir/name``, ``data_dir`` and (Fashion-MNIST) Debian's install directory."""
    searched = _idx_dirs(name, data_dir)
    for directory in searched:
        found = {key: _find_idx(directory, key) for key in _IDX_NAMES}
        if all(found.values()):
            arrays = {key: read_idx(path) for key, path in found.items()}
            for part in ("train", "test"):
                images, labels = arrays[f"{part}_images"], arrays[f"{part}_labels"]
                if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
                    raise ValueError(f"{found[part + '_images']}: {images.shape} images do not "
                                     f"match {found[part + '_labels']}: {labels.shape} labels")
            return (arrays["train_images"], arrays["train_labels"],
                    arrays["test_images"], arrays["test_labels"])
    where = ", ".join(str(d) for d in searched) or "(no directory: pass --data-dir)"
    raise FileNotFoundError(f"{name} not found in {where}; {_HOW_TO_GET[name]}")


# ---------------------------------------------------------------------------------- CIFAR

class _BatchUnpickler(pickle.Unpickler):
    """Admits only what a CIFAR batch (a dict of bytes, lists and one uint8 array) needs."""
    _ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        # protocol 0-2 pickles written by Python 3 encode bytes through _codecs.encode.
        ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a data batch")
        return super().find_class(module, name)


def read_cifar_batch(path: PathLike, label_key: str = "labels") -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR python batch: (uint8 images (N, 3, 32, 32), int64 labels (N,))."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            # The official batches were pickled by Python 2: their strings load as bytes.
            batch = _BatchUnpickler(fh, encoding="bytes").load()
    except OSError as exc:
        raise ValueError(f"{path}: cannot read ({exc})") from exc
    except Exception as exc:  # a truncated or foreign pickle raises many unrelated types
        raise ValueError(f"{path}: not a readable CIFAR python batch ({type(exc).__name__}: "
                         f"{exc})") from exc
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: expected a dict, got {type(batch).__name__}")
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or label_key not in batch:
        raise ValueError(f"{path}: missing 'data' or {label_key!r} (keys: {sorted(batch)})")
    data, labels = batch["data"], np.asarray(batch[label_key])
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: 'data' must be a uint8 (N, 3072) array, got "
                         f"{getattr(data, 'dtype', type(data))} {getattr(data, 'shape', '')}")
    if labels.shape != (data.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{path}: {label_key!r} must hold {data.shape[0]} integer labels")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def load_cifar_arrays(name: str, data_dir: Optional[PathLike]):
    subdir, train_files, test_file, label_key, _ = _CIFAR_LAYOUT[name]
    if data_dir is None:
        raise FileNotFoundError(f"{name} needs --data-dir; {_HOW_TO_GET[name]}")
    base = Path(data_dir)
    for directory in (base / subdir, base):
        if (directory / test_file).is_file():
            break
    else:
        raise FileNotFoundError(f"{name} not found in {base / subdir} or {base}; "
                                f"{_HOW_TO_GET[name]}")
    missing = [f for f in train_files if not (directory / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{name}: {directory} lacks {', '.join(missing)}; "
                                f"{_HOW_TO_GET[name]}")
    train = [read_cifar_batch(directory / f, label_key) for f in train_files]
    test_x, test_y = read_cifar_batch(directory / test_file, label_key)
    return (np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]),
            test_x, test_y)


# --------------------------------------------------------------------------------- digits

def load_digits_arrays(size: int = 28, test_fraction: float = 0.2, seed: int = 0):
    """scikit-learn's 1,797 8x8 digits as uint8-range float images (N, size, size), split
    into train/test by a seeded permutation (the bundled set has no official split)."""
    if size < 8:
        raise ValueError(f"digits size must be >= 8, got {size}")
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise FileNotFoundError("the digits dataset ships with scikit-learn: "
                                "`pip install scikit-learn`") from exc
    bunch = load_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32) * (255.0 / 16.0))[:, None]
    if size != 8:
        images = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear",
                                                 align_corners=False)
    images = images[:, 0].numpy()
    labels = bunch.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(labels))
    n_test = int(round(test_fraction * len(labels)))
    test, train = order[:n_test], order[n_test:]
    return images[train], labels[train], images[test], labels[test]


# ---------------------------------------------------------------------------------- common

def _subset(x: np.ndarray, y: np.ndarray, size: Optional[int], rng: np.random.Generator,
            what: str):
    if size is None or size >= len(y):
        return x, y
    if size < 1:
        raise ValueError(f"{what} must be >= 1, got {size}")
    keep = np.sort(rng.choice(len(y), size=size, replace=False))
    return x[keep], y[keep]


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(np.array(images, dtype=np.float32)).div_(255.0)
    return x[:, None] if x.dim() == 3 else x


def load_dataset(name: str, data_dir: Optional[PathLike] = None, *,
                 train_size: Optional[int] = None, test_size: Optional[int] = None,
                 seed: int = 0, digits_size: int = 28) -> DataSplit:
    """Load ``name`` (one of :data:`DATASETS`) from local files.

    ``train_size``/``test_size`` keep a seeded random subset of at most that many samples
    of each split (None: all).
    Images are scaled to [0, 1] and standardised per channel with the kept training images'
    mean and standard deviation.
    """
    if name in ("mnist", "fashion-mnist"):
        arrays = load_idx_arrays(name, data_dir)
    elif name in _CIFAR_LAYOUT:
        arrays = load_cifar_arrays(name, data_dir)
    elif name == "digits":
        arrays = load_digits_arrays(digits_size)
    else:
        raise ValueError(f"unknown dataset {name!r}; choose from {DATASETS}")
    rng = np.random.default_rng(seed)
    train_x, train_y = _subset(arrays[0], arrays[1], train_size, rng, "train_size")
    test_x, test_y = _subset(arrays[2], arrays[3], test_size, rng, "test_size")
    num_classes = _CIFAR_LAYOUT[name][4] if name in _CIFAR_LAYOUT else 10
    for part, labels in (("train", train_y), ("test", test_y)):
        if labels.min() < 0 or labels.max() >= num_classes:
            raise ValueError(f"{name} {part} labels outside 0..{num_classes - 1}")
    train_t, test_t = _to_tensor(train_x), _to_tensor(test_x)
    mean = train_t.mean(dim=(0, 2, 3), keepdim=True)
    std = train_t.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    return DataSplit(
        name=name,
        train=TensorDataset((train_t - mean) / std, torch.from_numpy(train_y.astype(np.int64))),
        test=TensorDataset((test_t - mean) / std, torch.from_numpy(test_y.astype(np.int64))),
        num_classes=num_classes,
    )


def parse_dataset_list(spec: Union[str, Sequence[str]]) -> tuple[str, ...]:
    """``"fashion-mnist,digits"`` -> ("fashion-mnist", "digits"), each checked."""
    names = tuple(s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec)
                  if s.strip())
    unknown = [n for n in names if n not in DATASETS]
    if not names or unknown:
        raise ValueError(f"datasets: unknown {unknown or 'empty list'}; choose from {DATASETS}")
    return names
