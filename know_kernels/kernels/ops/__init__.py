"""One module per op and backend: ``<op>_<backend>.py`` holds the wrapper and the kernel."""
from __future__ import annotations

from typing import Callable

import torch


def require_runnable(backend: str, available: Callable[[torch.device], tuple[bool, str]],
                     device: torch.device) -> None:
    """Raise with the backend's own reason when ``available(device)`` says it cannot run."""
    ok, why = available(device)
    if not ok:
        raise RuntimeError(f"{backend} backend cannot run on {device}: {why}")
