"""Flush and ready with daemons as real processes (libvirt test driver, real ZooKeeper)."""

from __future__ import annotations

import json

import pytest

from pvc_cluster_common import _schema as S
from pvc_cluster_common._cluster import read_history, read_node_views, read_vm
from pvc_cluster_common._requests import RequestError, plan_request, submit_request

from .harness import TestCluster, domain_xml

pytestmark = pytest.mark.zk


@pytest.fixture
def cluster(zk_server, zk_root, tmp_path):
    c = TestCluster(zk_server.hosts, zk_root, tmp_path)
    yield c
    c.close()


def ready(cluster, nodes, memory=None):
    for node in nodes:
        cluster.add(node, **({"memory_mib": memory[node]} if memory and node in memory else {}))
    for node in nodes:
        cluster.wait_node_state(node, "run")
        cluster.set_domain_state(node, "unflush")
    for node in nodes:
        cluster.wait_domain_state(node, "ready")


def running_on(cluster, node):
    return set(json.loads(cluster.store.find_text(cluster.schema.node_key(node, S.NODE_RUNNINGDOMAINS)) or "[]"))


def define(cluster, name, node, state="start", memory="256", meta=None):
    uuid, xml = domain_xml(name, memory=memory)
    cluster.define_vm(xml, uuid, name, node, state=state, meta=meta)
    return uuid


def test_flush_and_ready_round_trip(cluster):
    ready(cluster, ["node1", "node2", "node3"])
    vms = [define(cluster, f"vm{i}", "node1") for i in range(4)]
    parked = define(cluster, "parked", "node1", state="stop")
    for uuid in vms:
        cluster.wait_running_on("node1", uuid)

    cluster.set_domain_state("node1", "flush")
    cluster.wait_domain_state("node1", "flushed")
    for uuid in vms:
        vm = read_vm(cluster.store, uuid)
        assert vm.node in ("node2", "node3") and vm.lastnode == "node1" and vm.migration is None
        cluster.wait_running_on(vm.node, uuid)
        cluster.wait_running_on("node1", uuid, running=False)
        assert read_history(cluster.store, uuid)[-1]["result"] == "done"
    assert read_vm(cluster.store, parked).node == "node1"  # a stopped VM has nothing to move

    cluster.set_domain_state("node1", "unflush")
    cluster.wait_domain_state("node1", "ready")
    for uuid in vms:
        vm = read_vm(cluster.store, uuid)
        assert (vm.node, vm.lastnode) == ("node1", "")
        cluster.wait_running_on("node1", uuid)
    for node in ("node1", "node2", "node3"):
        cluster.wait_no_reservations(node)  # each folded into memprov by the node's keepalive


def test_vm_that_fits_nowhere_is_shut_down_and_autostarted_on_ready(cluster):
    ready(cluster, ["node1", "node2"], memory={"node1": 8192, "node2": 1024})
    big = define(cluster, "big", "node1", memory="2048")
    cluster.wait_running_on("node1", big)
    cluster.set_domain_state("node1", "flush")
    cluster.wait_domain_state("node1", "flushed")
    vm = read_vm(cluster.store, big)
    # the daemon's runstate record; the operator's desired state and meta are as they were
    assert (vm.node, vm.state, vm.autostart) == ("node1", "stop", True)
    assert (vm.desired_state, vm.meta.node_autostart) == ("start", False)
    cluster.wait_running_on("node1", big, running=False)

    cluster.set_domain_state("node1", "unflush")
    cluster.wait_domain_state("node1", "ready")
    cluster.wait_running_on("node1", big)
    vm = read_vm(cluster.store, big)
    assert (vm.state, vm.autostart, vm.desired_state) == ("start", False, "start")


def test_the_operators_autostart_flag_starts_a_vm_once_at_ready(cluster):
    """meta node_autostart is the operator's: a ready acts on it once (its runstate record keeps
    which setting it acted on) and never writes it."""
    ready(cluster, ["node1", "node2"])
    uuid = define(cluster, "once", "node1", state="stop")
    cluster.store.commit({cluster.schema.domain_meta(uuid, S.META_NODE_AUTOSTART): "true"})
    cluster.set_domain_state("node1", "flush")
    cluster.wait_domain_state("node1", "flushed")
    cluster.set_domain_state("node1", "unflush")
    cluster.wait_domain_state("node1", "ready")
    cluster.wait_running_on("node1", uuid)
    vm = read_vm(cluster.store, uuid)
    assert (vm.state, vm.desired_state, vm.meta.node_autostart, vm.autostart) == ("start", "stop", True, False)
    # the operator stops it: the next ready does not start it again
    cluster.store.commit({cluster.schema.domain_key(uuid, S.DOMAIN_STATE): "stop"})
    cluster.wait_running_on("node1", uuid, running=False)
    cluster.set_domain_state("node1", "flush")
    cluster.wait_domain_state("node1", "flushed")
    cluster.set_domain_state("node1", "unflush")
    cluster.wait_domain_state("node1", "ready")
    vm = read_vm(cluster.store, uuid)
    assert (vm.state, vm.autostart) == ("stop", False)


def test_reservations_stop_two_requests_overcommitting_one_target(cluster):
    ready(cluster, ["node1", "node2"], memory={"node1": 8192, "node2": 3072})
    a = define(cluster, "a", "node1", memory="2048")
    b = define(cluster, "b", "node1", memory="2048")
    cluster.wait_running_on("node1", a)
    cluster.wait_running_on("node1", b)
    # both plans are made from the same view, in which each VM alone fits on node2
    nodes = read_node_views(cluster.store)
    vm_a, vm_b = read_vm(cluster.store, a), read_vm(cluster.store, b)
    plan_a = plan_request(vm_a, "migrate", nodes, target="node2")
    plan_b = plan_request(vm_b, "migrate", nodes, target="node2")
    assert submit_request(cluster.store, plan_a, vm_a, requester="test")
    with pytest.raises(RequestError, match="needs 2048 MiB"):
        submit_request(cluster.store, plan_b, vm_b, requester="test")
    assert read_vm(cluster.store, b).node == "node1"
    cluster.wait_no_migration(a)
    cluster.wait_running_on("node2", a)


def test_ready_during_a_flush_stops_the_flush_and_brings_everything_home(cluster):
    ready(cluster, ["node1", "node2"])
    vms = [define(cluster, f"vm{i}", "node1") for i in range(6)]
    for uuid in vms:
        cluster.wait_running_on("node1", uuid)
    cluster.set_domain_state("node1", "flush")
    # wait until the flush is under way (a first VM left), then cross it with a ready
    cluster.wait(
        cluster.schema.node_key("node2", S.NODE_DOMAINCOUNT), lambda v: v not in (None, "0"), what="a first VM on node2"
    )
    cluster.set_domain_state("node1", "unflush")
    cluster.wait_domain_state("node1", "ready")
    for uuid in vms:
        cluster.wait_no_migration(uuid)
        vm = read_vm(cluster.store, uuid)
        assert (vm.node, vm.lastnode) == ("node1", "")
        cluster.wait_running_on("node1", uuid)
        cluster.wait_running_on("node2", uuid, running=False)


def test_ready_brings_every_vm_home_with_many_requests_to_one_node(zk_server, zk_root, tmp_path):
    # All homecoming requests name the node being made ready, and each rewrites its reservations
    # with a version check: submitted all at once, some lost every race and stayed away.
    c = TestCluster(zk_server.hosts, zk_root, tmp_path, migration={"flush_parallel": 12})
    try:
        ready(c, ["node1", "node2"])
        uuids = [
            define(c, f"home-{i:02d}", "node1", memory="64", meta={S.META_MIGRATION_METHOD: "shutdown"})
            for i in range(24)
        ]
        c.wait(c.schema.node_key("node1", S.NODE_DOMAINCOUNT), lambda v: v == "24", 60)
        c.set_domain_state("node1", "flush")
        c.wait_domain_state("node1", "flushed", timeout_s=120)
        c.set_domain_state("node1", "unflush")
        c.wait_domain_state("node1", "ready", timeout_s=120)
        assert all((read_vm(c.store, uuid).node, read_vm(c.store, uuid).lastnode) == ("node1", "") for uuid in uuids)
        c.wait(
            c.schema.node_key("node1", S.NODE_RUNNINGDOMAINS),
            lambda v: set(json.loads(v or "[]")) == set(uuids),
            30,
            "every VM running on node1 again",
        )
        assert "did not come home" not in c.daemons["node1"].log()
    finally:
        c.close()


def test_planning_records_are_the_tables_entries_with_the_planning_meta_read_fresh(store):
    from dataclasses import replace

    from pvc_cluster_common._cluster import VMRecord
    from pvc_cluster_common._meta import VMMeta
    from pvc_cluster_common._records import RunState
    from pvc_node_daemon.config import parse_config
    from pvc_node_daemon.context import DaemonContext
    from pvc_node_daemon.domains import DomainTable
    from pvc_node_daemon.flush import NodeStateWorker
    from tests.support.identities import node_auth

    named, unnamed = "6695eb01-f6a4-8304-79aa-97f2502e1931", "6695eb01-f6a4-8304-79aa-97f2502e1932"
    schema = store.schema
    store.commit(
        {
            schema.domain_meta(named, S.META_NODE_LIMIT): json.dumps(["n2", "n3"]),
            schema.domain_meta(named, S.META_MIGRATION_METHOD): "live",
            # not planning meta: it reads as its default in a planning record
            schema.domain_meta(named, S.META_NODE_AUTOSTART): "true",
            schema.domain_meta(unnamed, S.META_NODE_SELECTOR): "vcpus",
        }
    )
    table = DomainTable()
    entries = {
        named: table.update(
            named,
            name="web1",
            state="start",
            node="n1",
            lastnode="n0",
            xml="<domain/>",
            memory_mib=2048,
            vcpus=2,
            node_version=7,
            failedreason="earlier",
            desired_state="start",
            state_version=3,
            runstate=RunState(state="start", desired_version=3, by="n1", at=1.0, autostart=True),
            runstate_version=4,
            loaded=frozenset({"node", "xml"}),
        ),
        unnamed: table.update(unnamed, node="n1", memory_mib=512),
    }
    config = parse_config({"node": "n1", "zookeeper": {"hosts": store.options.hosts, "auth": node_auth("n1")}})
    worker = NodeStateWorker(DaemonContext("n1", config, store, domains=table), reconciler=None)
    planned = {vm.uuid: vm for vm in worker.planning_records(entries)}
    assert planned[named] == replace(entries[named], meta=VMMeta(node_limit=("n2", "n3"), migration_method="live"))
    assert planned[unnamed] == replace(entries[unnamed], name=unnamed, meta=VMMeta(node_selector="vcpus"))
    assert isinstance(planned[named], VMRecord)
