"""python/predict_own_checkpoints.py on checkpoint files: writes the predictions, and refuses
to overwrite them without --force."""
import subprocess
import sys

import torch
from safetensors.torch import load_file

from know_kernels import predict

from support import RECIPES
from support.checkpoints import forgetting_checkpoints, save_checkpoints

RECIPE = RECIPES / "predict_own_checkpoints.py"


def run(*args):
    return subprocess.run([sys.executable, str(RECIPE), *map(str, args)], capture_output=True,
                          text=True, timeout=300)


def test_writes_predictions_and_never_overwrites_silently(tmp_path):
    cks = forgetting_checkpoints()
    paths = save_checkpoints(cks, tmp_path, "pt")
    out = tmp_path / "know"
    first = run(*paths, "--out", out, "--steps", "2", "--keep", "3.*")
    assert first.returncode == 0, first.stderr
    want = predict(cks, steps=2, keep=["3.*"])
    for k in (1, 2):
        got = load_file(str(out / f"know_step{k}.safetensors"))
        assert all(torch.equal(got[n], w) for n, w in want[k - 1].items())
    before = (out / "know_step1.safetensors").read_bytes()
    again = run(*paths, "--out", out, "--steps", "2")
    assert again.returncode == 2
    assert again.stderr.strip().endswith("know_step1.safetensors exists; pass --force to overwrite it")
    assert (out / "know_step1.safetensors").read_bytes() == before
    forced = run(*paths, "--out", out, "--steps", "2", "--force")
    assert forced.returncode == 0, forced.stderr
    assert (out / "know_step1.safetensors").read_bytes() != before
