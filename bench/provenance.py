"""What every benchmark prints beside its numbers, so results can be traced to the code."""
from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def commit() -> str:
    """Short HEAD hash, flagged when csrc/ or know_kernels/ differ from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "csrc", "know_kernels"],
                               cwd=ROOT, capture_output=True, text=True).stdout.strip()
        return head + (" + uncommitted changes in csrc/ or know_kernels/" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
