"""The cluster the rollout tests share: the lab's hosts as Ansible hosts (tests/lab/hostviews.py),
on a cluster root of their own, rolled out once by playbooks/rollout.yml: its ZooKeeper ensemble
is the zookeeper role's (TLS, digest authentication), started on the lab's hosts by the rollout,
and its daemons and modules run secured.

Session-scoped: the rollout (a minute or two) runs once for all the modules here. tests/rollout
comes last in pyproject's testpaths, so its daemons never run during the other lab tests; they
are ended, with everything else the fixture made, when the session ends."""

from __future__ import annotations

import hashlib
import os
import subprocess
import uuid
from dataclasses import dataclass, field

import pytest

from tests.lab.hostviews import HostViews, PlaybookRun
from tests.lab.lab import Lab

UPLINK = "vmup0"  # a veth in every host, enslaved to vmbr1 by the role
UPLINK_PEER = "vmup0p"
VM_BRIDGES = [{"name": "vmbr0"}, {"name": "vmbr1", "uplink": UPLINK, "mtu": 1400}]
ROLE_FILES = (  # what the roles write, by default path, on every node
    "/etc/zookeeper/pvc/zoo.cfg",
    "/etc/zookeeper/pvc/log4j.properties",
    "/var/lib/zookeeper/myid",
    "/etc/systemd/system/zookeeper.service",
    "/etc/sysctl.d/60-pvc-vm-bridges.conf",
    "/etc/network/interfaces.d/pvc-vm-bridges",
    "/usr/local/sbin/pvc-vm-ipv6-off",
    "/etc/pvc/node-daemon.yaml",
    "/etc/pvc/zookeeper-ca.pem",
    "/etc/systemd/system/pvc-node-daemon.service",
)


def machine_state(paths) -> dict[str, str | None]:
    """What the machine itself has at each path: a link target, a content hash, or None."""
    state = {}
    for path in paths:
        if os.path.islink(path):
            state[path] = "link:" + os.readlink(path)
        elif os.path.isfile(path):
            with open(path, "rb") as handle:
                state[path] = hashlib.sha256(handle.read()).hexdigest()
        else:
            state[path] = "dir" if os.path.isdir(path) else None
    return state


@dataclass
class RolloutCluster:
    lab: Lab
    views: HostViews
    root: str
    machine_before: dict[str, str | None]
    runs: dict[str, PlaybookRun] = field(default_factory=dict)
    _store: object = None

    @property
    def store(self):
        """The operator's store on the rolled-out ensemble (TLS, digest), made at first use: the
        ensemble is the zookeeper role's, which the rollout starts."""
        if self._store is None:
            self._store = self.views.operator_store()
        return self._store

    def playbook(self, playbook: str, *args: str, **kw) -> PlaybookRun:
        return self.views.playbook(playbook, *args, **kw)

    def nodes(self) -> list[str]:
        return [h.name for h in self.lab.hosts]


def _ip(lab_host, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "-n", lab_host.netns, *args], capture_output=True, text=True, check=check)


@pytest.fixture(scope="session")
def cluster(lab):
    """The lab's hosts as Ansible hosts with a cluster root of their own (nothing rolled out yet).
    At the end: services ended by PID, VMs destroyed, the root removed, views and bridges gone."""
    root = f"/rollout-{uuid.uuid4().hex[:10]}"
    for h in lab.hosts:
        _ip(h, "link", "del", UPLINK, check=False)
        _ip(h, "link", "add", UPLINK, "type", "veth", "peer", "name", UPLINK_PEER)
    views = HostViews(lab, zk_root=root, vm_bridges=VM_BRIDGES)
    before = machine_state(ROLE_FILES + ("/etc/pvc", "/etc/zookeeper/pvc", "/opt/pvc-node-daemon"))
    views.up()
    cluster = RolloutCluster(lab, views, root, before)
    try:
        yield cluster
    finally:
        try:
            if cluster._store is not None:
                cluster._store.stop()
            # the daemons, then the ensemble (its data is in the hosts' views, removed below)
            views.stop_services("node-daemon")
            views.stop_services()
            lab.reset()
        finally:
            views.down()
            for h in lab.hosts:
                for link in ("vmbr0", "vmbr1", UPLINK):
                    _ip(h, "link", "del", link, check=False)


@pytest.fixture(scope="session")
def rolled_out(cluster) -> RolloutCluster:
    """The cluster after a first run of playbooks/rollout.yml (kept in cluster.runs["first"])."""
    if "first" not in cluster.runs:
        cluster.runs["first"] = cluster.playbook("playbooks/rollout.yml", timeout=900)
    run = cluster.runs["first"]
    if run.returncode != 0:
        pytest.fail(f"the rollout failed:\n{run.failures()}", pytrace=False)
    return cluster
