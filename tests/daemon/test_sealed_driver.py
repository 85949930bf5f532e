"""The hypervisor driver is sealed: libvirt is imported by node_daemon/hypervisor.py and by no
other module of the daemon or the shared code, and no other module tells libvirt's drivers apart
by their URI (the driver answers questions such as "can this peer's libvirt be asked?")."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DRIVER = REPO / "node_daemon" / "hypervisor.py"
SOURCES = sorted([*(REPO / "node_daemon").glob("*.py"), *(REPO / "plugins").rglob("*.py")])


def imported_top_levels(tree: ast.AST) -> set[str]:
    """Top-level names of every module ``tree`` imports, at any depth (functions included)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module.split(".")[0])
    return found


def uri_scheme_literals(tree: ast.AST) -> list[str]:
    """String constants that name libvirt's test driver by its URI scheme."""
    return [
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("test:")
    ]


def test_the_sources_are_found():
    # a glob that found nothing would make every test below pass
    assert DRIVER in SOURCES and len(SOURCES) > 20


@pytest.mark.parametrize("path", [p for p in SOURCES if p != DRIVER], ids=lambda p: str(p.relative_to(REPO)))
def test_only_the_driver_imports_libvirt(path):
    tree = ast.parse(path.read_text(), str(path))
    assert "libvirt" not in imported_top_levels(tree)
    assert uri_scheme_literals(tree) == []


def test_the_checks_see_an_import_inside_a_function():
    tree = ast.parse("def f():\n    import libvirt.x\n    from libvirt import open\n    return 'test:///default'\n")
    assert imported_top_levels(tree) == {"libvirt"}
    assert uri_scheme_literals(tree) == ["test:///default"]
    assert "libvirt" in imported_top_levels(ast.parse(DRIVER.read_text()))
