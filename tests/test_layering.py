"""The data plane never reaches into the control plane: `actors/` imports nothing
from `cluster/` (the control plane decides, the data plane computes), and no
module imports itself round a cycle, at the top of a module or inside a
function (an import inside a function hides a cycle, it does not break it)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.fast

ROOT = Path(__file__).resolve().parent.parent
ACTORS = ROOT / "actors"


def _imports(path: Path) -> list[str]:
    """Every module an import of the file names: `from a.b import c` names a.b and,
    where c is a module, a.b.c."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    return names


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while not comp or comp[-1] != v:
                comp.append(stack.pop())
                on.discard(comp[-1])
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_actors_never_import_cluster():
    files = sorted(ACTORS.rglob("*.py"))
    assert len(files) > 30  # the package is where it should be
    offending = {str(f.relative_to(ACTORS)): name for f in files for name in _imports(f)
                 if name == "cluster" or name.startswith("cluster.")}
    assert offending == {}


def test_no_import_cycles_in_the_product():
    files = sorted(f for pkg in ("actors", "cluster") for f in (ROOT / pkg).rglob("*.py"))
    modules = {_module(f): f for f in files}
    graph = {m: {n for n in _imports(f) if n in modules and n != m} for m, f in modules.items()}
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]  # the check itself
    assert _cycles(graph) == []
