"""The store is the only door to ZooKeeper: no module of the collection or the daemon but
plugins/module_utils/_store.py imports the ZooKeeper client library or reaches past the store to
its client. Checked on the sources (ast), so that it stays true."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
STORE = REPO / "plugins" / "module_utils" / "_store.py"
SOURCES = sorted([*(REPO / "node_daemon").rglob("*.py"), *(REPO / "plugins").rglob("*.py")])
CLIENT_LIBRARY = "kazoo"
# The client library's names a caller would use to go around the store.
CLIENT_NAMES = {"KazooClient", "KazooState", "KazooRetry", "DataWatch", "ChildrenWatch", "NoNodeError"}


def _is_client_module(name: str | None) -> bool:
    return name is not None and (name == CLIENT_LIBRARY or name.startswith(CLIENT_LIBRARY + "."))


def _names_store(node: ast.expr) -> bool:
    """Whether ``node`` is a store: ``store``, ``x.store``, ``self._store`` and the like."""
    name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else ""
    return name.lstrip("_").endswith("store")


def _call_name(func: ast.expr) -> str:
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""


def door_violations(source: str, filename: str) -> list[str]:
    """Where ``source`` reaches ZooKeeper other than through the store's methods."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            found += [f"{where} imports {alias.name}" for alias in node.names if _is_client_module(alias.name)]
        elif isinstance(node, ast.ImportFrom) and not node.level and _is_client_module(node.module):
            found.append(f"{where} imports from {node.module}")
        elif (
            isinstance(node, ast.Call)
            and _call_name(node.func) in ("__import__", "import_module")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and _is_client_module(str(node.args[0].value))
        ):
            found.append(f"{where} imports {node.args[0].value} by name")
        elif isinstance(node, ast.Attribute) and node.attr == "client" and _names_store(node.value):
            found.append(f"{where} uses the store's client")
        elif isinstance(node, ast.Attribute) and node.attr in CLIENT_NAMES:
            found.append(f"{where} uses {node.attr}")
    return found


@pytest.mark.parametrize("path", [p for p in SOURCES if p != STORE], ids=lambda p: str(p.relative_to(REPO)))
def test_only_the_store_reaches_zookeeper(path):
    assert door_violations(path.read_text(), str(path.relative_to(REPO))) == []


def test_the_sources_are_found():
    # the rule checks something: the daemon and the collection, and the store itself among them
    assert STORE in SOURCES and len(SOURCES) > 30
    assert any(p.parts[-2] == "node_daemon" for p in SOURCES)


@pytest.mark.parametrize(
    "code",
    [
        "import kazoo",
        "import kazoo.client as k",
        "from kazoo.recipe.lock import Lock",
        "from kazoo import exceptions",
        "def f():\n    from kazoo.client import KazooState\n",
        "importlib.import_module('kazoo.client')",
        "self.store.client.DataWatch('/x', f)",
        "store.client.exists('/x')",
        "self._store.client.get('/x')",
        "def f(client):\n    client.ChildrenWatch('/x', g)\n",
        "try:\n    pass\nexcept kz.NoNodeError:\n    pass\n",
        "__import__('kazoo')",
    ],
)
def test_the_rule_catches_each_way_around_the_store(code):
    assert door_violations(code, "example.py"), code


@pytest.mark.parametrize(
    "code",
    [
        "from ._store import ClusterStore, Versioned",
        "store.watch_data('/x', f)",
        "self.client_name = store.options.hosts",
        "logging.getLogger('kazoo')",
    ],
)
def test_the_rule_lets_the_store_s_own_api_through(code):
    assert door_violations(code, "example.py") == []
