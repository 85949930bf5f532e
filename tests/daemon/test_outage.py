"""A ZooKeeper outage in the middle of a daemon's pass: a read that failed decides nothing.

Real daemons (libvirt's test driver) on a ZooKeeper of the test's own, which the test stops while
node1's migration pass is held at a pause point (node_daemon/faults.py) and lets go on into the
outage. No daemon may take a read that failed for a missing key: the VM is not stopped as removed,
not restarted, its migration not aborted, no node declared dead; once ZooKeeper is back the pass is
made again and the migration finishes. Waits are on ZooKeeper watches and on log lines, bounded.
"""

from __future__ import annotations

import json
import time

import pytest

from pvc_cluster_common import _schema as S
from pvc_cluster_common._cluster import read_history, read_vm

from .harness import TestCluster, domain_xml
from .test_daemon import ready_nodes, request, wait_for_line

pytestmark = pytest.mark.zk


def wait_for_any(daemon, texts, timeout_s: float = 120.0) -> None:
    """Wait (bounded) until the daemon's log has one of ``texts``: a line is written after the
    state it tells of, and a file gives no event to wait on."""
    deadline = time.monotonic() + timeout_s
    while not any(text in daemon.log() for text in texts):
        assert time.monotonic() < deadline, f"none of {texts} in the log of {daemon.node}: {daemon.log()[-3000:]}"
        time.sleep(0.1)


# Every wait is a deadline on a state; the machine's load can stretch each step a lot.
WAIT_S = 120.0


@pytest.fixture
def cluster(zk_private_server, zk_root, tmp_path):
    # a long step deadline: the outage must not end the migration by its deadline either
    c = TestCluster(zk_private_server.hosts, zk_root, tmp_path / "cluster", migration={"step_timeout_s": 300})
    yield c
    c.close()


def test_an_outage_mid_pass_deletes_restarts_and_kills_nothing_and_the_pass_resumes(
    cluster, zk_private_server, tmp_path
):
    release = tmp_path / "release"
    source = cluster.add(
        "node1",
        env={"PVC_NODE_DAEMON_PAUSE_AT": "source:before-transfer", "PVC_NODE_DAEMON_PAUSE_RELEASE": str(release)},
    )
    ready_nodes(cluster, "node2")
    cluster.wait_node_state("node1", "run")
    cluster.set_domain_state("node1", "unflush")
    cluster.wait_domain_state("node1", "ready")
    uuid, xml = domain_xml("steady")
    cluster.define_vm(xml, uuid, "steady", "node1")
    cluster.wait_running_on("node1", uuid)
    started = source.log().count(f"VM {uuid}: started")
    assert started == 1

    request(cluster, uuid, "migrate", target="node2")
    wait_for_line(source.log_path, "pause point source:before-transfer reached", source, WAIT_S)

    # ZooKeeper goes while node1's pass is held before its transfer reads; then the pass goes on
    zk_private_server.stop()
    for daemon in cluster.daemons.values():
        wait_for_line(daemon.log_path, "ZooKeeper connection", daemon, WAIT_S)
    release.write_text("go")
    # node1's pass goes on into the outage: its transfer's read or its `transferring` write fails
    wait_for_any(source, ("reconciler: ZooKeeper cannot be read", "step transferring not written"))
    for daemon in cluster.daemons.values():
        wait_for_any(daemon, ("keepalive: ZooKeeper cannot be read",))

    zk_private_server.start()
    # the pass is made again after the reconnection: the migration finishes, as requested
    cluster.wait_no_migration(uuid, timeout_s=WAIT_S)
    final = read_history(cluster.store, uuid)[-1]
    assert final["result"] == "done", final
    vm = read_vm(cluster.store, uuid)
    assert vm is not None and (vm.node, vm.lastnode) == ("node2", "node1")
    cluster.wait_running_on("node2", uuid, timeout_s=WAIT_S)
    cluster.wait_running_on("node1", uuid, running=False, timeout_s=WAIT_S)
    for node in ("node1", "node2"):
        # no node was taken for dead, nor fenced, for a keepalive that could not be read
        cluster.wait_node_state(node, "run", timeout_s=WAIT_S)
        assert cluster.store.find_text(cluster.schema.node_key(node, S.NODE_FENCE)) in (None, "")
        assert cluster.store.list_children(cluster.schema.node_fences(node), missing_ok=True) == []
    for node, daemon in cluster.daemons.items():
        log = daemon.log()
        assert "marked dead" not in log, node
        assert "removed from the cluster while running here" not in log, node
        assert "start failed" not in log, node
    # started once on node1 and once (by the migration) on node2: nothing restarted it
    assert source.log().count(f"VM {uuid}: started") == started
    assert json.loads(cluster.store.find_text(cluster.schema.node_key("node2", S.NODE_RUNNINGDOMAINS))) == [uuid]
    assert "ZooKeeper answers again" in source.log()
