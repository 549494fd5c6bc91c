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


# The sidecar's layers, lowest first. A module may import its own layer and the ones below, never one above
# (counting imports in functions and under TYPE_CHECKING). Connections reach the services above them
# through small Protocols (metrics.CountedPool, client.ClientServices), not by importing them.
SIDECAR_LAYERS: tuple[tuple[str, frozenset[str]], ...] = (
    ("wire", frozenset({"protocol"})),
    (
        "policy",
        frozenset(
            {"auth", "config", "login", "pipeline", "pooling", "prepared", "session", "shapes", "startup", "tracker"}
        ),
    ),
    ("stats", frozenset({"metrics"})),
    ("connections", frozenset({"server", "client", "client_login", "pool"})),
    ("service", frozenset({"app", "admin", "cancel", "maintenance", "http", "cli", "__main__", "__init__"})),
)


def _sidecar_modules() -> dict[str, Path]:
    return {p.stem: p for p in (PACKAGE / "sidecar").glob("*.py")}


def _sidecar_imports(path: Path) -> set[str]:
    """The sidecar modules ``path`` imports anywhere in it, by short name."""
    names = {f"poolkit.sidecar.{stem}": stem for stem in _sidecar_modules() if stem != "__init__"}
    return {names[full] for full in _imports(path, set(names))}


def _layer_violations(layers: tuple[tuple[str, frozenset[str]], ...], graph: dict[str, set[str]]) -> list[str]:
    rank = {module: index for index, (_, modules) in enumerate(layers) for module in modules}
    return [
        f"{module} ({layers[rank[module]][0]}) imports {target} ({layers[rank[target]][0]})"
        for module, targets in sorted(graph.items())
        for target in sorted(targets)
        if rank[target] > rank[module]
    ]


def test_every_sidecar_module_has_a_layer() -> None:
    listed = [module for _, modules in SIDECAR_LAYERS for module in modules]
    assert len(listed) == len(set(listed))
    assert set(listed) == set(_sidecar_modules())


def test_sidecar_imports_run_down_the_layers() -> None:
    graph = {stem: _sidecar_imports(path) - {stem} for stem, path in _sidecar_modules().items()}
    assert _layer_violations(SIDECAR_LAYERS, graph) == []
    # The back-reference this replaced (issue 17): the "pure" session module imported the I/O module server.
    assert "server" not in graph["session"]
    lower = {m for _, modules in SIDECAR_LAYERS[:3] for m in modules}
    assert _cycle({m: graph[m] & lower for m in lower}) is None


def test_the_layer_check_finds_an_upward_import() -> None:
    layers = (("low", frozenset({"a"})), ("high", frozenset({"b"})))
    assert _layer_violations(layers, {"a": {"b"}, "b": set()}) == ["a (low) imports b (high)"]
    assert _layer_violations(layers, {"a": set(), "b": {"a"}}) == []


def test_only_the_upstream_pool_changes_a_server_state() -> None:
    """``server.state`` is assigned in ``UpstreamPool._change_state`` alone (and set once at birth); only the
    pool adds servers to its set or takes them out."""
    found: list[str] = []
    for stem, path in sorted(_sidecar_modules().items()):
        tree = ast.parse(path.read_text())
        for func in ast.walk(tree):
            if not isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(func):
                if isinstance(node, ast.Attribute) and node.attr == "state" and isinstance(node.ctx, ast.Store):
                    owner = ast.unparse(node.value)
                    found.append(f"{stem}.{func.name}: {owner}.state =")
                if (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Attribute)
                    and node.func.value.attr == "servers"
                    and node.func.attr in {"add", "discard", "remove", "clear", "pop", "update"}
                ):
                    found.append(f"{stem}.{func.name}: servers.{node.func.attr}")
    client_side = ("client.", "client_login.")
    server_states = [f for f in found if f.endswith(".state =") and not f.startswith(client_side)]
    assert server_states == ["pool._change_state: server.state =", "server.__init__: self.state ="]
    # The client's own state (ClientState, moved by its connection and its login) is the only other one.
    assert all(
        f.endswith((": self.state =", ": client.state =")) for f in found if f.startswith(client_side) and ".state" in f
    )
    assert {f.split(".")[0] for f in found if "servers." in f} == {"pool"}
