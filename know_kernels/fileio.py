"""Reading checkpoints safely and writing any file atomically."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import json
import os
import re
import secrets
import tempfile
from pathlib import Path
from typing import Iterator, Mapping, Optional, Sequence, Union

import torch

PathLike = Union[str, os.PathLike]
# .bin: Hugging Face's torch checkpoints; .ckpt: Lightning's (its state_dict entry is taken).
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
CHECKPOINT_SUFFIXES = TORCH_SUFFIXES + (".safetensors",)
# torch colours parts of its weights-only refusal; a message for a log or a terminal has none.
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Read once: os.umask can only be read by setting it, which would race with other threads.
_UMASK = _read_umask()


class OutputBusyError(RuntimeError):
    """Another process is writing into the same output (it holds its lock)."""


def naming(exc: OSError, path: PathLike, always: bool = False) -> OSError:
    """``exc`` as the same error naming ``path``: a failed read or write of an open file
    names no file (a full disk reads ``[Errno 28] No space left on device``).  An error that
    names a file already keeps it unless ``always`` (its file is a temporary of ``path``)."""
    if not exc.errno or (exc.filename is not None and not always):
        return exc
    return type(exc)(exc.errno, exc.strerror or os.strerror(exc.errno), str(path))


def unique_token() -> str:
    """A name part no other process (this process id) or call (random) uses at once."""
    return f"{os.getpid()}-{secrets.token_hex(4)}"


def sweep_stale(path: PathLike) -> None:
    """Remove the temporary files of earlier, interrupted writes of ``path`` (``.NAME.*``
    ending ``.partial`` or ``.tmp``); only for a process holding the output's lock."""
    path = Path(path)
    pattern = glob.escape(str(path.parent / f".{path.name}.")) + "*"
    for stale in glob.glob(pattern):
        if stale.endswith((".partial", ".tmp")):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(stale)


@contextlib.contextmanager
def output_lock(target: PathLike, file: bool = False) -> Iterator[Path]:
    """Hold ``target/.know.lock`` (for an output ``file``: ``.NAME.lock`` beside it)
    exclusively for the block, so two runs never write the same output at once: another
    holder makes this raise :class:`OutputBusyError` naming ``target``, before anything is
    written.  The directory (and its parents) are made if need be; the lock file, and each
    directory made here that is still empty, are removed afterwards.  A killed holder's lock
    is released by the kernel."""
    target = Path(target)
    directory = target.parent if file else target
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"output directory {directory} is a file; give a directory")
    made = [d for d in (*reversed(directory.parents), directory) if not d.exists()]
    lock = directory / (f".{target.name}.lock" if file else ".know.lock")
    try:
        while True:
            try:
                directory.mkdir(parents=True, exist_ok=True)
                fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as exc:   # an unwritable or read-only place: name the output
                raise naming(exc, target, always=True) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    where = "this file" if file else "into this directory"
                    raise OutputBusyError(f"{target}: another know run is writing {where}; "
                                          f"wait for it to finish or choose another "
                                          f"output") from None
                raise naming(exc, target, always=True) from None
            # The holder before us may have removed the file after we opened it: the lock
            # counts only while the name still leads to the file we locked.
            try:
                if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
    except BaseException:
        for d in reversed(made):
            with contextlib.suppress(OSError):
                d.rmdir()
        raise
    try:
        yield lock
    finally:
        with contextlib.suppress(OSError):
            lock.unlink()
        os.close(fd)
        for d in reversed(made):
            with contextlib.suppress(OSError):
                d.rmdir()


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (a name unique to this process and call);
    rename it over ``path`` only on success, so a crash or a full disk never leaves a
    partial file under the final name, nor one run's file under another's."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise naming(exc, path, always=True) from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        try:
            yield tmp_path
            with open(tmp_path, "rb+") as fh:
                os.fsync(fh.fileno())
            # mkstemp makes the file private (0600); outputs get the mode any new file would.
            os.chmod(tmp_path, 0o666 & ~_UMASK)
            os.replace(tmp_path, path)
        except OSError as exc:
            raise naming(exc, path) from None
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
    """A flat state dict from a torch checkpoint (``TORCH_SUFFIXES``, loaded weights-only;
    a ``state_dict`` entry, as Lightning's ``.ckpt`` has, is taken and the rest ignored) or
    from ``.safetensors``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises several unrelated types
            raise ValueError(f"{path}: not a readable safetensors file ({exc})") from exc
    if path.suffix not in TORCH_SUFFIXES:
        raise ValueError(f"{path}: unsupported checkpoint type {path.suffix!r}; "
                         f"use one of {CHECKPOINT_SUFFIXES}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path}: not a weights-only torch checkpoint "
                         f"({_torch_load_reason(exc)})") from exc
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a state dict of tensors")
    return dict(obj)


def _torch_load_reason(exc: Exception) -> str:
    """torch.load's reason in one plain line: for a pickled object (a whole nn.Module, say)
    the global it refused, not its advice on loading untrusted code."""
    text = _ANSI.sub("", str(exc))
    found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if found:
        return (f"it holds a pickled {found.group(1)}, which weights-only loading refuses; "
                f"save model.state_dict() instead")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def save_safetensors(state: Mapping[str, torch.Tensor], path: PathLike,
                     metadata: Mapping[str, str] | None = None) -> None:
    from safetensors.torch import save_file
    tensors = {k: v.detach().contiguous() for k, v in state.items()}
    with atomic_path(path) as tmp:
        try:
            save_file(tensors, str(tmp), metadata=dict(metadata) if metadata else None)
        except Exception as exc:  # a failed write comes back as SafetensorError("… (os error 28)")
            found = re.search(r"\(os error (\d+)\)", str(exc))
            if not found:
                raise
            code = int(found.group(1))
            raise OSError(code, os.strerror(code), str(path)) from None


def read_at(fd: int, out: torch.Tensor, offset: int, what: str) -> None:
    """Fill the contiguous CPU tensor ``out`` with the bytes of ``fd`` from ``offset`` by
    positional reads (no memory map: nothing read stays resident); ``what`` names the data
    in the error when the file ends first."""
    view = memoryview(out.view(torch.uint8).numpy())
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            raise ValueError(f"{what}: the file ends at byte {offset + done} (truncated?)")
        done += got


def write_at(fd: int, data: torch.Tensor, offset: int) -> int:
    """Write the contiguous CPU tensor ``data`` at ``offset`` of ``fd``; returns its bytes."""
    view = memoryview(data.view(torch.uint8).numpy())
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)
    return done


def refuse_existing(paths: Sequence[PathLike], force: bool) -> None:
    """Raise for the first of ``paths`` that exists, unless ``force`` (a Python API's check,
    made before any work that the clash would waste)."""
    if not force:
        for path in paths:
            if Path(path).exists():
                raise FileExistsError(f"{path} exists; pass force=True to overwrite it")


def existing_output(out: PathLike, force: bool) -> Optional[str]:
    """Why a command may not write into ``out`` (it exists, is not an empty directory, and
    ``force`` is off), or None."""
    out = Path(out)
    if force or not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return None
    return f"{out} exists; pass --force to overwrite it"


def listing(names: Sequence[str], limit: int = 10) -> str:
    """The first ``limit`` names, comma-separated, and how many more there are."""
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def write_json(obj, path: PathLike) -> None:
    """``obj`` as indented JSON at ``path``, written atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1) + "\n", encoding="utf-8")
