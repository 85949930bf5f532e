"""Roles on their own in the lab, beyond what the rollout exercises: an ensemble that the zookeeper
role's files really form, and the node_daemon role installing the daemon from a wheel."""
from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.lab.lab import REPO_ROOT
from tests.support.zookeeper import ZooKeeperServer

pytestmark = pytest.mark.lab

PLAYBOOKS = Path(__file__).resolve().parent / "playbooks"
WHEELHOUSE = Path("/tmp/pvc-cluster/wheelhouse")


def test_zookeeper_role_files_form_an_ensemble(rolled_out, tmp_path):
    cluster = rolled_out
    views, lab = cluster.views, cluster.lab
    first = cluster.playbook(PLAYBOOKS / "zookeeper_check.yml")
    assert first.returncode == 0, first.failures()
    second = cluster.playbook(PLAYBOOKS / "zookeeper_check.yml")
    assert second.returncode == 0, second.failures()
    assert set(second.changed().values()) == {0}, second.changed_tasks()
    for view in views.views:
        cfg = view.read_text("/etc/zookeeper/check/zoo.cfg")
        for h in lab.hosts:
            assert f"server.{h.index}={h.address}:2889:3889" in cfg
        assert f"clientPortAddress={view.host.address}" in cfg
    try:
        for h in lab.hosts:
            assert views.start_unit(h, "zookeeper-check", "/etc/systemd/system/zookeeper-check.service") == "started"
        members = [ZooKeeperServer(workdir=tmp_path / h.name, client_port=2182, client_address=h.address, netns=h.netns)
                   for h in lab.hosts]
        deadline = time.monotonic() + 90
        modes = [None] * 3
        while None in modes and time.monotonic() < deadline:
            modes = [m.mode() for m in members]
            time.sleep(0.2)   # the JVM gives no readiness signal; its status port is polled
        assert sorted(modes) == ["follower", "follower", "leader"], f"no quorum from the role's files: {modes}"
        # and it serves what the lab's own ensemble serves: the role's logs went to its log dir
        assert views.view(1).read_text("/var/log/zookeeper-check/zookeeper.log")
    finally:
        views.stop_services("zookeeper-check")


def _wheelhouse() -> tuple[Path, Path]:
    """The daemon's wheel and every dependency's, built once per pyproject.toml (pip's cache keeps
    rebuilding cheap); the lab hosts have no network, so the role installs from here."""
    key = hashlib.sha256((REPO_ROOT / "pyproject.toml").read_bytes()).hexdigest()[:12]
    house = WHEELHOUSE / key
    if not (house / ".complete").exists():
        shutil.rmtree(house, ignore_errors=True)
        house.mkdir(parents=True)
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "-w", str(house), str(REPO_ROOT)], check=True,
                       timeout=600)
        (house / ".complete").touch()
    return house, next(house.glob("pvc_node_daemon-*.whl"))


def test_node_daemon_role_installs_from_a_wheel(rolled_out):
    cluster = rolled_out
    house, wheel = _wheelhouse()
    host = cluster.lab.host(3)
    args = ("--extra-vars", f"wheel_host={host.name} wheel={wheel} wheelhouse={house}")
    first = cluster.playbook(PLAYBOOKS / "node_daemon_wheel.yml", *args, timeout=900)
    assert first.returncode == 0, first.failures()
    assert first.changed()[host.name] > 0
    view = cluster.views.view(host)
    check = view.run(["/opt/pvc-node-daemon/bin/pvc-node-daemon", "--check-config", "--config",
                      "/etc/pvc/node-daemon-wheel.yaml"])
    assert f"(node {host.name})" in check.stdout
    unit = view.read_text("/etc/systemd/system/pvc-node-daemon-wheel.service")
    assert "ExecStart=/opt/pvc-node-daemon/bin/pvc-node-daemon --config /etc/pvc/node-daemon-wheel.yaml" in unit
    second = cluster.playbook(PLAYBOOKS / "node_daemon_wheel.yml", *args, timeout=900)
    assert second.returncode == 0, second.failures()
    assert second.changed()[host.name] == 0, second.changed_tasks()
    assert not Path("/opt/pvc-node-daemon").exists(), "the install reached the machine itself"
