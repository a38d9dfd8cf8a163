"""The python/ recipes run as a user runs them."""
import importlib.util
import subprocess
import sys
from pathlib import Path


def run_recipe_smoke(script: Path, out: Path, capsys) -> None:
    """``script --smoke`` as a user runs it, then again in this process (a refusal comes
    before any slow import): an existing --out is refused with one line and exit status 2."""
    proc = subprocess.run([sys.executable, str(script), "--smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| know_step1/ |" in proc.stdout
    spec = importlib.util.spec_from_file_location(script.stem, script)
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    capsys.readouterr()
    assert recipe.main(["--smoke", "--out", str(out)]) == 2
    assert capsys.readouterr().err == (f"{script.name}: error: {out} exists; pass --force to "
                                       f"overwrite it\n")
