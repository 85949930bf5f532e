"""The daemon's ready and flush under require_n1 (node_daemon/flush.py), against a real ZooKeeper with no
daemons: a VM's return home that would break n-1 is refused before anything is written, as
pvc.cluster.vm_migrate refuses an unmigrate."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from pvc_cluster_common import _schema as S
from pvc_cluster_common._cluster import read_vm, vm_definition
from pvc_node_daemon import flush
from pvc_node_daemon.config import parse_config
from pvc_node_daemon.context import DaemonContext
from pvc_node_daemon.domains import DomainTable
from pvc_node_daemon.flush import NodeStateWorker
from tests.support.identities import node_auth

from .harness import domain_xml

pytestmark = pytest.mark.zk


@pytest.fixture
def homecoming(store, zk_server, zk_root):
    """n1 is being made ready (unflush) and runs `big` (1024 MiB); `m1` (256 MiB) has n1 as its
    home and runs on n2. n2 and n3 are full: once m1 is back on n1, n1's VMs fit nowhere if n1
    fails (before, they did not either: the check is about the state after the move)."""
    schema = store.schema
    values = {}
    for node, total, prov, domain in (
        ("n1", 16384, 1024, "unflush"),
        ("n2", 16384, 16384, "ready"),
        ("n3", 16384, 16384, "ready"),
    ):
        values.update(
            {
                schema.node(node): "",
                schema.node_reservations(node): "",  # as registration makes it
                schema.node_key(node, S.NODE_DAEMON_STATE): "run",
                schema.node_key(node, S.NODE_DOMAIN_STATE): domain,
                schema.node_key(node, S.NODE_MEMTOTAL): total,
                schema.node_key(node, S.NODE_MEMPROV): prov,
                schema.node_key(node, S.NODE_MEMRESERVE): 0,
            }
        )
    m1, m1_xml = domain_xml("m1", memory="256")
    big, big_xml = domain_xml("big", memory="1024")
    values.update(vm_definition(schema, m1, "m1", m1_xml, "n2", "start"))
    values.update(vm_definition(schema, big, "big", big_xml, "n1", "start"))
    values[schema.domain_key(m1, S.DOMAIN_LASTNODE)] = "n1"
    values[schema.node_key("n1", S.NODE_RUNNINGDOMAINS)] = json.dumps([big])
    values[schema.node_key("n2", S.NODE_RUNNINGDOMAINS)] = json.dumps([m1])
    store.commit(values)
    from pvc_cluster_common._store import ClusterStore

    config = parse_config(
        {"node": "n1", "zookeeper": {"hosts": zk_server.hosts, "root": zk_root, "auth": node_auth("n1")}}
    )
    own = ClusterStore(config.zookeeper).start()
    worker = NodeStateWorker(DaemonContext("n1", config, own, domains=DomainTable()), reconciler=None)
    yield store, m1, worker
    own.stop()


def me_ready(nodes):
    """As the ready does: the node being made ready takes its VMs as if it were ready."""
    return {"n1": replace(nodes["n1"], domain_state="ready")}


def test_a_return_home_that_breaks_n1_is_refused_under_require_n1(homecoming, monkeypatch):
    store, m1, worker = homecoming
    monkeypatch.setattr(flush, "wait_until_gone", lambda *args, **kwargs: True)  # nothing runs the migration here
    store.commit({store.schema.require_n1(): "true"})
    result = worker.migrate_and_wait(m1, "unmigrate", None, me_ready)
    assert result.startswith("refused: returning VM m1 from n2 to n1 would leave the cluster unable"), result
    assert "would not survive the failure of n1" in result
    vm = read_vm(store, m1)
    assert vm.migration is None and (vm.node, vm.lastnode) == ("n2", "n1")
    assert store.find_text(store.schema.node_reservation("n1", m1)) is None


def test_without_require_n1_the_same_return_home_is_requested(homecoming, monkeypatch):
    store, m1, worker = homecoming
    monkeypatch.setattr(flush, "wait_until_gone", lambda *args, **kwargs: True)
    assert worker.migrate_and_wait(m1, "unmigrate", None, me_ready) == "finished"
    vm = read_vm(store, m1)
    assert vm.migration is not None and (vm.migration.source, vm.migration.target) == ("n2", "n1")


def test_a_running_flush_is_halted_only_under_require_n1(homecoming):
    from pvc_cluster_common._cluster import find_vm
    from pvc_cluster_common._selector import PlannedMove

    store, _, worker = homecoming
    big = read_vm(store, find_vm(store, "big"))
    plan = [PlannedMove(big.uuid, "n3", "selector mem")]
    assert worker._flush_n1_halt([big], plan) is None  # require_n1 off: nothing to say
    store.commit({store.schema.require_n1(): "true"})
    verdict = worker._flush_n1_halt([big], plan)
    assert verdict is not None and verdict.startswith("flush of n1 halted before moving 1 more VM(s): once done,")


@pytest.fixture
def daemons(zk_server, zk_root, tmp_path):
    from .harness import TestCluster

    cluster = TestCluster(zk_server.hosts, zk_root, tmp_path)
    yield cluster
    cluster.close()


def test_a_running_flush_that_would_now_break_n1_stops_and_says_why(daemons):
    """require_n1 is checked when a flush is asked (pvc.cluster.node); the cluster can change
    before or while it runs (here the flush is written directly, as if the cluster had filled
    up since). Before each wave the daemon checks the rest of its plan again: node1's two 1.5 GiB
    VMs would leave node2 and node3 (4 GiB each, 1.5 GiB used) unable to take each other's VMs,
    so the flush stops before moving anything, node1 stays `flush` and its `flush_halted` key
    names the node and the shortfall. Once a node with room is ready, writing `flush` again
    completes the flush and deletes the key."""
    cluster = daemons
    for node in ("node1", "node2", "node3"):
        cluster.add(node, memory_mib=4096)
    for node in ("node1", "node2", "node3"):
        cluster.wait_node_state(node, "run")
        cluster.set_domain_state(node, "unflush")
    for node in ("node1", "node2", "node3"):
        cluster.wait_domain_state(node, "ready")
    vms = {}
    for name, node in (("v1", "node1"), ("v2", "node1"), ("a2", "node2"), ("a3", "node3")):
        uuid, xml = domain_xml(name, memory="1536")
        cluster.define_vm(xml, uuid, name, node)
        vms[name] = uuid
    for name, node in (("v1", "node1"), ("v2", "node1"), ("a2", "node2"), ("a3", "node3")):
        cluster.wait_running_on(node, vms[name])
    halted = cluster.schema.node_key("node1", S.NODE_FLUSH_HALTED)
    cluster.store.commit({cluster.schema.require_n1(): "true"})

    cluster.set_domain_state("node1", "flush")
    cluster.wait(halted, lambda value: value is not None, 60, "node1's flush halted")
    verdict = cluster.store.find_text(halted)
    assert verdict.startswith("flush of node1 halted before moving 2 more VM(s): once done,"), verdict
    assert "would not survive the failure of node2" in verdict and "short by 512 MiB" in verdict, verdict
    assert cluster.store.find_text(cluster.schema.node_key("node1", S.NODE_DOMAIN_STATE)) == "flush"
    for name in ("v1", "v2"):
        vm = read_vm(cluster.store, vms[name])
        assert (vm.node, vm.migration) == ("node1", None)

    cluster.add("node4", memory_mib=8192)
    cluster.wait_node_state("node4", "run")
    cluster.set_domain_state("node4", "unflush")
    cluster.wait_domain_state("node4", "ready")
    cluster.set_domain_state("node1", "flush")  # retried: checked again, and now it passes
    cluster.wait_domain_state("node1", "flushed")
    assert cluster.store.find_text(halted) is None
    for name in ("v1", "v2"):
        assert read_vm(cluster.store, vms[name]).node == "node4"


def test_a_fit_flush_moves_each_vm_where_its_plan_said_and_never_overcommits_a_node(daemons):
    """A flush with the ``fit`` selector, by real daemons (libvirt's test driver, real ZooKeeper).
    Four 64 GiB nodes: node2 runs a 44 GiB VM, node3 and node4 a 16 GiB VM each, node1 two 8 GiB
    VMs with the fit selector. Balanced, node1's VMs would go to node3 and node4 (40 GiB left on
    each) and node2's 44 GiB VM would then have nowhere to go if node2 failed; the plan, n-1 aware
    per VM, sends the first to node3 (the most balancing, n-1 kept) and the second to node3 too
    (node4, its most balancing, would lose n-1). The test plans as the daemon plans, before the
    flush, and checks that each VM lands where that plan said, with the memory invariant sampled
    on consistent ZooKeeper snapshots throughout: no node ever admits more than its capacity, and
    its figures and reservations cover its VMs at every instant."""
    from pvc_cluster_common._cluster import read_node_views
    from pvc_cluster_common._report import read_cluster
    from pvc_cluster_common._selector import FlushVM, apply_plan, plan_flush, survives_node_failure

    from .invariant import MemoryInvariant, Sampler
    from .test_memory_accounting import wait_covered

    cluster = daemons
    gib = 1024
    nodes = ["node1", "node2", "node3", "node4"]
    for node in nodes:
        cluster.add(node, memory_mib=64 * gib)
    for node in nodes:
        cluster.wait_node_state(node, "run")
        cluster.set_domain_state(node, "unflush")
    for node in nodes:
        cluster.wait_domain_state(node, "ready")
    sizes, names = {}, {}
    for name, node, memory, meta in (
        ("big", "node2", 44 * gib, None),
        ("b3", "node3", 16 * gib, None),
        ("b4", "node4", 16 * gib, None),
        ("v1", "node1", 8 * gib, {S.META_NODE_SELECTOR: "fit"}),
        ("v2", "node1", 8 * gib, {S.META_NODE_SELECTOR: "fit"}),
    ):
        uuid, xml = domain_xml(name, memory=str(memory))
        cluster.define_vm(xml, uuid, name, node, meta=meta)
        sizes[uuid], names[name] = memory, uuid
    for name, node in (("big", "node2"), ("b3", "node3"), ("b4", "node4"), ("v1", "node1"), ("v2", "node1")):
        cluster.wait_running_on(node, names[name])
    invariant = MemoryInvariant(cluster.store, nodes, sizes)
    wait_covered(cluster, invariant)

    # the plan, as the daemon makes it: node views, node1's VMs, the VMs each node runs
    leaving = [read_vm(cluster.store, names[name]) for name in ("v1", "v2")]
    flush_vms = [
        FlushVM(vm.uuid, vm.memory_mib, vm.meta.node_limit, vm.meta.node_selector, vm.home, vm.vcpus) for vm in leaving
    ]
    running = read_cluster(cluster.store).running_memory_by_node()
    running["node1"] = [vm.memory_mib for vm in leaving]
    views = read_node_views(cluster.store)
    promised = {move.uuid: move.target for move in plan_flush("node1", flush_vms, views, running_by_node=running)}
    assert promised == {names["v1"]: "node3", names["v2"]: "node3"}, promised
    assert (
        survives_node_failure(
            *apply_plan("node1", flush_vms, list(plan_flush("node1", flush_vms, views)), views, running)
        ).ok
        is False
    )

    with Sampler(invariant) as sampler:
        cluster.set_domain_state("node1", "flush")
        cluster.wait_domain_state("node1", "flushed", timeout_s=120)
        for uuid in promised:
            cluster.wait_no_migration(uuid)
    for uuid, target in promised.items():
        vm = read_vm(cluster.store, uuid)
        assert (vm.node, vm.lastnode, vm.migration) == (target, "node1", None), vm
        cluster.wait_running_on(target, uuid)
    findings = sampler.findings
    assert findings.violations == [], findings.violations
    assert findings.samples >= 3, findings  # it sampled through the flush (else it could not fail)
    wait_covered(cluster, invariant)
