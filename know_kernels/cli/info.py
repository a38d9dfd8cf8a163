"""``know info``: what this installation can do here."""
from __future__ import annotations

import os
import platform

import torch

from .. import __version__
from .._ext import IMPORT_ERROR, _C
from ..kernels.nowcast import BACKENDS, backend_status
from ..kernels.ops import nowcast_cpu


def register(sub) -> None:
    p = sub.add_parser("info", help="version, backends, CPU features, torch")
    p.set_defaults(func=run)


def run(args) -> int:
    print(f"know-kernels {__version__}")
    print(f"python       {platform.python_version()} ({platform.machine()})")
    print(f"torch        {torch.__version__} (threads: {torch.get_num_threads()}, "
          f"CUDA available: {torch.cuda.is_available()})")
    try:
        import triton
        print(f"triton       {triton.__version__} (TRITON_INTERPRET="
              f"{os.environ.get('TRITON_INTERPRET', '0')})")
    except ImportError:
        print("triton       not installed")
    if _C is None:
        print(f"extension    know_kernels._C NOT available: {IMPORT_ERROR}")
        print("             (the reference backend still works)")
    else:
        feats = ", ".join(k for k, v in _C.cpu_features().items() if v) or "none"
        print(f"extension    know_kernels._C built (OpenMP threads: {_C.openmp_max_threads()})")
        print(f"CPU features {feats}; best ISA here: {_C.best_isa()}")
        kernel, why = nowcast_cpu.bf16_kernel()
        print(f"CPU bf16     precision='bf16' {'runs ' + kernel if kernel else 'is refused'}: {why}")
    print("backends:")
    # "cuda" is listed even without a GPU so that each GPU backend says why it cannot run.
    for device in ("cpu", "cuda"):
        for name in BACKENDS:
            if (name, device) in (("cpu", "cuda"), ("cuda", "cpu")):
                continue
            ok, why = backend_status(name, device)
            print(f"  {name:<10} {device:<5} {'usable' if ok else 'unusable'}: {why}")
    return 0
