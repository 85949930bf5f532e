"""The daemon as an installable program: its runtime dependencies (pyproject.toml) are exactly the
distributions its code imports, and every one is pinned in constraints.txt."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = {"pvc_node_daemon": REPO / "node_daemon", "pvc_cluster_common": REPO / "plugins" / "module_utils"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _imports(path: Path, package: str) -> set[str]:
    """Absolute module names ``path`` (a module of ``package``) imports, anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: within the same package
                base = package if node.level == 1 else package.rsplit(".", node.level - 1)[0]
                found.add(f"{base}.{node.module}" if node.module else base)
                found.update(f"{base}.{alias.name}" for alias in node.names if not node.module)
            else:
                found.add(node.module)
                found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def daemon_imports() -> set[str]:
    """Top-level third-party modules reachable from the daemon's modules (the shared modules only
    as far as the daemon imports them: _module.py and _report.py, for Ansible, are not)."""
    queue = [f"pvc_node_daemon.{p.stem}" for p in PACKAGES["pvc_node_daemon"].glob("*.py")]
    seen, third_party = set(), set()
    while queue:
        name = queue.pop()
        if name in seen:
            continue
        seen.add(name)
        top, _, rest = name.partition(".")
        if top in PACKAGES:
            path = PACKAGES[top] / (rest.replace(".", "/") + ".py") if rest else PACKAGES[top] / "__init__.py"
            if path.exists():
                queue.extend(_imports(path, top))
        elif top not in sys.stdlib_module_names and top != "__future__":
            third_party.add(top)
    return third_party


def test_runtime_dependencies_are_exactly_what_the_daemon_imports():
    distributions = importlib.metadata.packages_distributions()
    imported = {canonical(distributions[module][0]) for module in daemon_imports()}
    declared = {
        canonical(re.split(r"[<>=!~;\[ ]", d, maxsplit=1)[0])
        for d in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    }
    assert imported == declared, (
        f"imported but not declared: {imported - declared}; declared, not imported: {declared - imported}"
    )
    assert "ansible-core" not in declared


def test_every_runtime_dependency_is_pinned():
    pins = {
        canonical(line.split("==")[0])
        for line in (REPO / "constraints.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    }
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for requirement in declared["dependencies"] + declared["optional-dependencies"]["test"]:
        assert canonical(re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0]) in pins, requirement


def test_the_daemon_collection_and_role_share_one_version():
    import yaml

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    galaxy = yaml.safe_load((REPO / "galaxy.yml").read_text())["version"]
    role = yaml.safe_load((REPO / "roles" / "node_daemon" / "defaults" / "main.yml").read_text())["node_daemon_version"]
    assert project == galaxy == str(role)


def test_the_collections_requirements_are_what_its_plugins_import_and_the_pins_satisfy_them():
    """requirements.txt (the controller's and the execution environment's needs) names the
    third-party modules the plugins import, and the versions tested (constraints.txt) fit it."""
    from packaging.requirements import Requirement

    imported = set()
    for path in (REPO / "plugins").rglob("*.py"):
        for module in _imports(path, "ansible_collections.pvc.cluster.plugins"):
            top = module.partition(".")[0]
            if top not in sys.stdlib_module_names and top not in ("ansible", "ansible_collections", "__future__"):
                imported.add(top)
    distributions = importlib.metadata.packages_distributions()
    imported = {canonical(distributions[module][0]) for module in imported}
    requirements = [
        Requirement(line)
        for line in (REPO / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert {canonical(r.name) for r in requirements} == imported
    pins = dict(
        line.split("==")
        for line in (REPO / "constraints.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    pins = {canonical(name): version for name, version in pins.items()}
    for requirement in requirements:
        assert requirement.specifier.contains(pins[canonical(requirement.name)]), requirement
