"""The core never imports the measuring tools: only the public API and the command line reach into `layerfuse.lab`."""

from __future__ import annotations

import ast
from pathlib import Path

import layerfuse

PACKAGE = Path(layerfuse.__file__).parent
ABOVE_THE_CORE = {PACKAGE / "__init__.py", *(PACKAGE / "cli").glob("*.py")}


def imported(path: Path) -> set[str]:
    """Every module a file imports, and every name it imports from one, as absolute dotted paths."""
    package = ("layerfuse", *path.relative_to(PACKAGE).parent.parts)
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1]) if node.level else ""
            module = ".".join(part for part in (base, node.module) if part)
            names |= {module} | {f"{module}.{alias.name}" for alias in node.names}
    return names


def test_no_module_of_the_core_imports_the_lab():
    core = [path for path in PACKAGE.rglob("*.py") if "lab" not in path.relative_to(PACKAGE).parts[:1]]
    reaching = {
        str(path.relative_to(PACKAGE)): sorted(name for name in imported(path) if name.startswith("layerfuse.lab"))
        for path in core
        if path not in ABOVE_THE_CORE
    }
    assert {path: names for path, names in reaching.items() if names} == {}
    assert "layerfuse.lab.bench" in imported(PACKAGE / "cli" / "bench.py")
    assert "layerfuse.errors" in imported(PACKAGE / "run" / "job.py")
