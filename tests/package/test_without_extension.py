"""The package must keep working (reference path) when the compiled extension is missing."""
import subprocess
import sys

SCRIPT = r"""
import sys
sys.modules["know_kernels._C"] = None  # makes `from . import _C` raise ImportError
import torch
import know_kernels
from know_kernels.kernels.nowcast import backend_status, resolve_backend
from know_kernels.cli import main
assert resolve_backend("auto", torch.device("cpu"), torch.float32) == "reference"
ok, why = backend_status("cpu")
assert not ok, why
head = know_kernels.KNOWNHead(seed=0)
out = know_kernels.nowcast(torch.randn(10, 5), head)
assert out.shape == (10,) and torch.isfinite(out).all()
sys.exit(main(["info"]))
"""


def test_reference_path_and_info_without_extension():
    res = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "know_kernels._C NOT available" in res.stdout
    assert "reference backend still works" in res.stdout
