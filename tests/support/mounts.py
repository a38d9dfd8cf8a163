"""Small and read-only filesystems for the full-disk tests: a tmpfs mounted for the test
(needs root and a kernel that lets this process mount; the test is skipped otherwise)."""
import contextlib
import errno
import os
import subprocess

import pytest


@contextlib.contextmanager
def tmpfs(path, size: str = "256k", readonly: bool = False):
    """A tmpfs of ``size`` at ``path`` (made) for the block, unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if readonly else "")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def fill(directory, leave: int) -> None:
    """Fill the filesystem of ``directory`` until about ``leave`` bytes are free."""
    stat = os.statvfs(directory)
    free = stat.f_bavail * stat.f_frsize
    with open(directory / "filler", "wb") as fh:
        try:
            fh.write(b"\0" * max(0, free - leave))
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise


def no_space_after(monkeypatch, limit: int) -> None:
    """``os.pwrite`` (the write layer of every output the pipeline streams) fails with ENOSPC
    once ``limit`` bytes have been written."""
    real, used = os.pwrite, [0]

    def pwrite(fd, data, offset):
        if used[0] + len(data) > limit:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        used[0] += len(data)
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
