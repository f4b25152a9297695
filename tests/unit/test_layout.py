"""The package's shape: no import circle (features/ included), no library module importing the demo,
local disk and object store told apart in one module only."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).parents[2] / "recsketch"


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Each module of the package -> the package modules it imports (at any depth of its code)."""
    modules = {_module(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("recsketch"):
                found.add(node.module)
                found.update(f"{node.module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names if alias.name.startswith("recsketch"))
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node], _ = 1, stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_package_has_no_import_circle() -> None:
    graph = _imports()
    assert graph["recsketch.features.runtimes"] >= {"recsketch.features.backbones", "recsketch.features.extract"}
    assert _cycle(graph) is None


def test_only_the_command_line_imports_the_demo() -> None:
    importers = {m for m, deps in _imports().items() if "recsketch.demo" in deps}
    assert importers == {"recsketch.cli"}


def test_local_disk_and_object_store_are_told_apart_only_in_storage() -> None:
    check = re.compile(r"isinstance\([^)]*\b(Path|ObjectLocation)\b")
    offenders = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                 if p.name != "storage.py" and check.search(p.read_text())]
    assert offenders == []


def test_no_module_keeps_the_thread_count_in_a_global() -> None:
    for path in PACKAGE.rglob("*.py"):
        assert "global _" not in path.read_text(), path
