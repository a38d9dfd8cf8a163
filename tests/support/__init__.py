"""What several test modules share: row and checkpoint generators, file writers, the kernel
checks that more than one backend's tests run, and the repository's paths.  Test modules
import from here, never from each other, so that each one can be run, moved or deleted
alone.  pytest puts tests/ on sys.path (pyproject's ``pythonpath``), from any folder."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "know_kernels"
RECIPES = ROOT / "python"
README = ROOT / "README.md"
CUDA_DIR = ROOT / "csrc" / "cuda"
