"""High availability in the lab (issue #16): real libvirtd and QEMU per host, a simulated BMC per
host (ipmi_sim, Lab.start_bmcs), and every host's libvirt watched all through each test
(RunningMonitor): a VM never runs on two hosts at once.

* a host powered off (every process killed at once) -> fenced through its BMC, its VMs run on
  another host, once; powered on again and made ready -> they come home;
* a host cut off from the lab network with its processes alive -> fenced through its BMC (which
  kills them), then recovered, never twice;
* a BMC that does not answer -> fence-failed, nothing recovered, until an operator confirms.
"""
from __future__ import annotations

import time

import pytest

from pvc_cluster_common import _schema as S
from pvc_cluster_common._cluster import read_vm

from .daemons import RunningMonitor, lab_cluster  # noqa: F401  (fixture)

pytestmark = [pytest.mark.lab, pytest.mark.timeout(900)]

OTHERS = ("node1", "node3")


@pytest.fixture
def ha_cluster(lab, lab_cluster):  # noqa: F811
    bmcs = lab.start_bmcs()

    def make(unreachable=(), **overrides):
        devices = {name: bmc.device_config() for name, bmc in bmcs.items()}
        for name in unreachable:   # nothing listens on that port of its BMC's address
            devices[name] = {**devices[name], "port": 624}
        return lab_cluster(fencing={"timeout_s": 5, "nodes": devices}, **overrides)

    yield make, bmcs
    for h in lab.hosts:   # the lab stays usable for the next test whatever happened
        h.set_link(True)
        if h.powered_off:
            h.power_on()


def started_on_node2(cluster, count, prefix):
    cluster.start()
    uuids = [cluster.define_vm(f"{prefix}-{i}", "node2", guest="none") for i in range(count)]
    for uuid in uuids:
        cluster.wait_running_on("node2", uuid)
    return uuids


def wait_recovered(cluster, uuids) -> dict:
    where = {}
    for uuid in uuids:
        cluster.wait(cluster.schema.domain_key(uuid, S.DOMAIN_NODE), lambda v: v in OTHERS, 120,
                     f"{cluster.names[uuid]} assigned to another node")
        where[uuid] = read_vm(cluster.store, uuid).node
        cluster.wait_running_on(where[uuid], uuid, timeout_s=120)
    return where


def check_recovered(cluster, monitor, uuids, where) -> None:
    assert not monitor.violations(), monitor.violations()
    for uuid in uuids:
        assert monitor.ever_running_on(uuid) <= {"node2", where[uuid]}   # started once, on one host
        vm = read_vm(cluster.store, uuid)
        assert vm.lastnode == "node2" and vm.state == "start"
        kinds = [entry.get("kind") for entry in cluster.history(uuid)]
        assert kinds.count("recovery") == 1


def bmc_power_on(lab, bmc) -> None:
    """Power a host on through its BMC, as an operator would (from the controller namespace)."""
    lab.ctl_run(["ipmitool", "-I", "lanplus", "-C", "3", "-H", bmc.address, "-p", str(bmc.port), "-U", "admin",
                 "-E", "chassis", "power", "on"], env={"PATH": "/usr/bin:/bin", "IPMI_PASSWORD": bmc.password},
                timeout=60)


def wait_libvirtd(host, timeout_s=60.0) -> None:
    import libvirt

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            host.connect().close()
            return
        except libvirt.libvirtError:
            assert time.monotonic() < deadline, f"libvirtd of {host.name} did not come back"
            time.sleep(0.2)   # a restarted libvirtd gives no event before its socket answers


def test_a_host_powered_off_is_fenced_its_vms_run_elsewhere_once_and_come_home_when_it_is_ready(lab, ha_cluster):
    make, bmcs = ha_cluster
    cluster = make()
    uuids = started_on_node2(cluster, 2, "ha-off")
    with RunningMonitor(lab.hosts) as monitor:
        killed = lab.host(2).power_off()
        assert cluster.daemons["node2"].pid in killed
        cluster.wait_daemon_state("node2", "fenced", timeout_s=60)
        where = wait_recovered(cluster, uuids)
    check_recovered(cluster, monitor, uuids, where)
    assert [call for call in bmcs["node2"].calls() if call.endswith("set power 0")]
    assert cluster.store.read(cluster.schema.node_key("node2", S.NODE_DOMAIN_STATE)) == "flushed"

    # powered on through its BMC: its daemon starts and starts none of its former VMs
    with RunningMonitor(lab.hosts) as monitor:
        bmc_power_on(lab, bmcs["node2"])
        wait_libvirtd(lab.host(2))
        cluster.restart("node2")
        cluster.wait(cluster.schema.node_key("node2", S.NODE_RUNNINGDOMAINS), lambda v: v == "[]")
        for uuid in uuids:
            assert read_vm(cluster.store, uuid).node == where[uuid]
        # made ready: they come home
        cluster.set_domain_state("node2", "unflush")
        cluster.wait_domain_state("node2", "ready")
        for uuid in uuids:
            cluster.settle(uuid)
            cluster.wait_running_on("node2", uuid)
    assert not monitor.violations(), monitor.violations()
    for uuid in uuids:
        assert read_vm(cluster.store, uuid).lastnode == ""


def test_a_partitioned_host_is_fenced_through_its_bmc_before_its_vms_run_elsewhere(lab, ha_cluster):
    make, bmcs = ha_cluster
    cluster = make()
    uuids = started_on_node2(cluster, 2, "ha-cut")
    with RunningMonitor(lab.hosts) as monitor:
        lab.host(2).set_link(False)   # its processes live on, its VMs keep running there
        cluster.wait_daemon_state("node2", "fenced", timeout_s=90)
        assert lab.host(2).powered_off          # the BMC's power-off killed its processes
        assert cluster.daemons["node2"].process.wait(timeout=30) != 0
        where = wait_recovered(cluster, uuids)
    check_recovered(cluster, monitor, uuids, where)
    # node2 ran them until its BMC cut the power, then another host did
    for uuid in uuids:
        assert "node2" in monitor.ever_running_on(uuid)


def test_an_unreachable_bmc_means_fence_failed_and_nothing_recovered_until_an_operator_confirms(lab, ha_cluster):
    make, _bmcs = ha_cluster
    cluster = make(unreachable=("node2",))
    uuids = started_on_node2(cluster, 1, "ha-nobmc")
    with RunningMonitor(lab.hosts) as monitor:
        lab.host(2).power_off()
        cluster.wait_daemon_state("node2", "fence-failed", timeout_s=90)
        for uuid in uuids:
            assert read_vm(cluster.store, uuid).node == "node2"
            assert cluster.running_nodes(cluster.libvirt_states(uuid)) == []
        # the operator checked that node2 is off, and confirms it (what pvc.cluster.node
        # state=fenced confirm_down=true writes)
        path = cluster.schema.node_key("node2", S.NODE_DAEMON_STATE)
        cluster.store.commit({path: "fenced"}, expect_versions={path: cluster.store.read_versioned(path)[1]})
        where = wait_recovered(cluster, uuids)
    check_recovered(cluster, monitor, uuids, where)
