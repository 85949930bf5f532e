"""An HA recovery pass (node_daemon/ha.py) driven directly against a real ZooKeeper: it places a
fenced node's VMs through the one request path (fit, reservations) and records the n-1 verdict,
which never holds a recovery back. The fencing around it is tested with real daemons and BMCs in
test_ha.py."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from pvc_cluster_common import _schema as S
from pvc_cluster_common._cluster import read_history, read_vm, vm_definition
from pvc_cluster_common._report import node_report, read_cluster
from pvc_node_daemon.ha import HighAvailability
from pvc_node_daemon.recovery import RecoveryStart, plan_recovery

from .harness import domain_xml
from .test_migration import cluster, make_agent  # noqa: F401 (fixtures)

pytestmark = pytest.mark.zk


@pytest.fixture
def fenced_n1(cluster, make_agent):
    """m1 (256 MiB, state start) assigned to n1, which is fenced; n2's daemon recovers it."""
    store, uuid, _ = cluster
    schema = store.schema
    # each node's reservations znode, as its daemon's registration makes it (no identity creates
    # anything in another node's znode)
    store.commit(
        {
            schema.node_key("n1", S.NODE_DAEMON_STATE): "fenced",
            **{
                schema.node_reservations(node): ""
                for node in ("n1", "n2", "n3")
                if not store.exists(schema.node_reservations(node))
            },
        }
    )
    agent = make_agent("n2")
    # n2's znode as its daemon's registration makes it: created by n2's own identity, so that
    # n2 may write its own keys (recovery_n1) as a real daemon does
    own = {
        schema.node_key("n2", key): store.find_text(schema.node_key("n2", key))
        for key in (S.NODE_DAEMON_STATE, S.NODE_DOMAIN_STATE, S.NODE_MEMTOTAL, S.NODE_MEMPROV, S.NODE_MEMRESERVE)
    }
    store.delete([schema.node("n2")])
    agent.ctx.store.commit(
        {schema.node("n2"): "", **own, schema.node_reservations("n2"): "", schema.node_claims("n2"): ""}
    )
    ha = HighAvailability(agent.ctx, agent)
    return store, uuid, ha


def recovery_records(store, uuid):
    return [entry for entry in read_history(store, uuid) if entry.get("kind") == "recovery"]


def test_require_n1_never_holds_back_a_recovery_and_its_verdict_is_recorded(fenced_n1):
    """n3 has 100 MiB left: once m1 runs on n2, losing n2 would leave m1 nowhere to go. Under
    require_n1 the recovery still happens (refusing it would keep a VM of the failed node down
    for the sake of the next failure), and its record says the cluster fails n-1 and why."""
    store, uuid, ha = fenced_n1
    schema = store.schema
    store.commit({schema.require_n1(): "true", schema.node_key("n3", S.NODE_MEMPROV): 16384 - 100})
    state = store.find(schema.node_key("n1", S.NODE_DAEMON_STATE))
    ha._recover("n1", SimpleNamespace(held=True))
    assert read_vm(store, uuid).node == "n2"
    assert store.find(schema.node_key("n1", S.NODE_DAEMON_STATE)) == state
    [entry] = recovery_records(store, uuid)
    assert entry["n1"]["ok"] is False and entry["n1"]["require_n1"] is True
    assert "would not survive the failure of n2" in entry["n1"]["detail"], entry["n1"]
    # and said loudly: the recovering node's recovery_n1 verdict, which node_info reports
    verdict = store.find_text(schema.node_key("n2", S.NODE_RECOVERY_N1))
    assert verdict.startswith("recovery of fenced node n1 (1 VM(s) restarted elsewhere) left the cluster failing n-1")
    assert "would not survive the failure of n2" in verdict
    assert node_report(read_cluster(store), "n2")["recovery_n1"] == verdict
    assert node_report(read_cluster(store), "n3")["recovery_n1"] is None
    # a later recovery that keeps n-1 (n3 has room again) deletes the verdict
    store.commit({schema.node_key("n3", S.NODE_MEMPROV): 0})
    uuid2, xml2 = domain_xml("m2", memory="128")
    store.commit(vm_definition(schema, uuid2, "m2", xml2, "n1", "start"))
    ha._recover("n1", SimpleNamespace(held=True))
    assert read_vm(store, uuid2).node in ("n2", "n3")
    [entry] = recovery_records(store, uuid2)
    assert entry["n1"]["ok"] is True, entry
    assert store.find_text(schema.node_key("n2", S.NODE_RECOVERY_N1)) is None
    assert node_report(read_cluster(store), "n2")["recovery_n1"] is None


def test_a_recovery_that_keeps_n1_records_so(fenced_n1):
    store, uuid, ha = fenced_n1
    ha._recover("n1", SimpleNamespace(held=True))
    [entry] = recovery_records(store, uuid)
    assert read_vm(store, uuid).node in ("n2", "n3")
    assert entry["n1"] == {
        "ok": True,
        "require_n1": False,
        "detail": "the cluster survives the failure of any one of 2 ready node(s)",
    }


def test_a_recovery_is_fit_checked_when_it_commits(fenced_n1):
    """The target filled up after the pass planned (another request's reservation): the
    recovery's transaction checks the fit again, as a request's does, and writes nothing; the VM
    stays assigned to the fenced node for the next pass. It used to be assigned regardless."""
    store, uuid, ha = fenced_n1
    schema = store.schema
    state_version = store.find(schema.node_key("n1", S.NODE_DAEMON_STATE))[1]
    store.commit({schema.node_reservation("n2", "00000000-0000-4000-8000-000000000001"): 16384 - 255})
    assert ha._recover_one("n1", RecoveryStart(uuid, "n2", "n1"), {}, state_version) is True
    assert read_vm(store, uuid).node == "n1"
    assert store.find_text(schema.node_reservation("n2", uuid)) is None
    assert recovery_records(store, uuid) == []
    # with room again it goes through, its reservation on n2 and the parent rewritten with it
    store.commit({schema.node_reservation("n2", "00000000-0000-4000-8000-000000000001"): 16384 - 256})
    assert ha._recover_one("n1", RecoveryStart(uuid, "n2", "n1"), {}, state_version) is True
    assert read_vm(store, uuid).node == "n2" and store.find_text(schema.node_reservation("n2", uuid)) == "256"
    assert store.find_text(schema.node_reservations("n2")).startswith("recovery ")


def test_a_recovery_prefers_a_target_that_keeps_n1_whatever_the_selector(fenced_n1):
    """n2, n3 and n4 run one VM each (6000, 10200 and 8000 MiB of 16384). m1 (256 MiB, selector
    mem: the most headroom) would go to n2, whose 10384 MiB left are the one gap that n3's 10200
    MiB VM has if n3 fails: n2 after m1 (10128) would lose n-1. The recovery takes mem's next
    choice, n4, where n-1 holds, and records so; nothing is reported on the node."""
    store, uuid, ha = fenced_n1
    schema = store.schema
    values = {
        schema.node("n4"): "",
        schema.node_key("n4", S.NODE_DAEMON_STATE): "run",
        schema.node_key("n4", S.NODE_DOMAIN_STATE): "ready",
        schema.node_key("n4", S.NODE_MEMTOTAL): 16384,
        schema.node_key("n4", S.NODE_MEMRESERVE): 0,
        schema.node_reservations("n4"): "",
        schema.node_claims("n4"): "",
    }
    for node, memory in (("n2", 6000), ("n3", 10200), ("n4", 8000)):
        other, xml = domain_xml(f"on-{node}", memory=str(memory))
        values.update(vm_definition(schema, other, f"on-{node}", xml, node, "start"))
        values[schema.node_key(node, S.NODE_MEMPROV)] = memory
        values[schema.node_key(node, S.NODE_RUNNINGDOMAINS)] = json.dumps([other])
    store.commit(values)
    # what the selector alone would do (the plan without the VMs each node runs)
    snapshot = read_cluster(store)
    candidates = [vm for vm in snapshot.vms.values() if vm.node == "n1"]
    assert [s.target for s in plan_recovery("n1", candidates, snapshot.views(), {"n1"}).starts] == ["n2"]
    ha._recover("n1", SimpleNamespace(held=True))
    assert read_vm(store, uuid).node == "n4"
    [entry] = recovery_records(store, uuid)
    assert entry["n1"]["ok"] is True, entry
    assert store.find_text(schema.node_key("n2", S.NODE_RECOVERY_N1)) is None
