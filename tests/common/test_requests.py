"""Migration requests written to a real ZooKeeper (plugins/module_utils/_requests.py)."""

from __future__ import annotations

import pytest

from pvc_cluster_common import _schema as S
from pvc_cluster_common._cluster import read_node_views, read_vm, vm_definition
from pvc_cluster_common import _requests
from pvc_cluster_common._requests import RequestError, plan_request, request_vm, submit_request
from pvc_cluster_common._store import Attempts, ConflictError

pytestmark = pytest.mark.zk

UUID = "6695eb01-f6a4-8304-79aa-97f2502e193f"
XML = (
    f"<domain type='test'><name>web1</name><uuid>{UUID}</uuid><memory unit='MiB'>1024</memory>"
    "<vcpu>2</vcpu><os><type>hvm</type></os><devices/></domain>"
)


@pytest.fixture
def cluster(store):
    """Two ready nodes with room, and VM web1 running on n1."""
    schema = store.schema
    values = {}
    for node in ("n1", "n2"):
        values.update(
            {
                schema.node(node): "",
                schema.node_key(node, S.NODE_DAEMON_STATE): "run",
                schema.node_key(node, S.NODE_DOMAIN_STATE): "ready",
                schema.node_key(node, S.NODE_MEMTOTAL): 16384,
                schema.node_key(node, S.NODE_MEMPROV): 0,
                schema.node_key(node, S.NODE_MEMRESERVE): 0,
            }
        )
    values.update(vm_definition(schema, UUID, "web1", XML, "n1", "start"))
    store.commit(values)
    return store


def request(store, kind, target=None):
    vm = read_vm(store, UUID)
    plan = plan_request(vm, kind, read_node_views(store), target=target)
    return submit_request(store, plan, vm, requester="test")


def lastnode_version(store):
    return store.find(store.schema.domain_key(UUID, S.DOMAIN_LASTNODE))


def test_a_move_that_keeps_lastnode_does_not_rewrite_it(cluster):
    # Every daemon watches lastnode: an unchanged value is left alone (no event on every node).
    before = lastnode_version(cluster)
    record = request(cluster, "move", target="n2")
    assert record.kind == "move" and record.target == "n2"
    assert cluster.find_text(cluster.schema.domain_key(UUID, S.DOMAIN_NODE)) == "n2"
    assert lastnode_version(cluster) == before == ("", 0)


def test_a_temporary_migration_records_the_home_node(cluster):
    request(cluster, "migrate", target="n2")
    text, version = lastnode_version(cluster)
    assert (text, version) == ("n1", 1)
    assert cluster.find_text(cluster.schema.node_reservation("n2", UUID)) == "1024"


def test_request_vm_plans_again_after_a_conflict(cluster, monkeypatch):
    # A key the plan was made from changes between the read and the commit (another request, or
    # a node's keepalive folding a finished migration's reservation): routine, so the shared
    # request path reads and plans again instead of failing.
    node_key = cluster.schema.domain_key(UUID, S.DOMAIN_NODE)
    submits = []

    def submit_after_a_change(store, plan, vm, requester, **kwargs):
        if not submits:
            store.commit({node_key: "n1"})  # same value, new version: the read is stale
        submits.append(vm.node_version)
        return submit_request(store, plan, vm, requester, **kwargs)

    monkeypatch.setattr(_requests, "submit_request", submit_after_a_change)
    record = request_vm(cluster, UUID, "move", "test", target="n2")
    assert len(submits) == 2 and submits[1] == submits[0] + 1 and record.target == "n2"
    assert cluster.find_text(node_key) == "n2"


def test_request_vm_gives_up_after_its_attempts(cluster, monkeypatch):
    submitted = []

    def always_conflicting(store, plan, vm, requester, **kwargs):
        submitted.append(vm.uuid)
        raise ConflictError("changed meanwhile")

    monkeypatch.setattr(_requests, "submit_request", always_conflicting)
    with pytest.raises(ConflictError):
        request_vm(cluster, UUID, "move", "test", target="n2", attempts=3)
    assert submitted == [UUID] * 3
    assert cluster.find_text(cluster.schema.domain_key(UUID, S.DOMAIN_NODE)) == "n1"


def test_request_vm_of_a_missing_vm_is_refused(cluster):
    with pytest.raises(RequestError, match="does not exist"):
        request_vm(cluster, "00000000-0000-0000-0000-000000000000", "move", "test", target="n2")


def test_a_request_on_a_stale_read_writes_nothing(cluster):
    vm = read_vm(cluster, UUID)
    plan = plan_request(vm, "migrate", read_node_views(cluster), target="n2")
    # someone else re-assigned the VM after it was read
    cluster.commit({cluster.schema.domain_key(UUID, S.DOMAIN_NODE): "n2"})
    with pytest.raises(ConflictError):
        submit_request(cluster, plan, vm, requester="test")
    assert lastnode_version(cluster) == ("", 0)
    assert cluster.find_text(cluster.schema.domain_migration(UUID)) is None
    assert cluster.find_text(cluster.schema.node_reservation("n2", UUID)) is None


def test_a_request_replaces_reservations_left_by_earlier_migrations(cluster):
    # Reservations a finished migration left for its node's keepalive to fold into memprov: the
    # source's goes (the VM is assigned elsewhere from the request on), the target's is replaced.
    schema = cluster.schema
    cluster.commit({schema.node_reservation("n1", UUID): 1024, schema.node_reservation("n2", UUID): 512})
    record = request(cluster, "migrate", target="n2")
    assert record is not None
    assert cluster.find_text(schema.node_reservation("n1", UUID)) is None
    assert cluster.find_text(schema.node_reservation("n2", UUID)) == "1024"
    assert cluster.find_text(schema.domain_key(UUID, S.DOMAIN_NODE)) == "n2"


def test_an_abort_gives_the_vm_back_with_a_reservation_on_its_source(cluster):
    from pvc_cluster_common._records import RESULT_ABORTED, RESULT_DONE
    from pvc_cluster_common._requests import finish_values

    schema = cluster.schema
    record = request(cluster, "migrate", target="n2")
    values, delete, _ = finish_values(schema, UUID, record, RESULT_ABORTED, "test")
    assert values[schema.node_reservation("n1", UUID)] == 1024 and schema.node_reservations("n1") in values
    assert schema.node_reservation("n2", UUID) in delete and values[schema.domain_key(UUID, S.DOMAIN_NODE)] == "n1"
    values, delete, _ = finish_values(schema, UUID, record, RESULT_DONE)
    # done: the target's reservation stays until the target's keepalive counts the VM
    assert delete == [schema.domain_migration(UUID)]
    assert not any("/reservations" in path for path in values)


def test_a_stopped_vm_that_is_only_re_homed_gets_a_reservation_on_its_new_node(cluster):
    schema = cluster.schema
    cluster.commit({schema.domain_key(UUID, S.DOMAIN_STATE): "stop", schema.node_reservation("n1", UUID): 1024})
    before = cluster.find(schema.node_reservations("n2"))
    assert request(cluster, "move", target="n2") is None  # no migration record: nothing moves
    assert cluster.find_text(schema.domain_key(UUID, S.DOMAIN_NODE)) == "n2"
    assert cluster.find_text(schema.domain_migration(UUID)) is None
    assert cluster.find_text(schema.node_reservation("n2", UUID)) == "1024"  # until n2's keepalive counts it
    assert cluster.find_text(schema.node_reservation("n1", UUID)) is None  # the one left on n1 went
    assert cluster.find(schema.node_reservations("n2")) != before


@pytest.mark.parametrize("health", ["down", "hung"])
def test_a_request_to_a_node_whose_libvirt_is_not_ok_writes_nothing(cluster, health):
    vm = read_vm(cluster, UUID)
    plan = plan_request(vm, "migrate", read_node_views(cluster), target="n2")
    # the target's daemon lost its libvirtd after the plan was made: the submission's own check says so
    cluster.commit({cluster.schema.node_key("n2", S.NODE_LIBVIRT): health})
    with pytest.raises(RequestError, match=f"cannot migrate VM web1 to n2: libvirt is {health} on the node"):
        submit_request(cluster, plan, vm, requester="test")
    with pytest.raises(RequestError, match=f"libvirt is {health}"):
        plan_request(vm, "migrate", read_node_views(cluster), target="n2")
    assert cluster.find_text(cluster.schema.domain_migration(UUID)) is None
    assert cluster.find_text(cluster.schema.node_reservation("n2", UUID)) is None
    assert cluster.find_text(cluster.schema.domain_key(UUID, S.DOMAIN_NODE)) == "n1"


def test_attempts_count_failures_up_to_the_limit():
    budget = Attempts(3)
    assert [budget.again(), budget.again(), budget.again()] == [True, True, False]
    assert str(budget) == "3/3"
    for bad in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match="an attempt limit must be an int >= 1"):
            Attempts(bad)
