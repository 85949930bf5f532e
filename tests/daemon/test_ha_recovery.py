"""An HA recovery pass (node_daemon/ha.py) driven directly against a real ZooKeeper: it places a
fenced node's VMs through the one request path (fit, reservations) and records the n-1 verdict,
which never holds a recovery back. The fencing around it is tested with real daemons and BMCs in
test_ha.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from pvc_cluster_common import _schema as S
from pvc_cluster_common._cluster import read_history, read_vm
from pvc_node_daemon.ha import HighAvailability
from pvc_node_daemon.recovery import RecoveryStart

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
