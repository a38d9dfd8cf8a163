"""The compiled CPU extension, if it was built; the package works without it."""
from __future__ import annotations

try:
    from . import _C  # noqa: F401
    IMPORT_ERROR = None
except ImportError as exc:  # built without the extension, or a broken build
    _C = None
    IMPORT_ERROR = str(exc)


def require_C():
    if _C is None:
        raise RuntimeError(f"the compiled extension know_kernels._C is not available "
                           f"({IMPORT_ERROR}); reinstall with a C++ compiler, or use "
                           f"backend='reference'")
    return _C
