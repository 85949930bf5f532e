"""The reconciler while this node's libvirt cannot be asked (issue #12): it starts, stops and
re-homes nothing on a state it does not know, a start that meets no libvirt does not fail the VM,
and a migration still follows its steps. Real ZooKeeper, libvirt's test driver."""

from __future__ import annotations

import pytest

from pvc_cluster_common import _schema as S
from pvc_cluster_common._cluster import read_vm_state, vm_definition
from pvc_cluster_common._records import MigrationRecord
from pvc_node_daemon.config import parse_config
from pvc_node_daemon.context import DaemonContext
from pvc_node_daemon.domains import DomainTable
from pvc_node_daemon.hypervisor import Hypervisor
from pvc_node_daemon.migration import UNAVAILABLE
from pvc_node_daemon.reconciler import WATCHED_KEYS, Reconciler

from tests.support.identities import node_auth

from .harness import NODE_XML, domain_xml

pytestmark = pytest.mark.zk


class RecordingAgent:
    """The migration agent's entry point, recording what the reconciler hands it."""

    def __init__(self) -> None:
        self.handled: list[tuple[str, object]] = []

    def handle(self, uuid, known=None, local_state=None) -> None:
        self.handled.append((uuid, local_state))


@pytest.fixture
def without_libvirt(store, zk_server, zk_root, tmp_path):
    """A reconciler of node n1 whose libvirt connection is down, and VM s1 assigned to n1."""
    host = tmp_path / "n1.xml"
    host.write_text(NODE_XML.format(kib=16 * 1024 * 1024))
    hypervisor = Hypervisor(f"test://{host}", call_timeout_s=5).open()
    hypervisor.close()  # no connection: every call fails at once with HypervisorUnavailable
    config = parse_config(
        {"node": "n1", "zookeeper": {"hosts": zk_server.hosts, "root": zk_root, "auth": node_auth("n1")}}
    )
    uuid, xml = domain_xml("s1", memory="256")
    store.commit(vm_definition(store.schema, uuid, "s1", xml, "n1", "start"))
    agent = RecordingAgent()
    reconciler = Reconciler(DaemonContext("n1", config, store, hypervisor, DomainTable()), agent)
    for key in WATCHED_KEYS:
        found = store.find(store.schema.domain_key(uuid, key))
        reconciler._record(uuid, key, found[0] if found else None, found[1] if found else -1)
    return reconciler, agent, uuid


def test_a_start_that_meets_no_libvirt_does_not_fail_the_vm(without_libvirt, store):
    reconciler, _, uuid = without_libvirt
    assert reconciler.start_vm(uuid) is False
    assert read_vm_state(store, uuid) == "start"  # not `fail`
    assert not store.find_text(store.schema.domain_key(uuid, S.DOMAIN_FAILEDREASON))


def test_a_pass_without_libvirt_does_nothing_but_a_migration_still_follows_its_steps(without_libvirt, store):
    reconciler, agent, uuid = without_libvirt
    reconciler.reconcile(uuid)  # should run here and libvirt cannot say whether it does: nothing
    assert agent.handled == []
    assert read_vm_state(store, uuid) == "start"
    record = MigrationRecord(
        id="m1", vm=uuid, kind="migrate", source="n1", target="n2", method="default", memory_mib=256, step="prepared"
    ).to_json()
    reconciler._record(uuid, S.DOMAIN_MIGRATION, record, 0)
    reconciler.reconcile(uuid)
    assert agent.handled == [(uuid, UNAVAILABLE)]
