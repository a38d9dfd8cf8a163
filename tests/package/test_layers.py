"""The package's shape (docs/architecture.md): lower layers never import upper ones, no module
reaches into another's private names, and no module grows past 500 lines."""
import ast
from pathlib import Path

import pytest

from support import PACKAGE
LAYERS = ["fileio", "_ext", "kernels", "known", "io", "pipeline", "research", "integrations",
          "cli"]
RANK = {"fileio": 0, "_ext": 0, "kernels": 1, "known": 2, "io": 3, "pipeline": 4,
        "research": 5, "integrations": 6, "cli": 7}
MODULES = sorted(p for p in PACKAGE.rglob("*.py")
                 if p.relative_to(PACKAGE).parts[0] in LAYERS
                 or p.relative_to(PACKAGE).with_suffix("").parts[0] in LAYERS)


def dotted(path: Path) -> list[str]:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return parts[:-1] if parts[-1] == "__init__" else parts


def imports(path: Path):
    """(absolute module, imported names) for every import of the package in ``path``."""
    here = dotted(path)
    package = here if path.name == "__init__.py" else here[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                module = base + (node.module.split(".") if node.module else [])
            else:
                module = (node.module or "").split(".")
            if module[0] == "know_kernels":
                yield module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "know_kernels":
                    yield alias.name.split("."), []


def layer(module: list[str]) -> str:
    return module[1] if len(module) > 1 else "__init__"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_go_down_and_stay_public(path):
    mine = layer(dotted(path))
    for module, names in imports(path):
        theirs = layer(module)
        if theirs == "__init__":  # the package's front door imports every layer
            assert set(names) <= {"__version__", "_C", "_cuda", "_ext", "fileio"}, names
        if theirs in RANK:
            assert RANK[theirs] <= RANK[mine], f"{'.'.join(module)} is above {mine}"
        if module != dotted(path)[:len(module)]:
            private = [n for n in names if n.startswith("_") and n not in ("_C", "_cuda", "_ext")]
            assert not private, f"imports private {private} from {'.'.join(module)}"


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")),
                         ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_stay_small(path):
    assert len(path.read_text().splitlines()) <= 500
