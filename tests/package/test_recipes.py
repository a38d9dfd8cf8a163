"""The python/ recipes run as a user would run them (their quick modes)."""
import subprocess
import sys

from support import RECIPES


def test_demo_step_by_step_quick(tmp_path, data_args, known_path):
    out = tmp_path / "steps"
    proc = subprocess.run(
        [sys.executable, str(RECIPES / "demo_step_by_step.py"), "--quick", "--seeds", "2", "--replicates", "2",
         "--known", known_path, "--out", str(out), *data_args],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Θ^0:" in proc.stdout and "converged:" in proc.stdout
    assert "| KNOWN | ×2 |" in proc.stdout and "| Matched noise (KNOWN) | ×2 |" in proc.stdout
    assert "Ladder check" in proc.stdout
    for name in ("know_x2.safetensors", "know_x4.safetensors", "know_x8.safetensors"):
        assert (out / "replicate0" / name).is_file() and (out / "replicate1" / name).is_file()
    assert (out / "transfer.png").is_file()
