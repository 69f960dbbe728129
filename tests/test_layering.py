"""The data plane never reaches into the control plane: `actors/` imports nothing
from `cluster/` (the control plane decides, the data plane computes), at the top
of a module or inside a function. No Ray."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.fast

ACTORS = Path(__file__).resolve().parent.parent / "actors"


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.append(node.module)
    return names


def test_actors_never_import_cluster():
    files = sorted(ACTORS.rglob("*.py"))
    assert len(files) > 30  # the package is where it should be
    offending = {str(f.relative_to(ACTORS)): name for f in files for name in _imports(f)
                 if name == "cluster" or name.startswith("cluster.")}
    assert offending == {}
