"""The ``know`` command as a subprocess, killed at seeded moments, and what a kill may leave:
helpers of the crash-safety tests (tests/reliability/)."""
import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from . import ROOT


def know_argv(*args) -> list[str]:
    """``python -m know_kernels ARGS``: the package this interpreter imports (installed
    editable in CI, or the tree named by PYTHONPATH)."""
    return [sys.executable, "-m", "know_kernels", *map(str, args)]


def environment(threads: int = 1) -> dict:
    """The test's environment with the repository first on PYTHONPATH and one thread per
    process (tiny jobs gain nothing from more, and two of them share the cores)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def run_know(*args, timeout=300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(know_argv(*args), capture_output=True, text=True, env=environment(),
                          timeout=timeout, **kw)


def start_know(*args, log=None) -> subprocess.Popen:
    """``know ARGS`` started in a session of its own, so a kill takes its workers too; its
    output goes to a pipe, or to the file ``log`` (which a test can watch while it runs)."""
    out = subprocess.PIPE if log is None else open(log, "wb")
    try:
        return subprocess.Popen(know_argv(*args), stdout=out, stderr=subprocess.STDOUT,
                                env=environment(), start_new_session=True)
    finally:
        if log is not None:
            out.close()


def writing_into(proc: subprocess.Popen, directory: Path) -> bool:
    """Whether ``proc`` holds a file under ``directory`` open (its output lock aside): it
    has begun writing there (Linux: its /proc/PID/fd links)."""
    directory = str(Path(directory).resolve()) + os.sep
    try:
        fds = os.listdir(f"/proc/{proc.pid}/fd")
    except FileNotFoundError:
        return False
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{proc.pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith(directory) and not target.endswith(".lock"):
            return True
    return False


def kill_moments(seed: int, kills: int, window: float) -> list[float]:
    """``kills`` seeded random delays, one in each of ``kills`` equal parts of ``window``
    (seconds), so that the kills spread over the whole of what a command does."""
    rng = random.Random(seed)
    return [window * (i + rng.random()) / kills for i in range(kills)]


def kill_after(proc: subprocess.Popen, begun, delay: float) -> bool:
    """Once ``begun()`` holds, wait ``delay`` seconds and SIGKILL ``proc``; False when it
    had finished before the kill (the state it left is checked all the same)."""
    wait_for(begun, proc)
    try:
        proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        kill(proc)
        return True
    return False


def wait_for(condition, proc: subprocess.Popen, timeout: float = 120.0) -> bool:
    """Poll ``condition()`` until it holds (True) or ``proc`` has exited (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.01)
    raise TimeoutError("the command neither started writing nor exited")


def kill(proc: subprocess.Popen) -> int:
    """SIGKILL ``proc``'s whole session (it and any worker processes); its exit status."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    return proc.returncode


def digests(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``, by relative path."""
    root = Path(root)
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def final_files(root: Path) -> list[Path]:
    """Files under ``root`` whose names are final (not hidden temporaries)."""
    root = Path(root)
    return [p for p in sorted(root.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in
                                       p.relative_to(root).parts)]


def hidden_files(root: Path) -> list[Path]:
    root = Path(root)
    return [p for p in sorted(root.rglob("*")) if p.is_file() and p not in final_files(root)]
