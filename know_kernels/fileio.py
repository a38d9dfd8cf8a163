"""Reading checkpoints safely and writing any file atomically."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator, Mapping, Union

import torch

PathLike = Union[str, os.PathLike]
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".safetensors")


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Read once: os.umask can only be read by setting it, which would race with other threads.
_UMASK = _read_umask()


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` only on success,
    so a crash or a full disk never leaves a partial file under the final name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        # mkstemp makes the file private (0600); outputs get the mode any new file would.
        os.chmod(tmp_path, 0o666 & ~_UMASK)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def open_hdf5(path: PathLike, what: str, expected: str):
    """``path`` opened read-only with h5py; a missing file or one h5py cannot read gets an
    error naming it (``what``: the file's role, ``expected``: the format it should have)."""
    import h5py
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise ValueError(f"{path}: not {expected} ({exc})") from exc


def load_state_dict(path: PathLike) -> dict[str, torch.Tensor]:
    """A flat state dict from ``.pt``/``.pth`` (weights_only) or ``.safetensors``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises several unrelated types
            raise ValueError(f"{path}: not a readable safetensors file ({exc})") from exc
    if path.suffix in (".pt", ".pth"):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"{path}: not a readable weights-only torch checkpoint ({exc})") from exc
        if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
            obj = obj["state_dict"]
        if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise ValueError(f"{path}: expected a state dict of tensors")
        return dict(obj)
    raise ValueError(f"{path}: unsupported checkpoint type {path.suffix!r}; "
                     f"use one of {CHECKPOINT_SUFFIXES}")


def save_safetensors(state: Mapping[str, torch.Tensor], path: PathLike,
                     metadata: Mapping[str, str] | None = None) -> None:
    from safetensors.torch import save_file
    tensors = {k: v.detach().contiguous() for k, v in state.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=dict(metadata) if metadata else None)


def write_json(obj, path: PathLike) -> None:
    """``obj`` as indented JSON at ``path``, written atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1) + "\n", encoding="utf-8")
