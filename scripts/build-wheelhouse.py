"""Build the node daemon's wheelhouse: the daemon's wheel and a wheel of each of its runtime
dependencies, at the versions constraints.txt pins, plus a constraints.txt of exactly what the
wheelhouse holds. The node_daemon role copies the directory to each node and installs from it with
`pip install --no-index` (docs/node-daemon.md): a node needs no package index and no compiler.

    python scripts/build-wheelhouse.py OUTDIR [--with-libvirt]

libvirt-python is left out unless --with-libvirt: by default a node uses Debian's python3-libvirt
(node_daemon_libvirt_binding: debian). With --with-libvirt its wheel is built here from source
(needs libvirt-dev, pkg-config and a compiler on this machine, not on the nodes), for nodes without
Debian's binding. The wheels are for this machine's Python version and architecture: build with
the Python minor version of the nodes (3.11 for Debian 12).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LIBVIRT = "libvirt-python"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    return canonical(re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--with-libvirt", action="store_true", help="also build libvirt-python's wheel")
    args = parser.parse_args(argv)

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    dependencies = [
        d for d in project["dependencies"] if args.with_libvirt or requirement_name(d) != canonical(LIBVIRT)
    ]
    out = args.outdir.resolve()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    pip = [sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(out)]
    subprocess.run(pip + ["--no-deps", str(REPO)], check=True)
    subprocess.run(pip + ["--constraint", str(REPO / "constraints.txt"), *dependencies], check=True)

    pins = []
    for wheel in sorted(out.glob("*.whl"), key=lambda w: canonical(w.name)):
        name, version = wheel.name.split("-")[:2]
        pins.append(f"{canonical(name)}=={version}")
    names = {p.split("==")[0] for p in pins}
    expected = {canonical(project["name"])} | {requirement_name(d) for d in dependencies}
    if not expected <= names:
        raise SystemExit(f"build-wheelhouse: no wheel of {sorted(expected - names)} in {out}")
    binding = (
        "libvirt-python from this wheelhouse"
        if args.with_libvirt
        else "libvirt-python from the node (Debian's python3-libvirt)"
    )
    (out / "constraints.txt").write_text(
        f"# The node daemon's wheelhouse, built for Python {sys.version_info.major}.{sys.version_info.minor}; "
        f"{binding}.\n# pip install --no-index --find-links DIR --constraint DIR/constraints.txt pvc-node-daemon\n"
        + "".join(f"{p}\n" for p in pins)
    )
    print(f"build-wheelhouse: {out}: {', '.join(pins)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
