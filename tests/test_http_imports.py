"""httpproxy/ has no import cycles: its modules form layers a newcomer can read bottom-up
(the request path: front_h1 → exchange → sitestate/rules/cachepolicy/upstream, and server on
top owning the engine). Imports under ``if TYPE_CHECKING:`` and inside functions count too: a
cycle hidden there is still two modules that cannot be understood apart."""

from __future__ import annotations

import ast
from pathlib import Path

import httpproxy

PACKAGE = Path(httpproxy.__file__).parent


def _imports(path: Path) -> set[str]:
    """The httpproxy modules ``path`` imports anywhere in its source."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module is not None and node.level == 0:
            if node.module == "httpproxy":  # from httpproxy import pages
                found.update(f"httpproxy.{alias.name}" for alias in node.names)
            elif node.module.startswith("httpproxy."):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("httpproxy."))
    return found


def import_graph(package: Path) -> dict[str, set[str]]:
    """Module → the package's modules it imports (only modules that exist as files)."""
    modules = {f"httpproxy.{path.stem}": path for path in package.glob("*.py")
               if path.stem != "__init__"}
    return {name: _imports(path) & modules.keys() for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def test_httpproxy_has_no_import_cycle() -> None:
    graph = import_graph(PACKAGE)
    assert {"httpproxy.exchange", "httpproxy.front_h1", "httpproxy.server"} <= graph.keys()
    assert "httpproxy.exchange" in graph["httpproxy.front_h1"]
    assert find_cycle(graph) is None, " → ".join(find_cycle(graph) or [])


def test_a_cycle_is_found(tmp_path: Path) -> None:
    """The checker itself: the connection ↔ server cycle this package used to have (one side
    behind TYPE_CHECKING) is reported; the same modules without it are not."""
    (tmp_path / "connection.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from httpproxy.server import X\n")
    (tmp_path / "server.py").write_text("from httpproxy.connection import Y\n")
    (tmp_path / "pages.py").write_text("import httpproxy.rules\n")
    cycle = find_cycle(import_graph(tmp_path))
    assert cycle is not None and set(cycle) == {"httpproxy.connection", "httpproxy.server"}
    (tmp_path / "connection.py").write_text("from httpproxy import pages\n")
    assert find_cycle(import_graph(tmp_path)) is None


def test_the_exchange_knows_no_front_end() -> None:
    """The exchange is version-neutral: it imports no front end and not the engine."""
    graph = import_graph(PACKAGE)
    reachable: set[str] = set()
    todo = ["httpproxy.exchange"]
    while todo:
        for nxt in graph[todo.pop()] - reachable:
            reachable.add(nxt)
            todo.append(nxt)
    assert not reachable & {"httpproxy.front_h1", "httpproxy.server", "httpproxy.tls_server"}
