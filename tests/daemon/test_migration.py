"""One side's steps of the protocol (node_daemon/migration.py), driven directly against a real
ZooKeeper and the libvirt test driver: the cases where what a step decided from (a watched copy,
keys read ahead) is older than ZooKeeper."""

from __future__ import annotations

import json
import logging
import time
import queue
from dataclasses import replace

import libvirt
import pytest

from pvc_cluster_common import _schema as S
from pvc_cluster_common._cluster import read_vm, vm_definition
from pvc_cluster_common._records import MigrationRecord
from pvc_cluster_common._requests import request_vm
from pvc_node_daemon.config import parse_config
from pvc_node_daemon.context import DaemonContext
from pvc_node_daemon.domains import DomainTable
from pvc_node_daemon.hypervisor import (
    Hypervisor,
    HypervisorError,
    HypervisorTimeout,
    HypervisorUnavailable,
    MigrationSetup,
)
from pvc_node_daemon.migration import ASK, Migration, MigrationAgent
from tests.support.identities import node_auth

from .harness import NODE_XML, domain_xml

pytestmark = pytest.mark.zk


@pytest.fixture
def cluster(store):
    """Nodes n1 and n2, ready, and VM m1 on n1 (in ZooKeeper; libvirt is up to each test)."""
    schema = store.schema
    values = {}
    for node in ("n1", "n2", "n3"):
        values.update(
            {
                schema.node(node): "",
                schema.node_key(node, S.NODE_DAEMON_STATE): "run",
                schema.node_key(node, S.NODE_DOMAIN_STATE): "ready",
                schema.node_key(node, S.NODE_MEMTOTAL): 16384,
                schema.node_key(node, S.NODE_MEMPROV): 0,
                schema.node_key(node, S.NODE_MEMRESERVE): 0,
                # made by each node's daemon when it registers: another node may reserve in
                # it (an abort gives the VM back to its source) but not create it
                schema.node_reservations(node): "",
                schema.node_claims(node): "",  # likewise: its peers claim and note verdicts in it
            }
        )
    uuid, xml = domain_xml("m1", memory="256")
    values.update(vm_definition(schema, uuid, "m1", xml, "n1", "start"))
    store.commit(values)
    return store, uuid, xml


@pytest.fixture
def make_agent(zk_server, zk_root, tmp_path):
    opened = []

    def make(node: str, **sections) -> MigrationAgent:
        from pvc_cluster_common._store import ClusterStore

        config = parse_config(
            {
                "node": node,
                "zookeeper": {"hosts": zk_server.hosts, "root": zk_root, "auth": node_auth(node)},
                "libvirt": {"call_timeout_s": 5},
                "intervals": {"shutdown_timeout_s": 5},
                **sections,
            }
        )
        host = tmp_path / f"{node}.xml"
        host.write_text(NODE_XML.format(kib=16 * 1024 * 1024))
        hypervisor = Hypervisor(f"test://{host}", call_timeout_s=5).open()
        store = ClusterStore(config.zookeeper)
        store.start()
        opened.append((hypervisor, store))
        return MigrationAgent(DaemonContext(node, config, store, hypervisor, DomainTable()))

    yield make
    for hypervisor, store in opened:
        hypervisor.close()
        store.stop()


def request(store, uuid, target):
    return request_vm(store, uuid, "migrate", "test", target=target)


def record_of(store, uuid):
    path = store.schema.domain_migration(uuid)
    found = store.find(path)
    return (MigrationRecord.from_json(found[0], path, uuid), found[1]) if found else (None, -1)


def rewrite_record(store, uuid, **changes):
    """The record as a peer's step would leave it (a version-checked write)."""
    record, version = record_of(store, uuid)
    path = store.schema.domain_migration(uuid)
    store.commit({path: replace(record, **changes).to_json()}, expect_versions={path: version})


def last_history(store, uuid):
    path = store.schema.domain_history(uuid)
    return json.loads(store.find_text(f"{path}/{sorted(store.list_children(path, missing_ok=True))[-1]}"))


def target_with_readiness_frozen(store, uuid, make_agent, change: str):
    """Target n2 of a new request, whose watched copy of its states stays as it is now (as if
    its watch had not fired yet) while its domain state is rewritten to ``change``."""
    target = make_agent("n2")
    target.readiness.start()
    request(store, uuid, "n2")
    stale = target.readiness.snapshot()
    assert stale is not None
    states = [stale[path] for path in target.readiness.paths[:2]]  # then the claims note ("")
    assert all(value is not None and value[0] in ("run", "ready") for value in states)
    assert stale[target.readiness.paths[2]] is not None and stale[target.readiness.paths[2]][0] == ""
    store.commit({store.schema.node_key("n2", S.NODE_DOMAIN_STATE): change})
    target.readiness.snapshot = lambda: stale
    return target


def test_prepare_refuses_only_after_reading_its_states_fresh(cluster, make_agent):
    store, uuid, _ = cluster
    # The watched copy still says ready ...
    target = target_with_readiness_frozen(store, uuid, make_agent, "flush")
    # ... the prepared write checks its version, fails, and the fresh read refuses the VM
    target.handle(uuid, record_of(store, uuid), local_state=None)
    final = last_history(store, uuid)
    assert final["result"] == "aborted" and "not ready" in final["reason"], final
    assert record_of(store, uuid) == (None, -1)


def test_prepare_with_a_copy_one_version_behind_still_prepares(cluster, make_agent):
    store, uuid, _ = cluster
    target = target_with_readiness_frozen(store, uuid, make_agent, "ready")  # the same value, a newer version
    target.handle(uuid, record_of(store, uuid), local_state=None)
    record, _ = record_of(store, uuid)
    assert record.step == "prepared"


def test_a_side_that_wrote_its_step_arms_the_deadline_of_its_wait(cluster, make_agent):
    """After its own write no watch brings a pass (the table already holds the record), so the
    agent queues one, and that pass arms the deadline of the step it now waits at: here a
    shutdown migration's source at `transferred`, waiting for the target to start the VM.
    Without it, a target that dies at that moment left the source waiting for ever."""
    store, uuid, xml = cluster
    store.commit({store.schema.domain_meta(uuid, S.META_MIGRATION_METHOD): "shutdown"})
    source = make_agent("n1")
    source.hypervisor.create(xml)
    woken = []
    source.deadlines.wake = woken.append  # the reconciler's enqueue, in the daemon
    request(store, uuid, "n2")
    rewrite_record(store, uuid, step="prepared")
    source.handle(uuid, record_of(store, uuid), local_state="running")
    record, version = record_of(store, uuid)
    assert record.step == "transferred"
    assert uuid in woken
    source.handle(uuid, (record, version), local_state=None)  # the queued pass
    assert source.deadlines._items[uuid][1] == f"{record.id}:{version}"


def test_transfer_rereads_what_it_read_ahead_when_it_changed(cluster, make_agent):
    store, uuid, xml = cluster
    source = make_agent("n1")
    source.hypervisor.create(xml)
    request(store, uuid, "n2")
    source.handle(uuid, record_of(store, uuid), local_state="running")  # `requested`: reads ahead
    assert uuid in source._prefetched
    # the method changes after the read ahead, before the transfer
    store.commit({store.schema.domain_meta(uuid, S.META_MIGRATION_METHOD): "shutdown"})
    rewrite_record(store, uuid, step="prepared")
    source.handle(uuid, record_of(store, uuid), local_state="running")
    record, _ = record_of(store, uuid)
    # the method as it is now: a shutdown migration, with no live attempt first
    assert (record.step, record.method, record.method_used) == ("transferred", "shutdown", "shutdown")
    assert not record.fallback_reason
    assert source.hypervisor.status(uuid) is None


def test_transfer_aborts_when_the_target_changed_after_the_read_ahead(cluster, make_agent):
    store, uuid, xml = cluster
    source = make_agent("n1")
    source.hypervisor.create(xml)
    request(store, uuid, "n2")
    source.handle(uuid, record_of(store, uuid), local_state="running")
    store.commit({store.schema.domain_key(uuid, S.DOMAIN_NODE): "n3"})  # reassigned by other means
    rewrite_record(store, uuid, step="prepared")
    source.handle(uuid, record_of(store, uuid), local_state="running")
    final = last_history(store, uuid)
    assert final["result"] == "aborted" and final["reason"].startswith("target changed"), final
    assert source.hypervisor.status(uuid).state == "running"


@pytest.mark.parametrize("state", ["dead", "fencing", "fenced", "fence-failed"])
@pytest.mark.parametrize("written_as", ["own state", "peer verdict"])
def test_transfer_aborts_when_the_target_is_lost_after_it_prepared(cluster, make_agent, monkeypatch, state, written_as):
    """A target marked dead (then fenced) after it prepared receives nothing: a fenced host whose
    libvirtd is back before its daemon would get a VM that its recovery, or this side's ground
    truth, starts a second time (models/ha.pml, rule D6). The target's state is lost either as
    its own key says (an operator's write) or where a peer writes it: a verdict under the peer's
    own keys naming the version of the target's state it judged (the target's own state stays
    `run`); the transferring write checks the target's claims container, whose version every
    verdict changes."""
    store, uuid, xml = cluster
    source = make_agent("n1")
    source.hypervisor.create(xml)
    calls = []
    monkeypatch.setattr(source.hypervisor, "migrate", lambda *args, **kwargs: calls.append(args))
    request(store, uuid, "n2")
    source.handle(uuid, record_of(store, uuid), local_state="running")  # reads ahead: n2 is run
    if written_as == "own state":
        store.commit({store.schema.node_key("n2", S.NODE_DAEMON_STATE): state})
    else:
        if state != "dead":
            judge(store, "n2", "dead")
        judge(store, "n2", state)
        assert store.find_text(store.schema.node_key("n2", S.NODE_DAEMON_STATE)) == "run"
    rewrite_record(store, uuid, step="prepared")
    source.handle(uuid, record_of(store, uuid), local_state="running")
    final = last_history(store, uuid)
    assert final["result"] == "aborted" and final["reason"] == f"target n2 is {state} since it prepared", final
    assert not calls and source.hypervisor.status(uuid).state == "running"
    assert read_vm(store, uuid).node == "n1"


def test_transfer_reads_again_when_a_key_read_ahead_changed(cluster, make_agent):
    # With every key present, a change since the read ahead fails the transferring write's
    # version check (and the keys are read again); an absent key cannot be checked that way.
    store, uuid, xml = cluster
    for key, value in ((S.META_MIGRATION_METHOD, "default"), (S.META_MIGRATION_MAX_DOWNTIME_MS, 300)):
        store.commit({store.schema.domain_meta(uuid, key): value})
    source = make_agent("n1")
    source.hypervisor.create(xml)
    request(store, uuid, "n2")
    source.handle(uuid, record_of(store, uuid), local_state="running")
    reads = []
    real = source.read_transfer_inputs
    source.read_transfer_inputs = lambda u, record: reads.append(u) or real(u, record)
    store.commit({store.schema.domain_meta(uuid, S.META_MIGRATION_METHOD): "shutdown"})
    rewrite_record(store, uuid, step="prepared")
    source.handle(uuid, record_of(store, uuid), local_state="running")
    record, _ = record_of(store, uuid)
    assert reads == [uuid]  # the stale read ahead was caught by its version check, then re-read
    assert (record.step, record.method, record.method_used) == ("transferred", "shutdown", "shutdown")


@pytest.mark.parametrize(
    "meta",
    [
        {S.META_MIGRATION_METHOD: "shutdown", S.META_MIGRATION_MAX_DOWNTIME_MS: 300},
        {S.META_MIGRATION_METHOD: "shutdown"},  # no live migration: its maximum downtime does not matter
    ],
)
def test_transfer_starts_from_the_keys_read_ahead(cluster, make_agent, meta):
    store, uuid, xml = cluster
    for key, value in meta.items():
        store.commit({store.schema.domain_meta(uuid, key): value})
    source = make_agent("n1")
    source.hypervisor.create(xml)
    request(store, uuid, "n2")
    source.handle(uuid, record_of(store, uuid), local_state="running")
    reads = []
    source.read_transfer_inputs = lambda u, record: reads.append(u)
    rewrite_record(store, uuid, step="prepared")
    source.handle(uuid, record_of(store, uuid), local_state="running")
    record, _ = record_of(store, uuid)
    assert reads == []
    assert (record.step, record.method, record.method_used) == ("transferred", "shutdown", "shutdown")


def test_transfer_reads_again_when_a_key_it_depends_on_was_not_set(cluster, make_agent):
    # The method is not set (default): a method set since the read ahead could not be noticed.
    store, uuid, xml = cluster
    source = make_agent("n1")
    source.hypervisor.create(xml)
    request(store, uuid, "n2")
    source.handle(uuid, record_of(store, uuid), local_state="running")
    inputs = source._prefetched[uuid].inputs
    record, version = record_of(store, uuid)
    assert not source.checkable(Migration(uuid, record, version, inputs=inputs))
    # live whatever the method says
    assert source.checkable(Migration(uuid, replace(record, force_live=True), version, inputs=inputs))
    method = store.schema.domain_meta(uuid, S.META_MIGRATION_METHOD)
    assert source.checkable(Migration(uuid, record, version, inputs=dict(inputs, **{method: ("live", 0)})))
    node = store.schema.domain_key(uuid, S.DOMAIN_NODE)
    assert not source.checkable(
        Migration(uuid, replace(record, force_live=True), version, inputs=dict(inputs, **{node: None}))
    )


def test_target_ends_a_live_migration_when_its_copy_runs(cluster, make_agent):
    # libvirt resumes the incoming copy only once the switch-over is done: no need to wait for
    # the source's `transferred`, which then finds no record.
    store, uuid, _ = cluster
    target = make_agent("n2")
    request(store, uuid, "n2")
    rewrite_record(store, uuid, step="transferring", method_used="live")
    target.handle(uuid, record_of(store, uuid), local_state="paused")  # still copying: waits
    assert record_of(store, uuid)[0].step == "transferring"
    target.handle(uuid, record_of(store, uuid), local_state="running")  # resumed here
    final = last_history(store, uuid)
    assert (final["result"], final["method_used"]) == ("done", "live") and "transferred" not in final["steps"]
    assert record_of(store, uuid) == (None, -1)
    # the reservation stays until n2's keepalive counts the VM in memprov (it folds it)
    assert store.find_text(store.schema.node_reservation("n2", uuid)) == "256"


def test_a_shutdown_migration_target_does_not_end_it_before_transferred(cluster, make_agent):
    store, uuid, _ = cluster
    target = make_agent("n2")
    request(store, uuid, "n2")
    rewrite_record(store, uuid, step="transferring", method_used="shutdown")
    target.handle(uuid, record_of(store, uuid), local_state="running")
    assert record_of(store, uuid)[0].step == "transferring"


def test_a_shutdown_request_turned_live_looks_the_target_up_then(cluster, make_agent):
    # A request for a shutdown migration reads no target URIs ahead; if the method changes to
    # a live one before the transfer, the live attempt reads them itself.
    store, uuid, xml = cluster
    store.commit({store.schema.domain_meta(uuid, S.META_MIGRATION_METHOD): "shutdown"})
    source = make_agent("n1")
    source.hypervisor.create(xml)
    request(store, uuid, "n2")
    source.handle(uuid, record_of(store, uuid), local_state="running")
    assert store.schema.node_key("n2", S.NODE_ADDRESS) not in source._prefetched[uuid].inputs
    store.commit({store.schema.domain_meta(uuid, S.META_MIGRATION_METHOD): "default"})
    rewrite_record(store, uuid, step="prepared")
    source.handle(uuid, record_of(store, uuid), local_state="running")
    record, _ = record_of(store, uuid)
    assert (record.step, record.method, record.method_used) == ("transferred", "default", "shutdown")
    assert record.fallback_reason  # n2 published no address: tried at qemu+tls://n2/system, by its name


@pytest.fixture
def live_source(cluster, make_agent, monkeypatch):
    """Source n1 running m1 (its `started` event delivered), n2 publishing its address, and
    libvirt's migration calls recorded (the test driver has none) as (call, argument)."""
    store, uuid, xml = cluster
    calls = []
    monkeypatch.setattr(
        libvirt.virDomain,
        "migrateSetMaxDowntime",
        lambda self, downtime, flags=0: calls.append(("downtime", downtime)) or 0,
    )
    monkeypatch.setattr(
        libvirt.virDomain, "migrateToURI3", lambda self, dconnuri, params, flags=0: calls.append(("p2p", dconnuri)) or 0
    )
    store.commit({store.schema.node_key("n2", S.NODE_ADDRESS): "10.77.0.2"})
    source = make_agent("n1")
    events: queue.Queue = queue.Queue()
    source.hypervisor.add_lifecycle_listener(lambda u, event, detail: events.put((u, event)))
    source.hypervisor.create(xml)
    assert events.get(timeout=10) == (uuid, "started")
    return store, uuid, source, calls


def test_a_live_transfer_starts_with_the_libvirt_setup_made_at_requested(live_source):
    # The lookup and the maximum downtime are done while the target prepares, not after the
    # transferring write.
    store, uuid, source, calls = live_source
    store.commit({store.schema.domain_meta(uuid, S.META_MIGRATION_MAX_DOWNTIME_MS): 250})
    request(store, uuid, "n2")
    source.handle(uuid, record_of(store, uuid), local_state="running")  # `requested`
    setup = source._prefetched[uuid].setup
    assert isinstance(setup, MigrationSetup) and (setup.uuid, setup.max_downtime_ms) == (uuid, 250)
    assert calls == [("downtime", 250)]
    rewrite_record(store, uuid, step="prepared")
    source.handle(uuid, record_of(store, uuid), local_state="running")
    assert calls == [("downtime", 250), ("p2p", "qemu+tls://10.77.0.2/system")]
    record, _ = record_of(store, uuid)
    assert (record.step, record.method_used) == ("transferred", "live")


def test_a_downtime_changed_after_requested_is_applied_at_the_transfer(live_source):
    store, uuid, source, calls = live_source
    downtime = store.schema.domain_meta(uuid, S.META_MIGRATION_MAX_DOWNTIME_MS)
    store.commit({downtime: 250})
    request(store, uuid, "n2")
    source.handle(uuid, record_of(store, uuid), local_state="running")
    store.commit({downtime: 500})
    rewrite_record(store, uuid, step="prepared")
    source.handle(uuid, record_of(store, uuid), local_state="running")
    assert calls == [("downtime", 250), ("downtime", 500), ("p2p", "qemu+tls://10.77.0.2/system")]


@pytest.mark.parametrize("stored, expected", [(None, False), ("true", True), ("false", False), ("maybe", False)])
def test_the_vms_auto_converge_meta_reaches_the_live_migration(live_source, monkeypatch, stored, expected):
    store, uuid, source, calls = live_source
    flags = []
    monkeypatch.setattr(libvirt.virDomain, "migrateToURI3", lambda self, dconnuri, params, f=0: flags.append(f) or 0)
    if stored is not None:
        store.commit({store.schema.domain_meta(uuid, S.META_MIGRATION_AUTO_CONVERGE): stored})
    request(store, uuid, "n2")
    source.handle(uuid, record_of(store, uuid), local_state="running")
    rewrite_record(store, uuid, step="prepared")
    source.handle(uuid, record_of(store, uuid), local_state="running")
    assert len(flags) == 1 and bool(flags[0] & libvirt.VIR_MIGRATE_AUTO_CONVERGE) == expected
    reported = list(source.invalid.reported())
    assert reported == ([store.schema.domain_meta(uuid, S.META_MIGRATION_AUTO_CONVERGE)] if stored == "maybe" else [])


@pytest.mark.parametrize(
    "sections, expected", [({}, True), ({"migration": {"tls": True}}, True), ({"migration": {"tls": False}}, False)]
)
def test_a_live_migration_asks_for_tls_as_the_daemon_is_configured(
    live_source, make_agent, monkeypatch, sections, expected
):
    # migration.tls (default true): QEMU's memory stream goes over TLS (VIR_MIGRATE_TLS), to the
    # target at the default qemu+tls:// template; false only for a libvirt set up without TLS.
    store, uuid, source, _calls = live_source
    seen = []
    monkeypatch.setattr(
        libvirt.virDomain, "migrateToURI3", lambda self, dconnuri, params, f=0: seen.append((dconnuri, params, f)) or 0
    )
    if sections:
        source.hypervisor.close()  # the same node, configured otherwise
        source = make_agent("n1", **sections)
        source.hypervisor.create(store.find_text(store.schema.domain_key(uuid, S.DOMAIN_XML)))
    request(store, uuid, "n2")
    source.handle(uuid, record_of(store, uuid), local_state="running")
    rewrite_record(store, uuid, step="prepared")
    source.handle(uuid, record_of(store, uuid), local_state="running")
    assert len(seen) == 1, seen
    dconnuri, params, flags = seen[0]
    assert (dconnuri, params) == ("qemu+tls://10.77.0.2/system", {libvirt.VIR_MIGRATE_PARAM_URI: "tcp://10.77.0.2"})
    assert bool(flags & libvirt.VIR_MIGRATE_TLS) == expected
    assert flags & libvirt.VIR_MIGRATE_LIVE and flags & libvirt.VIR_MIGRATE_PEER2PEER
    record, _ = record_of(store, uuid)
    assert (record.step, record.method_used) == ("transferred", "live")


@pytest.mark.parametrize("stored", ["3000000", "1" + "0" * 30])
def test_a_stored_downtime_beyond_qemus_limit_is_never_handed_to_libvirt(live_source, stored):
    # Beyond QEMU's 2000 s (or libvirt's 64 bits: 10**30 raised OverflowError in the source daemon
    # and left the migration at transferring), the stored value reads as invalid: the default applies.
    store, uuid, source, calls = live_source
    store.commit({store.schema.domain_meta(uuid, S.META_MIGRATION_MAX_DOWNTIME_MS): stored})
    request(store, uuid, "n2")
    source.handle(uuid, record_of(store, uuid), local_state="running")
    rewrite_record(store, uuid, step="prepared")
    source.handle(uuid, record_of(store, uuid), local_state="running")
    assert calls == [("downtime", 300), ("p2p", "qemu+tls://10.77.0.2/system")]
    record, _ = record_of(store, uuid)
    assert (record.step, record.method_used) == ("transferred", "live")
    assert list(source.invalid.reported()) == [store.schema.domain_meta(uuid, S.META_MIGRATION_MAX_DOWNTIME_MS)]


@pytest.mark.parametrize("method, local", [("shutdown", "running"), ("default", "shutoff")])
def test_no_libvirt_setup_ahead_when_the_migration_will_not_start_live(live_source, method, local):
    store, uuid, source, calls = live_source
    store.commit({store.schema.domain_meta(uuid, S.META_MIGRATION_METHOD): method})
    request(store, uuid, "n2")
    source.handle(uuid, record_of(store, uuid), local_state=local)
    assert source._prefetched[uuid].setup is None and calls == []


def test_an_ended_migration_drops_what_was_read_ahead(live_source):
    store, uuid, source, _ = live_source
    request(store, uuid, "n2")
    source.handle(uuid, record_of(store, uuid), local_state="running")
    assert uuid in source._prefetched
    store.delete([store.schema.domain_migration(uuid)])  # ended elsewhere (as a target's abort does)
    source.handle(uuid, record_of(store, uuid), local_state="running")
    assert uuid not in source._prefetched


# ---- peers' URIs (docs/security.md) -----------------------------------------------------------------


@pytest.fixture
def marker_uri(tmp_path):
    """A qemu+ext URI whose command, if libvirt ever ran it, would create a marker file."""
    marker = tmp_path / "marker"
    script = tmp_path / "hostile.sh"
    script.write_text(f"#!/bin/sh\ntouch {marker}\n")
    script.chmod(0o755)
    return f"qemu+ext:///system?command={script}", marker


def test_a_uri_written_into_zookeeper_is_never_opened(cluster, make_agent, marker_uri):
    store, uuid, _ = cluster
    uri, marker = marker_uri
    schema = store.schema
    # The peer's published URIs are hostile; its address is a plain IP address on loopback.
    store.commit(
        {
            schema.node_key("n2", S.NODE_LIBVIRT_URI): uri,
            schema.node_key("n2", S.NODE_TRANSPORT_URI): uri,
            schema.node_key("n2", S.NODE_ADDRESS): "127.0.0.1",
        }
    )
    # our own template (port 1 on loopback: the connection is refused at once, nothing leaves the host)
    source = make_agent("n1", migration={"libvirt_uri_template": "qemu+tcp://{address}:1/system"})
    assert source.peer_uris(
        "n2", schema.node_key("n2", S.NODE_ADDRESS), store.find(schema.node_key("n2", S.NODE_ADDRESS))
    ) == ("qemu+tcp://127.0.0.1:1/system", "tcp://127.0.0.1")
    assert source.peer_state("n2", uuid) == "unknown"  # asked libvirt at our URI: refused
    assert not marker.exists()


@pytest.mark.parametrize(
    "address",
    ["qemu+ext:///system?command=/bin/true", "10.0.0.1/system?command=x", "a b", "user@host", "[::1]", "host:16509"],
)
def test_a_peer_address_that_could_change_the_uri_is_refused(cluster, make_agent, marker_uri, address):
    store, uuid, _ = cluster
    schema = store.schema
    store.commit(
        {schema.node_key("n2", S.NODE_ADDRESS): address, schema.node_key("n2", S.NODE_LIBVIRT_URI): marker_uri[0]}
    )
    source = make_agent("n1")
    path = schema.node_key("n2", S.NODE_ADDRESS)
    assert source.peer_uris("n2", path, store.find(path)) is None
    assert source.peer_state("n2", uuid) == "unknown"
    assert not marker_uri[1].exists()


def test_a_live_migration_goes_to_the_uri_built_from_the_targets_address(live_source, marker_uri):
    store, uuid, source, calls = live_source
    schema = store.schema
    store.commit(
        {
            schema.node_key("n2", S.NODE_LIBVIRT_URI): marker_uri[0],
            schema.node_key("n2", S.NODE_TRANSPORT_URI): "tcp://elsewhere.example:49152",
        }
    )
    request(store, uuid, "n2")
    source.handle(uuid, record_of(store, uuid), local_state="running")
    rewrite_record(store, uuid, step="prepared")
    source.handle(uuid, record_of(store, uuid), local_state="running")
    assert ("p2p", "qemu+tls://10.77.0.2/system") in calls and not marker_uri[1].exists()


# ---- a peer that is alive but cannot act; a libvirt that cannot be asked (issue #12) ------------

TEST_PEERS = {"migration": {"libvirt_uri_template": "test:///{node}"}}  # peers answer from ZooKeeper


def expire_now(agent, uuid):
    """The step deadline of the record as it is now has passed (armed with no time left)."""
    record, version = record_of(agent.store, uuid)
    agent.deadlines.arm(uuid, f"{record.id}:{version}", 0)


def shut_down_and_transferred(store, uuid, **changes):
    """A shutdown migration n1 -> n2 whose source has stopped the VM and written `transferred`,
    with n2's daemon alive (its `alive` key) and running nothing."""
    store.commit({store.schema.domain_meta(uuid, S.META_MIGRATION_METHOD): "shutdown"})
    request(store, uuid, "n2")
    rewrite_record(store, uuid, step="transferred", method_used="shutdown", **changes)
    store.commit(
        {store.schema.node_key("n2", S.NODE_ALIVE): "test", store.schema.node_key("n2", S.NODE_RUNNINGDOMAINS): "[]"}
    )


def test_a_live_target_that_never_claims_the_start_gets_the_vm_taken_back_at_the_deadline(cluster, make_agent):
    """The target's daemon is alive but does not act (its libvirtd is down): at the source's
    deadline, off on both sides and no start claimed, the source takes the VM back."""
    store, uuid, _ = cluster
    source = make_agent("n1", **TEST_PEERS)
    shut_down_and_transferred(store, uuid)
    expire_now(source, uuid)
    source.handle(uuid, record_of(store, uuid), local_state=None)
    final = last_history(store, uuid)
    assert final["result"] == "aborted" and "target n2 did not start the VM" in final["reason"], final
    assert record_of(store, uuid) == (None, -1)
    assert store.find_text(store.schema.node_reservation("n2", uuid)) is None
    assert read_vm(store, uuid).node == "n1"  # its reconciler starts it there


def test_a_live_target_that_has_claimed_the_start_is_waited_for(cluster, make_agent):
    store, uuid, _ = cluster
    source = make_agent("n1", **TEST_PEERS)
    shut_down_and_transferred(store, uuid, starting_on="n2")
    expire_now(source, uuid)
    source.handle(uuid, record_of(store, uuid), local_state=None)
    record, _ = record_of(store, uuid)
    assert record.step == "transferred" and record.starting_on == "n2"  # may be starting it right now (I1)
    assert "target-starts" in source.deadlines._items[uuid][1]  # asked again at the next deadline


def test_a_claim_written_first_makes_the_sources_take_back_fail(cluster, make_agent):
    store, uuid, _ = cluster
    source = make_agent("n1", **TEST_PEERS)
    shut_down_and_transferred(store, uuid)
    expire_now(source, uuid)
    seen = record_of(store, uuid)
    rewrite_record(store, uuid, starting_on="n2")  # the target's claim lands between read and abort
    source.resolve(Migration(uuid, *seen))
    assert record_of(store, uuid)[0].starting_on == "n2"
    assert store.list_children(store.schema.domain_history(uuid), missing_ok=True) == []


def test_a_claimed_start_is_waited_for_when_the_target_is_gone_but_not_fenced(cluster, make_agent, monkeypatch):
    """The target claimed the start, then its `alive` went (a process stalled past its session
    still makes its libvirt call): its libvirtd says nothing runs there, and still the source does
    not take the VM back (models/ha.pml, rule D7)."""
    store, uuid, _ = cluster
    source = make_agent("n1", **TEST_PEERS)
    shut_down_and_transferred(store, uuid, starting_on="n2")
    store.delete([store.schema.node_key("n2", S.NODE_ALIVE)])
    # the target's libvirtd answers (it is not the daemon that is gone): nothing runs there yet
    monkeypatch.setattr(source, "peer_state", lambda peer, _uuid: None)
    expire_now(source, uuid)
    seen = record_of(store, uuid)
    source.handle(uuid, seen, local_state=None)
    assert record_of(store, uuid) == seen  # nothing written: not taken back
    assert store.list_children(store.schema.domain_history(uuid), missing_ok=True) == []
    assert ":claimed:" in source.deadlines._items[uuid][1]  # asked again at the next deadline


def test_a_claimed_start_of_a_fenced_target_is_given_back_to_the_source(cluster, make_agent):
    """Once the target is fenced (its power confirmed off) its claim can no longer lead to a start:
    the VM is given back to the source, whose reconciler starts it."""
    store, uuid, _ = cluster
    source = make_agent("n1", **TEST_PEERS)
    shut_down_and_transferred(store, uuid, starting_on="n2")
    store.delete([store.schema.node_key("n2", S.NODE_ALIVE)])
    store.commit({store.schema.node_key("n2", S.NODE_DAEMON_STATE): "fenced"})
    expire_now(source, uuid)
    source.handle(uuid, record_of(store, uuid), local_state=None)
    final = last_history(store, uuid)
    assert final["result"] == "aborted" and "not running on either node" in final["reason"], final
    assert record_of(store, uuid) == (None, -1)
    assert read_vm(store, uuid).node == "n1"


def judge(store, node, result, by="n3"):
    """Peer ``by``'s verdict ``result`` about the current version of ``node``'s own state, as its
    daemon writes it (node_daemon/ha.py): its own record, the note in ``node``'s claims container,
    and for a fence verdict the claim of that version. ``node``'s own keys are not written."""
    schema = store.schema
    version = store.get(schema.node_key(node, S.NODE_DAEMON_STATE)).version
    record = {"by": by, "method": "none", "result": result, "started": round(time.time(), 3), "version": version}
    values = {
        schema.node_fence_record(by, node): json.dumps(record),
        schema.node_claims(node): json.dumps({"by": by, "result": result, "version": version}),
    }
    claim = schema.node_claim(node, version)
    create = [claim] if result != "dead" and not store.exists(claim) else []
    if create:
        values[claim] = by
    store.commit(values, create=create)


def test_a_target_a_peer_judged_dead_does_not_prepare(cluster, make_agent):
    store, uuid, _ = cluster
    target = make_agent("n2")
    target.readiness.start()
    request(store, uuid, "n2")
    judge(store, "n2", "dead")
    target.handle(uuid, record_of(store, uuid), local_state=None)
    final = last_history(store, uuid)
    assert final["result"] == "aborted" and "target n2 is not ready (daemon dead" in final["reason"], final


def test_a_claimed_start_of_a_target_fenced_by_a_peers_verdict_is_given_back_to_the_source(cluster, make_agent):
    store, uuid, _ = cluster
    source = make_agent("n1", **TEST_PEERS)
    shut_down_and_transferred(store, uuid, starting_on="n2")
    store.delete([store.schema.node_key("n2", S.NODE_ALIVE)])
    for result in ("dead", "fencing"):
        judge(store, "n2", result)
    expire_now(source, uuid)
    source.handle(uuid, record_of(store, uuid), local_state=None)
    assert record_of(store, uuid)[0] is not None  # fencing: its claim may still lead to a start
    judge(store, "n2", "fenced")
    expire_now(source, uuid)
    source.handle(uuid, record_of(store, uuid), local_state=None)
    final = last_history(store, uuid)
    assert final["result"] == "aborted" and "not running on either node" in final["reason"], final
    assert read_vm(store, uuid).node == "n1"


def test_a_target_whose_source_never_starts_the_transfer_aborts_at_its_deadline(cluster, make_agent):
    """At `prepared` nothing has moved (the source transfers only after writing `transferring`):
    the target aborts without asking the source's libvirtd, which here cannot be reached."""
    store, uuid, _ = cluster
    target = make_agent("n2", migration={"libvirt_uri_template": "qemu+tcp://{address}:1/system"})
    request(store, uuid, "n2")
    rewrite_record(store, uuid, step="prepared")
    expire_now(target, uuid)
    target.handle(uuid, record_of(store, uuid), local_state=None)
    final = last_history(store, uuid)
    assert final["result"] == "aborted" and "source n1 did not start the transfer" in final["reason"], final
    assert read_vm(store, uuid).node == "n1"


def test_a_shutdown_libvirt_cannot_confirm_is_never_handed_to_the_target(cluster, make_agent):
    store, uuid, xml = cluster
    store.commit({store.schema.domain_meta(uuid, S.META_MIGRATION_METHOD): "shutdown"})
    source = make_agent("n1")
    source.hypervisor.create(xml)
    request(store, uuid, "n2")
    rewrite_record(store, uuid, step="prepared")

    def libvirtd_gone(*_args):
        raise HypervisorUnavailable("shutdown", uuid, None, "the connection to libvirtd was lost")

    source.hypervisor.shutdown_or_destroy = libvirtd_gone
    source.handle(uuid, record_of(store, uuid), local_state="running")
    record, _ = record_of(store, uuid)
    assert (record.step, record.method_used) == ("transferring", "shutdown")  # not `transferred`
    assert source.hypervisor.status(uuid).running


def test_a_target_without_libvirt_refuses_to_prepare(cluster, make_agent):
    store, uuid, _ = cluster
    target = make_agent("n2")
    request(store, uuid, "n2")
    target.hypervisor.close()  # no connection: health down
    target.handle(uuid, record_of(store, uuid))
    final = last_history(store, uuid)
    assert final["result"] == "aborted" and "target n2 cannot reach its libvirtd (down" in final["reason"], final
    assert store.find_text(store.schema.node_reservation("n2", uuid)) is None


@pytest.mark.parametrize("local_state", [ASK, "running"])
def test_a_source_without_libvirt_aborts_before_the_transfer(cluster, make_agent, local_state):
    """The VM's state here unknown (asked: unavailable), or known from a pass made before the
    connection was lost (the lab's matrix found the source writing `transferring` on such a
    view): nothing is transferred."""
    store, uuid, xml = cluster
    source = make_agent("n1")
    source.hypervisor.create(xml)
    request(store, uuid, "n2")
    rewrite_record(store, uuid, step="prepared")
    source.hypervisor.close()
    source.handle(uuid, record_of(store, uuid), local_state=local_state)
    final = last_history(store, uuid)
    assert final["result"] == "aborted" and "source n1 cannot reach its libvirtd" in final["reason"], final
    assert "transferring" not in final["steps"]
    assert read_vm(store, uuid).node == "n1"


def test_a_failed_live_transfer_to_a_target_without_libvirt_does_not_fall_back(cluster, make_agent):
    store, uuid, xml = cluster
    source = make_agent("n1")
    source.hypervisor.create(xml)
    request(store, uuid, "n2")  # method default: live, else a shutdown migration
    rewrite_record(store, uuid, step="prepared")
    store.commit({store.schema.node_key("n2", S.NODE_LIBVIRT): "down"})
    source.handle(uuid, record_of(store, uuid), local_state="running")  # the test driver cannot migrate
    final = last_history(store, uuid)
    assert final["result"] == "aborted" and "target n2's libvirt is down" in final["reason"], final
    assert final["method_used"] == "live" and not final.get("fallback_reason")
    assert source.hypervisor.status(uuid).running  # never stopped


@pytest.mark.parametrize("error", [HypervisorUnavailable, HypervisorTimeout])
def test_a_start_libvirt_does_not_confirm_keeps_the_claim(cluster, make_agent, error):
    """libvirtd went away (or hung) inside the target's create: the VM may run there now, so
    the target neither aborts (the source would start a second copy) nor lets the claim go."""
    store, uuid, _ = cluster
    target = make_agent("n2")
    shut_down_and_transferred(store, uuid)

    def create(_xml):
        raise error("create", None, None, "libvirt did not say")

    target.hypervisor.create = create
    target.handle(uuid, record_of(store, uuid), local_state=None)
    record, version = record_of(store, uuid)
    assert record.step == "transferred" and record.starting_on == "n2"
    assert target.deadlines._items[uuid][1] == f"{record.id}:{version}"  # asked again at the deadline


def test_a_live_transfer_that_lost_the_target_libvirtd_does_not_fall_back(cluster, make_agent, monkeypatch):
    """libvirt's connection to the target's libvirtd failed in the transfer (it died or restarts):
    before the target's daemon has said so, the source already knows from libvirt's error."""
    store, uuid, xml = cluster
    source = make_agent("n1")
    source.hypervisor.create(xml)
    request(store, uuid, "n2")
    rewrite_record(store, uuid, step="prepared")

    def target_libvirtd_gone(*_args, **_kwargs):
        raise HypervisorError(
            "migrate", uuid, libvirt.VIR_ERR_INTERNAL_ERROR, "client socket is closed", libvirt.VIR_FROM_RPC
        )

    monkeypatch.setattr(source.hypervisor, "migrate", target_libvirtd_gone)
    source.handle(uuid, record_of(store, uuid), local_state="running")
    final = last_history(store, uuid)
    assert final["result"] == "aborted" and "connection to the target's libvirtd failed" in final["reason"], final
    assert not final.get("fallback_reason") and source.hypervisor.status(uuid).running


def test_rehome_rewrites_the_targets_reservations_znode(cluster, make_agent, monkeypatch):
    """A VM running here but assigned to another node with no record is migrated there through
    the one request path; like every request, the reservation it makes on that node rewrites the
    node's reservations znode, so a request that read the node's figures before it fails its
    version check and plans again."""
    store, uuid, xml = cluster
    schema = store.schema
    store.commit({schema.node_reservations("n1"): "earlier"})
    _, version_before = store.find(schema.node_reservations("n1"))
    here = make_agent("n2")
    monkeypatch.setattr(here, "peer_state", lambda peer, vm: None)  # n1's libvirt: not running there
    here.hypervisor.create(xml)
    here.rehome(uuid, "n1")
    record, _ = record_of(store, uuid)
    assert record is not None and (record.source, record.target, record.kind) == ("n2", "n1", "move")
    assert store.find_text(schema.node_reservation("n1", uuid)) == "256"
    value, version_after = store.find(schema.node_reservations("n1"))
    assert value == record.id and version_after > version_before


def test_rehome_stops_the_copy_here_when_the_assigned_node_runs_it(cluster, make_agent, monkeypatch, caplog):
    """A copy here of a VM its assigned node runs (e.g. an incoming copy a restarted libvirtd
    left) is stopped (Hypervisor.stop_stale_copy), nothing is requested, and the VM stays
    assigned where it runs."""
    store, uuid, xml = cluster
    here = make_agent("n2")
    monkeypatch.setattr(here, "peer_state", lambda peer, vm: "running")  # n1's libvirt: running there
    here.hypervisor.create(xml)
    with caplog.at_level(logging.WARNING):
        here.rehome(uuid, "n1")
    assert here.hypervisor.status(uuid) is None
    assert record_of(store, uuid)[0] is None and read_vm(store, uuid).node == "n1"
    assert f"VM {uuid}: the copy here is stopped (destroyed)" in caplog.text


@pytest.mark.parametrize("counted_by", ["memprov", "reservation"])
def test_rehome_is_fit_checked_on_the_assigned_node_which_already_counts_the_vm(
    cluster, make_agent, monkeypatch, counted_by
):
    """The self-heal goes through the request's fit check. The assigned node counts the VM
    already (in its memprov, or by its reservation there), so that share is given back first: a
    node whose other VMs leave exactly the VM's 256 MiB takes it, one with 1 MiB less does not,
    and then nothing is written and the VM keeps running here (it used to be sent regardless)."""
    store, uuid, xml = cluster
    schema = store.schema
    here = make_agent("n2")
    monkeypatch.setattr(here, "peer_state", lambda peer, vm: None)
    here.hypervisor.create(xml)
    other = "00000000-0000-4000-8000-000000000001"

    def fill(others_mib):
        values = {schema.node_reservation("n1", other): others_mib}
        if counted_by == "memprov":
            values[schema.node_key("n1", S.NODE_MEMPROV)] = 256
        else:
            values[schema.node_reservation("n1", uuid)] = 256
        store.commit(values)

    fill(16384 - 256 + 1)  # 1 MiB short once the VM's own share is given back
    here.rehome(uuid, "n1")
    assert record_of(store, uuid)[0] is None
    assert here.hypervisor.status(uuid).running
    assert read_vm(store, uuid).node == "n1"
    fill(16384 - 256)  # exactly enough
    here.rehome(uuid, "n1")
    record, _ = record_of(store, uuid)
    assert record is not None and (record.source, record.target) == ("n2", "n1")
    assert store.find_text(schema.node_reservation("n1", uuid)) == "256"
