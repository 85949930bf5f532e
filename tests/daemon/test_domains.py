"""The daemon's watch-fed VM table (node_daemon/domains.py) and how the reconciler fills it.

Pure logic: the table is in memory, and the reconciler is given the answers its watches would
deliver (no ZooKeeper needed to test what it does with them).
"""

from __future__ import annotations

from dataclasses import replace

from pvc_cluster_common import _schema as S
from pvc_cluster_common._records import MigrationRecord, RunState
from pvc_cluster_common._schema import Schema
from pvc_cluster_common._store import Versioned
from pvc_node_daemon.context import DaemonContext
from pvc_node_daemon.domains import DomainTable
from pvc_node_daemon.reconciler import LOADING, Reconciler

UUID = "3f1c2b1e-0000-4000-8000-000000000001"


def record(step: str, rid: str = "m1", source: str = "n1", target: str = "n2") -> MigrationRecord:
    return MigrationRecord(
        id=rid, vm=UUID, kind="migrate", source=source, target=target, method="default", memory_mib=256, step=step
    )


class RecordingStore:
    """Stands in for the store: records the reads a followed key sends and the watch each arms
    (``ClusterStore.follow``'s contract: a change re-reads the key while ``wanted()``)."""

    def __init__(self) -> None:
        self.schema = Schema("/pvc")
        self.connected = True
        self.reads: list[str] = []
        self.watches: dict[str, object] = {}

    def follow(self, path, on_value, wanted=lambda: True):
        self.reads.append(path)  # answers are fed by answer()

        def on_change(_event=None):
            if wanted():
                self.follow(path, on_value, wanted)

        self.watches[path] = on_change


def reconciler(node: str = "n1") -> Reconciler:
    store = RecordingStore()
    rec = Reconciler(
        DaemonContext(node, config=None, store=store, hypervisor=None, domains=DomainTable()), migrations=None
    )
    rec._watched.add(UUID)
    for followers in rec._followed.values():
        followers.add(UUID)
    rec.queued = []
    rec.enqueue = rec.queued.append  # record what would be queued instead of running passes
    return rec


def answer(rec: Reconciler, key: str, value, version: int = 0) -> None:
    text = None if value is None else (value.to_json() if isinstance(value, MigrationRecord) else value)
    rec._on_value(UUID, key, None if text is None else Versioned(text, version))


# ---- the table ---------------------------------------------------------------------------------


def test_put_tracks_loaded_and_present_keys():
    table = DomainTable()
    table.put(UUID, S.DOMAIN_STATE, True, state="start")
    table.put(UUID, S.DOMAIN_MIGRATION, False)
    vm = table.get(UUID)
    assert vm.has(S.DOMAIN_STATE, S.DOMAIN_MIGRATION) and not vm.has(S.DOMAIN_NODE)
    assert vm.present == {S.DOMAIN_STATE}
    table.put(UUID, S.DOMAIN_STATE, False, state="")
    assert table.get(UUID).present == frozenset() and table.get(UUID).has(S.DOMAIN_STATE)


def test_wrote_migration_applies_only_over_the_version_it_replaced():
    table = DomainTable()
    table.put(UUID, S.DOMAIN_MIGRATION, True, migration=record("requested"), migration_version=0)
    assert (table.get(UUID).migration_source, table.get(UUID).migration_target) == ("n1", "n2")
    # our own write of `prepared` (version 0 -> 1) is recorded at once
    table.wrote_migration(UUID, ("m1", 0), record("prepared"), 1)
    assert (table.get(UUID).migration.step, table.get(UUID).migration_version) == ("prepared", 1)
    # a write based on a version the table no longer holds does not overwrite it
    table.wrote_migration(UUID, ("m1", 0), record("transferring"), 1)
    assert table.get(UUID).migration.step == "prepared"
    # nor one about another record
    table.wrote_migration(UUID, ("other", 1), None, -1)
    assert table.get(UUID).migration.id == "m1"
    # ending the migration clears the record and its endpoints
    table.wrote_migration(UUID, ("m1", 1), None, -1)
    vm = table.get(UUID)
    assert (vm.migration, vm.migration_version, vm.migration_source, vm.migration_target) == (None, -1, None, None)


def test_wrote_migration_for_an_unknown_vm_does_nothing():
    table = DomainTable()
    table.wrote_migration(UUID, ("m1", 0), record("prepared"), 1)
    assert table.get(UUID) is None


# ---- the reconciler's view of watch answers ------------------------------------------------------


def test_answers_fill_the_table_and_decide_from_it():
    rec = reconciler("n2")
    assert rec.desired_from_table(UUID) == (None, None)
    answer(rec, S.DOMAIN_STATE, "start", 3)
    answer(rec, S.DOMAIN_NODE, "n2", 5)
    assert rec.desired_from_table(UUID) == (LOADING, None)  # the migration key is not answered yet
    answer(rec, S.DOMAIN_MIGRATION, record("requested"), 0)
    assert rec.desired_from_table(UUID) == (LOADING, None)  # nor the runstate key
    answer(rec, S.DOMAIN_RUNSTATE, None)
    desired, known = rec.desired_from_table(UUID)
    assert (desired.state, desired.node, desired.migration_source, desired.migration_target) == (
        "start",
        "n2",
        "n1",
        "n2",
    )
    assert known == (record("requested"), 0)
    assert UUID in rec.queued  # the VM concerns n2 (its target): a pass is queued


def test_the_state_is_the_runstate_record_while_it_names_the_desired_states_version():
    rec = reconciler("n1")
    answer(rec, S.DOMAIN_STATE, "shutdown", 3)
    answer(rec, S.DOMAIN_NODE, "n1")
    answer(rec, S.DOMAIN_MIGRATION, None)
    answer(rec, S.DOMAIN_RUNSTATE, RunState("stop", 2, by="n1").to_json(), 0)  # for an older request
    assert rec.domains.get(UUID).state == "shutdown"
    answer(rec, S.DOMAIN_RUNSTATE, RunState("stop", 3, by="n1").to_json(), 1)  # the daemon ended this one
    assert rec.domains.get(UUID).state == "stop" and rec.desired_from_table(UUID)[0].state == "stop"
    answer(rec, S.DOMAIN_STATE, "shutdown", 4)  # the operator asks again (the same value)
    assert rec.domains.get(UUID).state == "shutdown"
    answer(rec, S.DOMAIN_RUNSTATE, "[1]", 2)  # not valid: the desired state applies, reported once
    vm = rec.domains.get(UUID)
    assert (vm.state, vm.runstate, vm.left_alone) == ("shutdown", None, "")


def test_a_missing_state_or_node_reads_as_no_vm():
    rec = reconciler()
    answer(rec, S.DOMAIN_STATE, None)
    answer(rec, S.DOMAIN_NODE, "n1")
    answer(rec, S.DOMAIN_MIGRATION, None)
    answer(rec, S.DOMAIN_RUNSTATE, None)
    assert rec.desired_from_table(UUID) == (None, None)


def test_an_answer_older_than_our_own_write_is_ignored():
    rec = reconciler()
    answer(rec, S.DOMAIN_STATE, "start")
    answer(rec, S.DOMAIN_NODE, "n2")
    answer(rec, S.DOMAIN_MIGRATION, record("requested"), 0)
    rec.domains.wrote_migration(UUID, ("m1", 0), record("prepared"), 1)
    answer(rec, S.DOMAIN_MIGRATION, record("requested"), 0)  # a read sent before our write
    assert rec.domains.get(UUID).migration_version == 1
    answer(rec, S.DOMAIN_MIGRATION, record("transferring"), 2)  # newer: taken
    assert rec.domains.get(UUID).migration.step == "transferring"
    answer(rec, S.DOMAIN_MIGRATION, record("requested", rid="m2"), 0)  # a new record: taken
    assert rec.domains.get(UUID).migration.id == "m2"


def test_an_unreadable_migration_record_counts_as_none_and_leaves_the_vm_alone():
    rec = reconciler()
    answer(rec, S.DOMAIN_STATE, "start")
    answer(rec, S.DOMAIN_NODE, "n1")
    answer(rec, S.DOMAIN_RUNSTATE, None)
    rec._on_value(UUID, S.DOMAIN_MIGRATION, Versioned("{not json", 4))
    vm = rec.domains.get(UUID)
    assert vm.migration is None and vm.migration_version == 4 and vm.has(S.DOMAIN_MIGRATION)
    assert "is not valid" in vm.migration_error and vm.left_alone == vm.migration_error
    desired, known = rec.desired_from_table(UUID)
    assert desired.invalid == vm.migration_error and known is None


def test_answers_about_vms_no_longer_watched_are_dropped():
    rec = reconciler()
    rec._watched.discard(UUID)
    answer(rec, S.DOMAIN_STATE, "start")
    assert rec.domains.get(UUID) is None and rec.queued == []


def test_xml_answers_carry_memory_and_the_text():
    rec = reconciler()
    xml = (
        f"<domain type='kvm'><name>web1</name><uuid>{UUID}</uuid><memory unit='MiB'>768</memory>"
        "<vcpu>3</vcpu><os><type>hvm</type></os></domain>"
    )
    answer(rec, S.DOMAIN_XML, xml)
    vm = rec.domains.get(UUID)
    assert (vm.name, vm.memory_mib, vm.vcpus, vm.xml_ok, vm.xml) == ("web1", 768, 3, True, xml)
    answer(rec, S.DOMAIN_XML, "<domain>")
    vm = rec.domains.get(UUID)
    assert (vm.memory_mib, vm.xml_ok) == (0, False)


# ---- which daemons follow a migration record --------------------------------------------------


def test_only_the_two_sides_follow_a_migration_record():
    rec = reconciler("n3")
    client = rec.store
    path = rec.schema.domain_migration(UUID)
    answer(rec, S.DOMAIN_NODE, "n2")
    answer(rec, S.DOMAIN_MIGRATION, record("requested"))  # n1 -> n2: nothing to do with n3
    rec._watch_key(UUID, S.DOMAIN_MIGRATION)  # the watch as armed at start-up
    assert client.reads == [path]
    client.watches[path](None)  # the record changes (prepared)
    assert client.reads == [path] and UUID not in rec._followed[S.DOMAIN_MIGRATION]  # not followed any more
    answer(rec, S.DOMAIN_NODE, "n3")  # the VM is assigned here now
    assert client.reads == [path, path] and UUID in rec._followed[S.DOMAIN_MIGRATION]
    answer(rec, S.DOMAIN_NODE, "n3")  # already followed: no second chain
    assert client.reads == [path, path]
    client.watches[path](None)  # assigned here: every change is read
    assert client.reads == [path, path, path]


def test_lastnode_is_followed_only_where_the_vm_is_assigned():
    # A temporary migration rewrites lastnode; nodes the VM has nothing to do with stop reading it
    # (a node being made ready reads lastnode fresh instead).
    rec = reconciler("n3")
    client = rec.store
    path = rec.schema.domain_key(UUID, S.DOMAIN_LASTNODE)
    answer(rec, S.DOMAIN_NODE, "n2")
    rec._watch_key(UUID, S.DOMAIN_LASTNODE)
    assert client.reads == [path]
    client.watches[path](None)  # lastnode changes (n1 -> n2 as a migrate)
    assert client.reads == [path] and UUID not in rec._followed[S.DOMAIN_LASTNODE]
    answer(rec, S.DOMAIN_NODE, "n3")  # assigned here now: read it again
    assert client.reads.count(path) == 2 and UUID in rec._followed[S.DOMAIN_LASTNODE]


def test_a_record_naming_this_node_or_a_vm_running_here_is_followed():
    rec = reconciler("n1")
    answer(rec, S.DOMAIN_NODE, "n2")
    answer(rec, S.DOMAIN_MIGRATION, record("requested"))  # this node is the source
    assert rec._follows(UUID)
    answer(rec, S.DOMAIN_MIGRATION, None)  # the migration ended
    assert not rec._follows(UUID)
    rec.local = {UUID}  # but libvirt runs it here
    assert rec._follows(UUID)
    assert reconciler("n9")._follows("unknown-vm")  # nothing known yet: followed


def test_an_answer_that_changes_nothing_queues_no_pass():
    rec = reconciler("n1")
    answer(rec, S.DOMAIN_STATE, "start", 1)
    answer(rec, S.DOMAIN_NODE, "n1", 1)
    answer(rec, S.DOMAIN_MIGRATION, record("requested"), 0)
    rec.domains.wrote_migration(UUID, ("m1", 0), record("prepared"), 1)  # our own write
    rec.queued.clear()
    answer(rec, S.DOMAIN_MIGRATION, record("prepared"), 1)  # its watch's answer: already known
    assert rec.queued == []
    answer(rec, S.DOMAIN_MIGRATION, record("transferring"), 2)
    assert rec.queued == [UUID]


def test_an_incoming_vm_that_starts_or_resumes_here_gets_a_pass():
    rec = reconciler("n2")
    answer(rec, S.DOMAIN_NODE, "n2")
    answer(rec, S.DOMAIN_MIGRATION, replace(record("transferring"), method_used="shutdown"))  # n1 -> n2
    rec.queued.clear()
    rec._on_lifecycle(UUID, "started", 0)  # a shutdown migration's target started it itself
    assert rec.queued == []
    answer(rec, S.DOMAIN_MIGRATION, replace(record("transferring"), method_used="live"), version=1)
    rec.queued.clear()
    rec._on_lifecycle(UUID, "suspended", 0)
    rec._on_lifecycle("another-vm", "resumed", 0)
    assert rec.queued == []
    rec._on_lifecycle(UUID, "resumed", 0)
    assert rec.queued == [UUID]
    source = reconciler("n1")
    answer(source, S.DOMAIN_MIGRATION, replace(record("transferring"), method_used="live"))
    source.queued.clear()
    source._on_lifecycle(UUID, "started", 0)  # only the target wakes on it
    assert source.queued == []
