"""High availability with real daemons (libvirt test driver), a real ZooKeeper and a simulated BMC
(ipmi_sim) per node: a dead node is fenced through its BMC first, then its VMs run elsewhere, once.

A test-driver daemon's VMs live inside its process, like a host's VMs on the host: killing the
daemon is a power loss, and each BMC's power-off kills its node's daemon (SIGKILL, through a PID
file the test writes), as a real power-off ends every process of a host.
"""

from __future__ import annotations

import json
import shutil
import signal

import pytest

from pvc_cluster_common import _schema as S
from pvc_cluster_common._cluster import read_fence_record, read_history, read_vm
from tests.support.bmc import SimulatedBMC, free_udp_port

from .harness import TestCluster, domain_xml
from .test_daemon import ready_nodes

pytestmark = [
    pytest.mark.zk,
    pytest.mark.skipif(
        not (shutil.which("ipmi_sim") and shutil.which("ipmitool")),
        reason="openipmi and ipmitool: scripts/setup-host.sh",
    ),
]

NODES = ("node1", "node2", "node3")


class HACluster:
    def __init__(self, zk_server, zk_root, tmp_path, unreachable=()) -> None:
        self.tmp = tmp_path
        self.bmcs = {}
        for node in NODES:
            pidfile = tmp_path / f"{node}.pid"
            self.bmcs[node] = SimulatedBMC(node, tmp_path, off=f'kill -9 "$(cat {pidfile})" 2>/dev/null; true')
            self.bmcs[node].start()
        devices = {node: bmc.device_config() for node, bmc in self.bmcs.items()}
        for node in unreachable:  # a BMC nobody answers for
            devices[node] = {**devices[node], "port": free_udp_port()}
        self.cluster = TestCluster(zk_server.hosts, zk_root, tmp_path, fencing={"timeout_s": 3, "nodes": devices})

    def start(self, *nodes) -> None:
        ready_nodes(self.cluster, *nodes)
        for node in nodes:
            self.write_pid(node)

    def write_pid(self, node) -> None:
        (self.tmp / f"{node}.pid").write_text(str(self.cluster.daemons[node].process.pid))

    def close(self) -> None:
        self.cluster.close()
        for bmc in self.bmcs.values():
            bmc.stop()


@pytest.fixture
def ha(zk_server, zk_root, tmp_path, request):
    cluster = HACluster(zk_server, zk_root, tmp_path, **getattr(request, "param", {}))
    yield cluster
    cluster.close()


def vm_on(cluster, name, node, memory="512"):
    uuid, xml = domain_xml(name, memory=memory)
    cluster.define_vm(xml, uuid, name, node, state="start")
    cluster.wait_running_on(node, uuid)
    return uuid


def test_a_frozen_node_is_fenced_through_its_bmc_before_its_vms_run_elsewhere_and_powered_on_it_starts_none(ha):
    c = ha.cluster
    ha.start("node1", "node2", "node3")
    uuids = [vm_on(c, f"web{i}", "node2") for i in range(3)]
    daemon2 = c.daemons["node2"]
    # frozen with its VMs "running": no keepalive, its session alive for a while (a hung host,
    # or one cut off from the cluster network); only its BMC can stop it
    daemon2.process.send_signal(signal.SIGSTOP)
    c.wait_node_state("node2", "fenced")
    for uuid in uuids:
        c.wait(c.schema.domain_key(uuid, S.DOMAIN_NODE), lambda v: v in ("node1", "node3"), what=f"{uuid} recovered")
    for uuid in uuids:
        node = c.store.find_text(c.schema.domain_key(uuid, S.DOMAIN_NODE))
        c.wait_running_on(node, uuid)
    # the BMC's power-off killed the frozen daemon (and with it its VMs) before anything started elsewhere
    assert daemon2.process.wait(timeout=30) == -signal.SIGKILL
    calls = [call for call in ha.bmcs["node2"].calls() if call.endswith("set power 0")]
    assert len(calls) >= 1
    fence_record = read_fence_record(c.store, "node2")
    assert fence_record["result"] == "fenced" and fence_record["method"] == "ipmi"
    assert fence_record["by"] in ("node1", "node3")
    # under the fencing node's own keys, and nowhere under node2's
    assert json.loads(c.store.find_text(c.schema.node_fence_record(fence_record["by"], "node2"))) == fence_record
    assert c.store.exists(c.schema.node_key("node2", S.NODE_FENCE)) is False
    # node2's own keys stay as node2 wrote them: the verdict, under the fencer's keys, names their
    # version and the claim of it; everyone reads node2 as fenced, hence flushed
    state = c.node_state("node2")
    assert (state.daemon_state, state.domain_state, state.own_state) == ("fenced", "flushed", "run")
    assert state.verdict["by"] == fence_record["by"] and state.verdict["version"] == state.version and state.claimed
    assert c.store.find_text(c.schema.node_claim("node2", state.version)) == fence_record["by"]
    for uuid in uuids:
        vm = read_vm(c.store, uuid)
        assert vm.lastnode == "node2" and vm.state == "start"
        recovery = [entry for entry in read_history(c.store, uuid) if entry.get("kind") == "recovery"]
        assert len(recovery) == 1
        entry = recovery[0]
        assert entry["source"] == "node2" and entry["target"] == vm.node and entry["fence"]["method"] == "ipmi"
        assert entry["steps"]["fencing"] <= entry["steps"]["fenced"] <= entry["steps"]["recovered"]
        # once: one node runs it, the other live node does not
        other = ({"node1", "node3"} - {vm.node}).pop()
        assert uuid not in json.loads(c.store.find_text(c.schema.node_key(other, S.NODE_RUNNINGDOMAINS)))

    # powered on again: its daemon starts, finds its VMs assigned elsewhere, starts none
    ha.bmcs["node2"].power_on()
    daemon2.start()
    ha.write_pid("node2")
    c.wait_node_state("node2", "run")
    c.wait(c.schema.node_key("node2", S.NODE_KEEPALIVE), lambda v: v is not None)
    # it registered flushed (it was fenced while away), and the claims of its older states are gone
    assert c.store.find_text(c.schema.node_key("node2", S.NODE_DOMAIN_STATE)) == "flushed"
    assert c.store.list_children(c.schema.node_claims("node2")) == [str(c.node_state("node2").version - 1)]
    for uuid in uuids:
        assert read_vm(c.store, uuid).node in ("node1", "node3")
    # made ready: its VMs come home
    c.set_domain_state("node2", "unflush")
    c.wait_domain_state("node2", "ready")
    for uuid in uuids:
        c.wait_running_on("node2", uuid)
        vm = read_vm(c.store, uuid)
        assert vm.node == "node2" and vm.lastnode == ""


@pytest.mark.parametrize("ha", [{"unreachable": ("node2",)}], indirect=True)
def test_an_unreachable_bmc_means_fence_failed_and_no_recovery_until_an_operator_confirms(ha):
    c = ha.cluster
    ha.start("node1", "node2")
    uuid = vm_on(c, "db1", "node2")
    c.daemons["node2"].kill()  # power loss; its BMC does not answer
    c.wait_node_state("node2", "fence-failed")
    record = read_fence_record(c.store, "node2")
    assert record["result"] == "fence-failed" and "did not answer" in record["detail"] and record["by"] == "node1"
    # the protocol recovers nothing from a node whose fence failed
    vm = read_vm(c.store, uuid)
    assert vm.node == "node2" and vm.lastnode == ""
    assert "FENCE FAILED" in c.daemons["node1"].log()
    # the operator powered it off by hand and confirms (what pvc.cluster.node state=fenced writes)
    path = c.schema.node_key("node2", S.NODE_DAEMON_STATE)
    c.store.commit({path: "fenced"}, expect_versions={path: c.store.find(path)[1]})
    c.wait(c.schema.domain_key(uuid, S.DOMAIN_NODE), lambda v: v == "node1", what="recovered after the confirmation")
    c.wait_running_on("node1", uuid)


def test_a_node_in_maintenance_is_never_fenced(ha):
    c = ha.cluster
    ha.start("node1", "node2")
    uuid = vm_on(c, "app1", "node2")
    c.store.commit({c.schema.node_key("node2", S.NODE_MAINTENANCE): "true"})
    c.daemons["node2"].kill()
    c.wait_node_state("node2", "dead")
    from .test_daemon import wait_for_line

    wait_for_line(c.daemons["node1"].log_path, "node node2 is dead: the node is in maintenance", c.daemons["node1"])
    assert not [call for call in ha.bmcs["node2"].calls() if "set power" in call]
    assert c.node_state("node2").daemon_state == "dead"
    assert read_vm(c.store, uuid).node == "node2"
