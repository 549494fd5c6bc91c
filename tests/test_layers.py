"""The package's folders are its layers: imports run one way, without cycles (counting imports in functions and for
typing)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "poolkit"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _library_modules() -> dict[str, Path]:
    """Every module of the package (``poolkit.pool.async_pool`` -> its file), the sidecar included."""
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Package modules ``path`` imports anywhere in it (top level, in functions, under TYPE_CHECKING)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module:
            # `from poolkit.pool import registry` imports the submodule; the package's own __init__ only when a
            # name is not a submodule.
            subs = [f"{node.module}.{alias.name}" for alias in node.names]
            names = [sub for sub in subs if sub in modules]
            if len(names) < len(subs):
                names.append(node.module)
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
    modules = {name: path for name, path in _library_modules().items() if not name.startswith("poolkit.sidecar.")}
    graph = {name: _imports(path, set(modules)) - {name} for name, path in modules.items()}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])
    # The cycle this replaced (issue 17): the pools and rls imported each other.
    assert "poolkit.pool.async_pool" not in graph["poolkit.pool.rls_async"]
    assert "poolkit.pool.sync_pool" not in graph["poolkit.pool.rls_sync"]


def test_the_cycle_check_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_the_sync_pool_reaches_no_driver_module_of_the_async_pool() -> None:
    modules = _library_modules()
    reached: set[str] = set()
    todo = ["poolkit.pool.sync_pool"]
    while todo:
        name = todo.pop()
        for target in _imports(modules[name], set(modules)):
            if target not in reached:
                reached.add(target)
                todo.append(target)
    assert (
        not {
            "poolkit.pool.async_pool",
            "poolkit.pool.driver_asyncpg",
            "poolkit.pool.driver_psycopg",
            "poolkit.pool.psycopg_async",
        }
        & reached
    )


def _folder(module: str) -> str:
    """The layer a module belongs to: its folder (``pool``, ``sidecar/conn``), or ``public`` for the top level."""
    parts = module.split(".")[1:]
    if parts[:1] == ["sidecar"]:
        if len(parts) > 1 and parts[1] in {"wire", "policy", "stats", "conn", "service"}:
            return f"sidecar/{parts[1]}"  # a layer's modules and its package __init__
        return "sidecar/service"  # sidecar/__init__, __main__: the sidecar's entry points
    if len(parts) > 1 or parts[:1] in (["integrations"], ["core"], ["sql"], ["obs"], ["pool"], ["apps"], ["dev"]):
        return parts[0]
    return "errors" if parts == ["errors"] else "public"


_BASE = frozenset({"errors", "core", "sql", "obs"})
_SIDECAR = frozenset({"sidecar/wire", "sidecar/policy", "sidecar/stats", "sidecar/conn", "sidecar/service"})

# What each folder may import besides itself (import-linter's "layers" and "independence" contracts as data).
# The library pools and the sidecar stand side by side on the same base and never import each other; the
# application helpers stand on the pools; developer tooling may use everything below the public entry points.
LIBRARY_LAYERS: dict[str, frozenset[str]] = {
    "errors": frozenset(),
    "core": frozenset({"errors"}),
    "sql": frozenset({"errors"}),
    "obs": frozenset({"errors", "core", "sql"}),
    "pool": _BASE,
    "apps": _BASE | {"pool"},
    "integrations": _BASE | {"pool", "apps"},
    "sidecar/wire": frozenset({"errors"}),
    "sidecar/policy": _BASE | {"sidecar/wire"},
    "sidecar/stats": _BASE | {"sidecar/wire", "sidecar/policy"},
    "sidecar/conn": _BASE | {"sidecar/wire", "sidecar/policy", "sidecar/stats"},
    "sidecar/service": _BASE | {"sidecar/wire", "sidecar/policy", "sidecar/stats", "sidecar/conn"},
    "dev": _BASE | {"pool", "apps"} | _SIDECAR,
    "public": _BASE | {"pool", "apps", "integrations", "dev"} | _SIDECAR,
}


def _folder_violations(graph: dict[str, set[str]], allowed: dict[str, frozenset[str]]) -> list[str]:
    return [
        f"{module} ({_folder(module)}) imports {target} ({_folder(target)})"
        for module, targets in sorted(graph.items())
        for target in sorted(targets)
        if _folder(target) != _folder(module) and _folder(target) not in allowed[_folder(module)]
    ]


def test_every_module_is_in_a_known_layer() -> None:
    folders = {_folder(name) for name in _library_modules()}
    assert folders == set(LIBRARY_LAYERS), folders ^ set(LIBRARY_LAYERS)
    assert _folder("poolkit.sidecar.wire") == _folder("poolkit.sidecar.wire.protocol") == "sidecar/wire"
    assert _folder("poolkit.sidecar") == _folder("poolkit.sidecar.__main__") == "sidecar/service"


def test_folders_import_only_the_layers_below_them() -> None:
    modules = _library_modules()
    graph = {name: _imports(path, set(modules)) - {name} for name, path in modules.items()}
    assert _folder_violations(graph, LIBRARY_LAYERS) == []
    # The back-reference this replaced (issue 17): the "pure" session module imported the I/O module server.
    assert "poolkit.sidecar.conn.server" not in graph["poolkit.sidecar.policy.session"]
    # The sidecar's lower layers have no cycles (the connections still refer to each other: client, server, pool).
    lower = {name for name in graph if _folder(name) in {"sidecar/wire", "sidecar/policy", "sidecar/stats"}}
    assert _cycle({m: graph[m] & lower for m in lower}) is None
    # Nor does the service layer: the console sees the sidecar through admin.ConsoleHost (it imported app).
    service = {name for name in graph if _folder(name) == "sidecar/service"}
    assert _cycle({m: graph[m] & service for m in service}) is None


def test_top_level_modules_only_re_export() -> None:
    """A top-level module other than the package root, errors and the CLI is a public import path: imports and
    ``__all__``, nothing else (the code lives in the layer folders)."""
    for path in sorted(PACKAGE.glob("*.py")):
        if path.stem in {"__init__", "__main__", "errors", "cli"}:
            continue
        body = ast.parse(path.read_text()).body
        kinds = {type(node).__name__ for node in body[1:]}  # after the docstring
        assert kinds <= {"ImportFrom", "Assign"}, f"{path.name}: {kinds}"


def test_the_layer_check_finds_an_upward_import() -> None:
    allowed = {"errors": frozenset(), "core": frozenset({"errors"})}
    graph = {"poolkit.errors": {"poolkit.core.dsn"}, "poolkit.core.dsn": {"poolkit.errors"}}
    assert _folder_violations(graph, allowed) == ["poolkit.errors (errors) imports poolkit.core.dsn (core)"]


def test_only_the_upstream_pool_changes_a_server_state() -> None:
    """``server.state`` is assigned in ``UpstreamPool._change_state`` alone (and set once at birth); only the
    pool adds servers to its set or takes them out."""
    found: list[str] = []
    for path in sorted((PACKAGE / "sidecar").rglob("*.py")):
        stem = path.stem
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
