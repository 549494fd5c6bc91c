"""The library's modules import each other one way: no cycles, counting imports in functions and for typing."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "poolkit"


def _library_modules() -> dict[str, Path]:
    found = {f"poolkit.{p.stem}": p for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    found.update({f"poolkit.integrations.{p.stem}": p for p in (PACKAGE / "integrations").glob("*.py")})
    return found


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Library modules ``path`` imports anywhere in it (top level, in functions, under TYPE_CHECKING)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        out.update(name for name in names if name in modules)
    return out


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph``, or None."""
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return [*path[path.index(node) :], node]
        if node in done:
            return None
        for target in sorted(graph[node]):
            found = visit(target, [*path, node])
            if found is not None:
                return found
        done.add(node)
        return None

    for start in sorted(graph):
        found = visit(start, [])
        if found is not None:
            return found
    return None


def test_library_modules_import_each_other_without_cycles() -> None:
    modules = _library_modules()
    graph = {name: _imports(path, set(modules)) - {name} for name, path in modules.items()}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])
    # The cycle this replaced (issue 17): the pools and rls imported each other.
    assert "poolkit.pool" not in graph["poolkit.rls"]
    assert "poolkit.sync_pool" not in graph["poolkit.rls"]


def test_the_cycle_check_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_the_sync_pool_reaches_no_driver_module_of_the_async_pool() -> None:
    modules = _library_modules()
    reached: set[str] = set()
    todo = ["poolkit.sync_pool"]
    while todo:
        name = todo.pop()
        for target in _imports(modules[name], set(modules)):
            if target not in reached:
                reached.add(target)
                todo.append(target)
    assert not {"poolkit.pool", "poolkit.driver_asyncpg", "poolkit.driver_psycopg", "poolkit.psycopg_async"} & reached
