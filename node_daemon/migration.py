"""The migration agent: this node's side of the lockstep protocol (docs/migration-protocol.md).

The reconciler calls :meth:`MigrationAgent.handle` from the VM's worker thread whenever the VM's
migration record changes (a watch) or a step deadline passes. Every handler starts from the record
and its version as the daemon's watch-fed table holds them (ground-truth resolution re-reads it),
acts only on the transition the step calls for, and writes the next step with a version check: a
late or repeated event finds nothing to do, and a write based on a stale view fails instead of
overwriting a newer one. Each successful write is recorded in the table at once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from pvc_cluster_common import _records as R
from pvc_cluster_common import _schema as S
from pvc_cluster_common._cluster import meta_from, meta_paths, read_node_state, read_vm
from pvc_cluster_common._decode import Invalid
from pvc_cluster_common._domain_policy import DomainPolicy, refusal
from pvc_cluster_common._meta import VMMeta
from pvc_cluster_common._records import (
    RESULT_ABORTED,
    RESULT_DONE,
    STEP_PREPARED,
    STEP_REQUESTED,
    STEP_TRANSFERRED,
    STEP_TRANSFERRING,
    MigrationRecord,
)
from pvc_cluster_common._requests import RequestError, finish_values, placement_plan, submit_request
from pvc_cluster_common._store import ConflictError, StoreError, text_of

from .context import DaemonContext, Service
from .faults import crash_point, crash_while_migrating, pause_point
from .hypervisor import (
    ACTIVE_STATES,
    RUNNING_STATES,
    HypervisorError,
    HypervisorTimeout,
    HypervisorUnavailable,
    MigrationSetup,
    PeerUnreachable,
)
from .log import get_logger
from .watched import WatchedKeys

log = get_logger(__name__)

ACTIVE, RUNNING = ACTIVE_STATES, RUNNING_STATES
UNKNOWN = "unknown"
# A target's daemon states in which the source does not transfer (see _transfer): HA's (ha.py).
TARGET_LOST_STATES = ("dead", "fencing", "fenced", "fence-failed")
ASK = object()  # "libvirt's state of the VM here is not known yet: ask"
# "this node's libvirt cannot be asked now" (no connection: the driver is reconnecting)
UNAVAILABLE = "unavailable"
# the meta a migration reads at its transfer step
MIGRATION_META = (S.META_MIGRATION_METHOD, S.META_MIGRATION_MAX_DOWNTIME_MS, S.META_MIGRATION_AUTO_CONVERGE)
RECORD_LEFT_ALONE = (
    "no daemon acts on the record and the VM is left as it is until an operator clears it "
    "(pvc.cluster.vm_migrate with state=cleared)"
)


class Deadlines:
    """Per-VM step deadlines: when one passes with the record unchanged, the VM is queued again."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._items: dict[str, tuple[float, str]] = {}  # uuid -> (deadline, record marker)
        # uuid -> marker whose deadline passed and was reported by run(). run() must stop
        # re-waking a due VM, but the handler it woke runs later in the VM's own thread and asks
        # expired() then: the expiry has to outlive run()'s bookkeeping, or the timeout is lost
        # for good (arm() with the same marker does nothing) and the step waits forever.
        self._fired: dict[str, str] = {}
        self.wake: Callable[[str], None] | None = None  # set by the daemon: reconciler.enqueue

    def arm(self, uuid: str, marker: str, timeout_s: float) -> None:
        with self._lock:
            current = self._items.get(uuid)
            if current and current[1] == marker:
                return  # already armed for this step: a repeated event must not extend it
            self._items[uuid] = (time.monotonic() + timeout_s, marker)
            self._fired.pop(uuid, None)
            self._lock.notify_all()

    def expired(self, uuid: str, marker: str) -> bool:
        with self._lock:
            current = self._items.get(uuid)
            if not current or current[1] != marker:
                return False
            return current[0] <= time.monotonic() or self._fired.get(uuid) == marker

    def clear(self, uuid: str) -> None:
        with self._lock:
            self._items.pop(uuid, None)
            self._fired.pop(uuid, None)

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            with self._lock:
                now = time.monotonic()
                due = [uuid for uuid, (deadline, _) in self._items.items() if deadline <= now]
                upcoming = [deadline for deadline, _ in self._items.values() if deadline > now]
                if not due:
                    # woken by arm() or stop; otherwise by the nearest deadline
                    self._lock.wait(min([d - now for d in upcoming] + [1.0]))
            for uuid in due:
                if self.wake:
                    self.wake(uuid)
            if due:
                # each due VM is handled once; a handler that still waits re-arms with a new marker
                with self._lock:
                    for uuid in due:
                        if uuid in self._items and self._items[uuid][0] <= time.monotonic():
                            marker = self._items[uuid][1]
                            self._items[uuid] = (float("inf"), marker)
                            self._fired[uuid] = marker  # expired() still says so (see __init__)


def meta_problems(meta, keys) -> list[str]:
    """For each meta key of ``keys``, what VMMeta.from_store said of its stored value ("" when
    it was valid)."""
    return [next((warning for warning in meta.warnings if warning.startswith(f"meta {key}:")), "") for key in keys]


class StaleCheck(Exception):
    """A key a step depends on changed since it was read; nothing was written."""


@dataclass(frozen=True)
class ReadAhead:
    """What the source reads and sets up at `requested` while the target prepares (see
    MigrationAgent.as_source): read_transfer_inputs' answers and setup_ahead's MigrationSetup."""

    migration_id: str
    inputs: dict[str, Any]
    setup: MigrationSetup | None


@dataclass
class Migration:
    """One migration of one VM as this node handles it, from a call of MigrationAgent.handle to
    the step it writes: the VM, its record and that record's version (both move on with every
    step this side writes, see MigrationAgent.advance), whether the step's deadline had passed
    when the handler began, libvirt's state of the VM here as the caller knew it (``local``: ASK
    when not known), and for a transfer what it decides on (``inputs``) and the live migration's
    set-up made ahead (``setup``)."""

    uuid: str
    record: MigrationRecord
    version: int
    timed_out: bool = False
    local: Any = ASK
    inputs: dict[str, Any] | None = None
    setup: MigrationSetup | None = None

    @property
    def marker(self) -> str:
        """The record's version as a step deadline names it (Deadlines.arm)."""
        return f"{self.record.id}:{self.version}"

    def moved_to(self, record: MigrationRecord, version: int) -> None:
        """This side wrote ``record`` as ``version``: the handler goes on from there."""
        self.record, self.version = record, version


class MigrationAgent(Service):
    def __init__(self, ctx: DaemonContext) -> None:
        super().__init__(ctx)
        node, store = ctx.node, ctx.store
        self.deadlines = Deadlines()
        # uuid -> what the source read and set up at `requested` (see as_source)
        self._prefetched: dict[str, ReadAhead] = {}
        # Whether this node may receive a VM: read at every prepare step from watches, and
        # checked by version in the prepared write itself (see prepare).
        self.readiness = WatchedKeys(
            store,
            (
                self.schema.node_key(node, S.NODE_DAEMON_STATE),
                self.schema.node_key(node, S.NODE_DOMAIN_STATE),
                # its peers' verdicts change this container's version (and note the verdict)
                self.schema.node_claims(node),
            ),
        )

    def start(self) -> None:
        self.readiness.start()

    # ---- reading ------------------------------------------------------------------------------

    def read_record(self, uuid: str):
        """(the VM's migration record, its version), or (None, -1) when there is none or it is
        not valid (reported once per version: no daemon acts on it)."""
        path = self.schema.domain_migration(uuid)
        return self._decoded_record(uuid, path, self.store.find(path))

    def _decoded_record(self, uuid: str, path: str, found):
        if not found:
            return None, -1
        try:
            record = R.migration_record(found.value, path, uuid)
        except Invalid as exc:
            self.invalid.report(exc, "migration", found.version, RECORD_LEFT_ALONE)
            return None, -1
        return record, found.version

    def records_for_node(self) -> list[str]:
        """VMs whose in-flight migration names this node (read at start-up and every resync, in
        one round of parallel reads)."""
        uuids = self.store.list_children(self.schema.domains(), missing_ok=True)
        found = self.store.get_many([self.schema.domain_migration(uuid) for uuid in uuids])
        result = []
        for uuid in uuids:
            path = self.schema.domain_migration(uuid)
            record, _ = self._decoded_record(uuid, path, found[path])
            if record and self.node in (record.source, record.target):
                result.append(uuid)
        return result

    def local_state(self, uuid: str) -> str | None:
        status = self.hypervisor.status(uuid)
        return status.state if status else None

    def peer_state(self, peer: str, uuid: str) -> str | None:
        """libvirt's view of ``uuid`` on ``peer``: a state name, None (absent) or UNKNOWN."""
        if self.peer_fenced(peer):
            # Its power is confirmed off (node_daemon/ha.py): nothing runs there, and its libvirt
            # cannot be asked. (A fenced node whose daemon starts again writes `init` first.)
            return None
        path = self.schema.node_key(peer, S.NODE_ADDRESS)
        uris = self.peer_uris(peer, path, self.store.find(path))
        if uris is None:
            return UNKNOWN  # an address that is not valid: the peer cannot be asked
        uri = uris[0]
        try:
            status = self.hypervisor.peer_status(
                uri, uuid, call_timeout_s=min(10.0, self.config.libvirt_call_timeout_s)
            )
            return status.state if status else None
        except PeerUnreachable:
            pass  # its libvirt lives inside the peer's own process (the test driver): see below
        except HypervisorError as exc:
            log.warning("cannot ask libvirt on %s (%s) about %s: %s", peer, uri, uuid, exc)
            return UNKNOWN
        # A libvirt that cannot be reached from this process (the driver says so of libvirt's
        # test driver, which lives inside its daemon): use what the peer's last keepalive
        # published, if the peer is alive.
        if not self.store.exists(self.schema.node_key(peer, S.NODE_ALIVE)):
            return UNKNOWN
        path = self.schema.node_key(peer, S.NODE_RUNNINGDOMAINS)
        found = self.store.find(path)
        try:
            running = R.running_domains(found.value, path) if found else ()
        except Invalid as exc:
            self.invalid.report(exc, "runningdomains", found.version, f"where the VMs of {peer} run is not known")
            return UNKNOWN
        return "running" if uuid in running else None

    def state_on(self, node: str, uuid: str) -> str | None:
        if node != self.node:
            return self.peer_state(node, uuid)
        try:
            return self.local_state(uuid)
        except HypervisorError as exc:
            log.warning("cannot ask this node's libvirt about %s: %s", uuid, exc)
            return UNKNOWN

    def peer_libvirt(self, peer: str) -> str:
        """The health of ``peer``'s connection to its libvirtd as it publishes it (LIBVIRT_HEALTH;
        ok when it publishes none, "invalid" for a value that is not valid)."""
        path = self.schema.node_key(peer, S.NODE_LIBVIRT)
        found = self.store.find(path)
        if not found:
            return S.LIBVIRT_OK
        try:
            return R.libvirt_health(found.value, path)
        except Invalid as exc:
            self.invalid.report(exc, "node_key", found.version, f"node {peer} is not taken for a healthy target")
            return "invalid"

    def peer_fenced(self, peer: str) -> bool:
        """Whether ``peer``'s power is confirmed off by its fence (node_daemon/ha.py)."""
        state = read_node_state(self.store, peer)
        return state is not None and state.daemon_state == "fenced"

    def peer_alive(self, peer: str) -> bool:
        return self.store.exists(self.schema.node_key(peer, S.NODE_ALIVE))

    # ---- writing ------------------------------------------------------------------------------

    def advance(self, m: Migration, step: str, checks: dict | None = None, quiet: bool = False, **fields: Any) -> bool:
        """Write the next step (version-checked); on success ``m`` holds the new record and
        version. False when the record changed underneath (the caller stops; the watch brings
        the new record) or the write failed. ``checks``: other keys' versions the step depends
        on, checked in the same transaction; raises StaleCheck when one of them changed (nothing
        is written). ``quiet``: a changed record is expected (logged at debug level)."""
        uuid, record, version = m.uuid, m.record, m.version
        new = record.at_step(step, time.time(), **fields)
        path = self.schema.domain_migration(uuid)
        try:
            self.store.commit({path: new.to_json()}, expect_versions={**(checks or {}), path: version})
        except ConflictError as exc:
            if checks and exc.path in checks:
                raise StaleCheck(exc.path) from None
            (log.debug if quiet else log.warning)(
                "migration %s of %s: record changed before step %s could be written; re-reading", record.id, uuid, step
            )
            return False
        except StoreError as exc:
            log.warning("migration %s of %s: step %s not written: %s", record.id, uuid, step, exc)
            return False
        self.domains.wrote_migration(uuid, (record.id, version), new, version + 1)
        m.moved_to(new, version + 1)
        log.info("migration %s of %s: %s (%s -> %s)", record.id, uuid, step, record.source, record.target)
        # This side now waits for its peer's next step. The watch's answer to this write changes
        # nothing in the table (recorded just above), so it brings no pass, and only a pass arms
        # the step's deadline: queue one. Without it, a peer that dies right now would leave this
        # side waiting with no deadline at all (a source at `transferred` did, under load).
        if self.deadlines.wake:
            self.deadlines.wake(uuid)
        return True

    def finish(self, m: Migration, result: str, reason: str | None = None, node: str | None = None) -> bool:
        """End the migration as ``result`` (version-checked): the record goes to the VM's history,
        the VM to ``node`` (the source by default on an abort). False when the record changed."""
        uuid, record, version = m.uuid, m.record, m.version
        values, delete, final = finish_values(self.schema, uuid, record, result, reason, node)
        if result == RESULT_DONE:
            values[self.schema.domain_key(uuid, S.DOMAIN_FAILEDREASON)] = ""
        history = [path for path in values if path.startswith(self.schema.domain_history(uuid) + "/")]
        try:
            self.store.commit(
                values, expect_versions={self.schema.domain_migration(uuid): version}, delete=delete, create=history
            )
        except ConflictError:
            log.warning("migration %s of %s: record changed before it could be finished; re-reading", record.id, uuid)
            return False
        except StoreError as exc:  # perhaps written all the same: the watch, or the next pass, says
            log.warning("migration %s of %s: not finished as %s: %s", record.id, uuid, result, exc)
            return False
        self.domains.wrote_migration(uuid, (record.id, version), None, -1)
        self.deadlines.clear(uuid)
        self._prefetched.pop(uuid, None)
        self._prune_history(uuid)
        if result == RESULT_DONE:
            log.ok(
                "migration %s of %s done: %s -> %s, method %s, %.2f s",
                record.id,
                uuid,
                record.source,
                record.target,
                final.get("method_used"),
                final.get("duration_s", 0),
            )
        else:
            log.warning(
                "migration %s of %s aborted: %s; the VM stays on %s", record.id, uuid, reason, node or record.source
            )
        if self.metrics:
            self.metrics.migration(final)
        return True

    def abort(self, m: Migration, reason: str, node: str | None = None) -> bool:
        return self.finish(m, RESULT_ABORTED, reason, node)

    def _prune_history(self, uuid: str) -> None:
        path = self.schema.domain_history(uuid)
        try:
            entries = self.store.list_children(path, missing_ok=True)
            if len(entries) > S.HISTORY_KEEP:
                self.store.delete([f"{path}/{entry}" for entry in entries[: -S.HISTORY_KEEP]], recursive=False)
        except StoreError as exc:  # pruned at the VM's next finished migration
            log.warning("VM %s: history not pruned: %s", uuid, exc)

    # ---- dispatch -----------------------------------------------------------------------------

    def handle(self, uuid: str, known=None, local_state=ASK) -> None:
        """Act on the VM's migration record. ``known`` is (record, version) as the caller has it
        (the reconciler's watch-fed table): every step written from it is version-checked, so a
        record that changed meanwhile only makes the write fail. ``local_state``: libvirt's state
        of the VM here, when the caller has just asked."""
        record, version = known if known else self.read_record(uuid)
        if record is None:
            self.deadlines.clear(uuid)
            self._prefetched.pop(uuid, None)  # ended elsewhere (e.g. the target aborted it)
            return
        m = Migration(uuid, record, version, local=local_state)
        m.timed_out = self.deadlines.expired(uuid, m.marker)
        if record.source == self.node:
            self.as_source(m)
        elif record.target == self.node:
            self.as_target(m)

    def _local(self, m: Migration) -> str | None:
        """libvirt's state of the VM here: ``m.local`` when the caller knows it, else asked now;
        UNAVAILABLE when this node's libvirt cannot be asked."""
        if m.local is not ASK:
            return m.local
        try:
            return self.local_state(m.uuid)
        except HypervisorUnavailable:
            return UNAVAILABLE

    # ---- source side --------------------------------------------------------------------------

    def as_source(self, m: Migration) -> None:
        uuid, record = m.uuid, m.record
        step = record.step
        if step == STEP_REQUESTED:
            refused = self.xml_refusal(uuid)
            if refused:
                self.abort(m, f"source {self.node} does not migrate the VM: {refused}")
            elif m.timed_out:
                self.abort(m, f"target {record.target} did not prepare within {self.config.step_timeout_s:.0f} s")
            else:
                self.deadlines.arm(uuid, m.marker, self.config.step_timeout_s)
                # Read what the transfer decides on now, while the target prepares: the transfer
                # then starts with no read on the way, and its first write checks these keys'
                # versions (see transfer). Likewise libvirt's part of a live migration's start.
                ahead = self._prefetched.get(uuid)
                if ahead is None or ahead.migration_id != record.id:  # once per migration
                    try:
                        m.inputs = self.read_transfer_inputs(uuid, record)
                    except StoreError as exc:
                        log.debug("migration %s of %s: transfer inputs not read ahead: %s", record.id, uuid, exc)
                    else:
                        m.setup = self.setup_ahead(m)
                        self._prefetched[uuid] = ReadAhead(record.id, m.inputs, m.setup)
        elif step == STEP_PREPARED:
            self.transfer(m)
        elif step == STEP_TRANSFERRING:
            # Only reached after a restart or a lost session: the transfer of this record was
            # under way in a process that no longer runs it. Resolve from libvirt's view.
            self.resolve(m)
        elif step == STEP_TRANSFERRED:
            if m.timed_out:
                self.resolve(m)
            else:
                self.deadlines.arm(uuid, m.marker, self.config.step_timeout_s)

    def read_transfer_inputs(self, uuid: str, record: MigrationRecord) -> dict:
        """What a transfer decides on and needs, in one round: the VM's node (has the target
        changed?), its XML (does this node's policy accept it?), the meta of a migration (has the method changed since the request?), and,
        unless the request named a shutdown migration, the target's published address (which
        live_migrate builds the URIs from, and reads itself if the method has changed since),
        and the target's daemon state (is it being fenced?)."""
        uris = self._target_uri_paths(record) if record.force_live or record.method != "shutdown" else []
        return self.store.get_many(
            [
                self.schema.domain_key(uuid, S.DOMAIN_NODE),
                self.schema.domain_key(uuid, S.DOMAIN_XML),
                self.schema.node_key(record.target, S.NODE_DAEMON_STATE),
                self.schema.node_claims(record.target),  # a verdict about it changes its version
            ]
            + meta_paths(self.schema, uuid, MIGRATION_META)
            + uris
        )

    def setup_ahead(self, m: Migration) -> MigrationSetup | None:
        """The libvirt calls a live migration makes before its transfer (the domain's lookup,
        whether it is persistent, its maximum downtime as the meta read ahead has it), made at
        `requested` while the target prepares; None when the migration will not start live or
        the VM is not running here. Nothing in it commits the migration: the downtime applied is
        the VM's own, and the transfer's migrate() makes the calls again if the setup is stale
        (another downtime by then, or a lifecycle event of the VM since). Made from ``m.inputs``."""
        uuid, record = m.uuid, m.record
        meta = meta_from(self.schema, uuid, m.inputs or {}, MIGRATION_META)
        if not record.force_live and meta.migration_method == "shutdown":
            return None
        if m.local is not ASK and m.local not in RUNNING:
            return None
        try:
            return self.hypervisor.prepare_migration(uuid, meta.migration_max_downtime_ms)
        except HypervisorError as exc:  # the transfer's own attempt reports it, if it still fails
            log.debug("migration %s of %s: libvirt not set up ahead: %s", record.id, uuid, exc)
            return None

    def _target_uri_paths(self, record: MigrationRecord) -> list[str]:
        """The keys a live migration's URIs are built from: the target's published address."""
        return [self.schema.node_key(record.target, S.NODE_ADDRESS)]

    def peer_uris(self, peer: str, path: str, found) -> tuple[str, str] | None:
        """(libvirt URI, migration URI) of node ``peer``, built from this daemon's own
        templates and the peer's published address (``found``: the answer of a read of
        ``path``, its ``address`` key), never taken from ZooKeeper as given. A peer that has
        published no address (an older daemon) is reached by its node name. None when the
        address is not valid (reported once per version)."""
        address = peer
        if found is not None and found.value:
            try:
                address = R.node_address(found.value, path)
            except Invalid as exc:
                self.invalid.report(exc, "address", found.version, f"node {peer} cannot be reached")
                return None
            self.invalid.valid(path)
        return self.config.peer_libvirt_uri(peer, address), self.config.peer_transport_uri(peer, address)

    def transfer(self, m: Migration) -> None:
        uuid, record = m.uuid, m.record
        pause_point("source:before-transfer")
        # The caller's view of the VM here came from a connection that may have been lost since
        # (libvirtd died between that pass and now): with no connection, it is not one to
        # transfer on.
        m.local = UNAVAILABLE if self.hypervisor.health != S.LIBVIRT_OK else self._local(m)
        if m.local == UNAVAILABLE:
            # Nothing has moved yet (the transfer starts only after `transferring` is written),
            # and a VM whose state here is not known is never handed on: abort, the VM stays.
            self.abort(
                m, f"source {self.node} cannot reach its libvirtd: {self.hypervisor.health_reason or 'not connected'}"
            )
            return
        ahead = self._prefetched.pop(uuid, None)
        if ahead is not None and ahead.migration_id == record.id:
            m.inputs, m.setup = ahead.inputs, ahead.setup
        if m.inputs is not None and self.checkable(m):
            try:
                self._transfer(m, fresh=False)
                return
            except StaleCheck as exc:  # raised before anything was written: m is as it was
                log.info("migration %s of %s: %s changed since it was read; reading again", record.id, uuid, exc)
        try:
            m.inputs = self.read_transfer_inputs(uuid, record)
            self._transfer(m, fresh=True)
        except StaleCheck as exc:
            # changed again within a round trip: the next change of the record, or the step
            # deadline, brings this back
            log.warning("migration %s of %s: %s keeps changing; transfer not started", record.id, uuid, exc)

    def checkable(self, m: Migration) -> bool:
        """Whether the keys that decide the transfer's course existed in ``m.inputs``: the VM's
        node and (unless the request forces a live migration) its migration method. A key's
        absence cannot be checked in a transaction (a method set since the read ahead would go
        unnoticed): then they are read again right before the write. The other inputs are
        checked when they exist, and otherwise used as read at `requested`: an unset maximum
        downtime means the default one, and a target address that is wrong fails the migration."""
        uuid, inputs = m.uuid, m.inputs or {}
        if inputs[self.schema.domain_key(uuid, S.DOMAIN_NODE)] is None:
            return False
        return bool(m.record.force_live) or inputs[self.schema.domain_meta(uuid, S.META_MIGRATION_METHOD)] is not None

    def _transfer(self, m: Migration, fresh: bool) -> None:
        """``m.inputs``: read_transfer_inputs' answers; the first write checks their versions, so
        a change since they were read raises StaleCheck before anything happened. A
        reassignment seen in them is confirmed by a fresh read (``fresh``) before it aborts.
        ``m.setup``: setup_ahead's answer, for a live attempt. ``m.local``: known here."""
        uuid, record, inputs = m.uuid, m.record, m.inputs or {}
        target = record.target
        node_path = self.schema.domain_key(uuid, S.DOMAIN_NODE)
        node_now = text_of(inputs[node_path])
        if node_now != target:
            if not fresh:
                raise StaleCheck(node_path)
            self.abort(m, f"target changed: the VM was reassigned to {node_now} during the migration to {target}")
            return
        # A target marked dead since it prepared is about to be fenced, and a fenced one may be
        # powered on again with its libvirtd answering before its daemon registers: a VM moved
        # there would be lost, or started a second time by its recovery or by this side's ground
        # truth, which counts a fenced node as running nothing (models/ha.pml, rule D6). The
        # transferring write checks this state's version with the others.
        state_path = self.schema.node_key(target, S.NODE_DAEMON_STATE)
        found_state = inputs.get(state_path)
        target_state = found_state[0] if found_state else ""
        # its own state (an operator's fenced, an older daemon's verdicts), or a peer's verdict
        # about the version it has now, as its claims container notes it (conservative: a
        # verdict, or a note someone forged, stops the transfer; the version is checked)
        note = inputs.get(self.schema.node_claims(target))
        judged = R.noted_verdict(note[0] if note else None, found_state[1] if found_state else -1)
        target_state = judged or target_state
        if target_state in TARGET_LOST_STATES:
            if not fresh:
                raise StaleCheck(state_path)
            self.abort(m, f"target {target} is {target_state} since it prepared")
            return
        xml_path = self.schema.domain_key(uuid, S.DOMAIN_XML)
        refused = self.refusal_of(uuid, text_of(inputs[xml_path]) or "")
        if refused:
            if not fresh:
                raise StaleCheck(xml_path)  # confirmed from a fresh read before anything is refused
            self.abort(m, f"source {self.node} does not migrate the VM: its domain XML is refused: {refused}")
            return
        meta = meta_from(self.schema, uuid, inputs, MIGRATION_META)
        for key, warning in zip(MIGRATION_META, meta_problems(meta, MIGRATION_META)):
            if warning:  # e.g. a maximum downtime beyond QEMU's limit: never handed to libvirt
                path = self.schema.domain_meta(uuid, key)
                self.invalid.report(
                    Invalid(path, warning, inputs[path].value), "meta", inputs[path].version, "the default applies"
                )
        checks = {path: found.version for path, found in inputs.items() if found is not None}
        method = "live" if record.force_live else meta.migration_method
        if self._local(m) not in ACTIVE:
            # Nothing runs here (it crashed, or was never started): the target simply starts it.
            if self.advance(m, STEP_TRANSFERRING, checks=checks, method_used="offline", method=method):
                self.advance(m, STEP_TRANSFERRED)
            return
        first = "shutdown" if method == "shutdown" else "live"
        if not self.advance(m, STEP_TRANSFERRING, checks=checks, method_used=first, method=method):
            return
        record = m.record
        crash_point("source:transferring")
        if first == "live":
            error = self.live_migrate(m, meta)
            if isinstance(error, HypervisorUnavailable):
                # This side's libvirtd went away under the transfer: libvirtd cancels (or has
                # finished) the job, and where the VM runs is for both libvirtds to say. No
                # fallback: a shutdown needs libvirt too. Ground truth decides, asked again once
                # reconnected (the reconnect brings a pass; the step deadline bounds the wait).
                log.warning(
                    "migration %s of %s: libvirt connection lost during the transfer (%s); resolving from "
                    "libvirt once reconnected",
                    record.id,
                    uuid,
                    error,
                )
                self.deadlines.arm(uuid, m.marker, self.config.step_timeout_s)
                return
            if error is None:
                crash_point("source:live-running")  # only if the watcher missed a very short job
                crash_point("source:live-done")
                # The target usually ends the migration first, on libvirt's resume event: then
                # there is no record left to advance, and that is the normal course.
                self.advance(m, STEP_TRANSFERRED, quiet=True)
                return
            if method == "live":
                self.after_failed_live(m, f"live migration failed and the VM's method is live: {error}")
                return
            target_libvirt = self.peer_libvirt(record.target)
            if target_libvirt != S.LIBVIRT_OK or error.connection_failed:
                # The target's libvirtd died or restarts under the transfer (libvirt's own
                # connection to it failed, or the target's daemon says it has lost it): a
                # shutdown migration would stop the VM for a target that may not start it.
                # libvirt ended the job, so the VM still runs here: abort, and stop nothing.
                why = (
                    f"target {record.target}'s libvirt is {target_libvirt}"
                    if target_libvirt != S.LIBVIRT_OK
                    else "libvirt's connection to the target's libvirtd failed"
                )
                self.after_failed_live(m, f"live migration failed ({error}) and {why}: no shutdown migration is tried")
                return
            log.warning(
                "migration %s of %s: live migration failed (%s); falling back to a shutdown migration",
                record.id,
                uuid,
                error,
            )
            if not self.advance(m, STEP_TRANSFERRING, method_used="shutdown", fallback_reason=str(error)):
                return
        pause_point("source:before-shutdown")
        if not self.shutdown_here(uuid):
            # Not known to be off (libvirt failed, or went away): a VM that may still run here is
            # never handed to the target. The record stays at `transferring`; ground truth
            # decides (the pass this step's write queued, a reconnect, or the deadline).
            self.deadlines.arm(uuid, m.marker, self.config.step_timeout_s)
            return
        crash_point("source:shutdown-done")
        self.advance(m, STEP_TRANSFERRED)

    def live_migrate(self, m: Migration, meta: VMMeta) -> HypervisorError | None:
        """Run the live migration; None on success, else why not (a HypervisorError).
        HypervisorUnavailable: this node's own connection was lost under it. ``m.inputs``: as
        read_transfer_inputs answered (the target's URIs); ``m.setup``: as setup_ahead made it
        (used only if it still holds, see Hypervisor.migrate)."""
        uuid, record, inputs = m.uuid, m.record, m.inputs or {}
        (path,) = self._target_uri_paths(record)
        if path not in inputs:
            inputs = self.store.get_many([path])
        uris = self.peer_uris(record.target, path, inputs[path])
        if uris is None:
            return HypervisorError(
                "migrate", uuid, None, f"target {record.target} has published an address that is not valid"
            )
        dest_uri, transport_uri = uris
        timeout_s = self.config.live_timeout_s(record.memory_mib)
        crash_while_migrating(self.hypervisor, uuid)
        try:
            self.hypervisor.migrate(
                uuid,
                dest_uri,
                migration_uri=transport_uri or None,
                live=True,
                peer_to_peer=True,
                max_downtime_ms=meta.migration_max_downtime_ms,
                auto_converge=meta.migration_auto_converge,
                tls=self.config.migration_tls,
                timeout_s=timeout_s,
                setup=m.setup,
            )
        except HypervisorError as exc:
            return exc
        return None

    def after_failed_live(self, m: Migration, reason: str) -> None:
        m.local = ASK  # libvirt's state here before the migration no longer holds: ask
        if self._local(m) in RUNNING:
            self.abort(m, reason)
        else:
            # libvirt failed late (after switch-over?): let ground truth decide where it runs
            self.resolve(m)

    def shutdown_here(self, uuid: str) -> bool:
        """Shut the VM down for a shutdown migration (forced after the timeout). True once libvirt
        has said it is off; False when that is not known (the forced stop failed, or libvirt
        could not be asked)."""
        try:
            clean = self.hypervisor.shutdown_or_destroy(uuid, self.config.shutdown_timeout_s)
        except HypervisorError as exc:
            log.error("VM %s: forced stop failed: %s", uuid, exc)
            return False
        log.ok("VM %s: %s for migration", uuid, "shut down" if clean else "stopped (forced)")
        return True

    # ---- target side --------------------------------------------------------------------------

    def as_target(self, m: Migration) -> None:
        uuid, record = m.uuid, m.record
        step = record.step
        if step == STEP_REQUESTED:
            self.prepare(m)
        elif step in (STEP_PREPARED, STEP_TRANSFERRING):
            if step == STEP_TRANSFERRING and record.method_used == "live" and self._local(m) in RUNNING:
                # libvirt resumed the incoming copy: the switch-over is done, and the source's
                # copy can never run again (libvirt stops it in the same job). The reconciler
                # wakes on that lifecycle event, so the migration ends here without waiting for
                # the source's `transferred` (which then finds no record, and is not needed).
                pause_point("target:before-done")
                crash_point("target:before-done")
                self.finish(m, RESULT_DONE)
                return
            if m.timed_out and step == STEP_PREPARED:
                # The source has not started the transfer (it starts only after writing
                # `transferring`), whatever libvirt says: the VM never left it. The abort is
                # version-checked, so a `transferring` written meanwhile wins and this fails.
                self.abort(
                    m,
                    f"source {record.source} did not start the transfer within {self.config.step_timeout_s:.0f} s",
                    node=record.source,
                )
            elif m.timed_out:
                self.resolve(m)
            else:
                wait = self.config.step_timeout_s
                if step == STEP_TRANSFERRING:
                    wait += self.config.live_timeout_s(record.memory_mib) + self.config.shutdown_timeout_s
                self.deadlines.arm(uuid, m.marker, wait)
        elif step == STEP_TRANSFERRED:
            self.complete(m)

    def xml_refusal(self, uuid: str) -> str:
        """Why this node refuses the VM's XML in ZooKeeper (not a valid domain, or refused by its
        domain XML policy: the reconciler's table says, from its watch), or ""."""
        known = self.domains.get(uuid)
        if known is not None and S.DOMAIN_XML in known.loaded:
            return "" if known.xml_ok else f"its domain XML is refused: {known.xml_error}"
        xml = self.store.find_text(self.schema.domain_key(uuid, S.DOMAIN_XML))
        why = refusal(xml or "", self.policy, uuid)
        return f"its domain XML is refused: {why}" if why else ""

    def refusal_of(self, uuid: str, xml: str) -> str:
        """Why this node refuses ``xml`` as the VM's domain XML, or "". The reconciler has checked
        every version of the XML its watch delivered: when ``xml`` is that text, its verdict
        stands (no parse on a migration's critical path)."""
        known = self.domains.get(uuid)
        if known is not None and S.DOMAIN_XML in known.present and known.xml == xml:
            return "" if known.xml_ok else known.xml_error
        return refusal(xml, self.policy, uuid)

    @property
    def policy(self) -> DomainPolicy:
        return getattr(self.config, "domain_policy", None) or DomainPolicy()

    def prepare(self, m: Migration) -> None:
        uuid, record = m.uuid, m.record
        pause_point("target:before-prepare")
        if self.hypervisor.health != S.LIBVIRT_OK or self._local(m) == UNAVAILABLE:
            self.abort(
                m,
                f"target {self.node} cannot reach its libvirtd ({self.hypervisor.health}: "
                f"{self.hypervisor.health_reason or 'not connected'})",
            )
            return
        refused = self.xml_refusal(uuid)
        if refused:
            self.abort(m, f"target {self.node} does not take the VM: {refused}")
            return
        paths = self.readiness.paths  # this node's daemon state and domain state
        # This node's readiness as its watches last reported it, with no read on the way. The
        # prepared write checks both versions, so a copy one change behind makes it fail (then,
        # and before any refusal, the states are read fresh).
        for fresh in (False, True):
            found = self.store.get_many(paths) if fresh else self.readiness.snapshot()
            if found is None:
                continue  # the watches have not answered yet
            state_found, domain_found, note = (found.get(p) for p in paths)
            daemon_state = state_found[0] if state_found else ""
            domain_state = domain_found[0] if domain_found else ""
            # a peer's verdict about this node's current state (its note): not ready either
            judged = R.noted_verdict(note[0] if note else None, state_found[1] if state_found else -1)
            daemon_state = judged or daemon_state
            if daemon_state != "run" or domain_state not in ("ready", "unflush"):
                if not fresh:
                    continue
                self.abort(m, f"target {self.node} is not ready (daemon {daemon_state}, domain state {domain_state})")
                return
            if self._local(m) in ACTIVE:
                self.resolve(m)
                return
            try:
                checks = {p: answer[1] for p in paths if (answer := found.get(p)) is not None}
                if self.advance(m, STEP_PREPARED, checks=checks):
                    crash_point("target:prepared")
                return
            except StaleCheck as exc:
                # After a fresh read too (it changed again within a round trip): nothing written,
                # and the source's step deadline ends the migration if no event brings it back.
                log.info("migration %s of %s: %s changed while preparing; reading it again", record.id, uuid, exc)

    def complete(self, m: Migration) -> None:
        uuid = m.uuid
        m.local = local = self._local(m)
        if local == UNAVAILABLE:
            # Whether the VM runs here is not known: start nothing. The reconnect brings a pass;
            # meanwhile the source's own deadline may give the VM back to itself (no claim here).
            if m.timed_out:
                self.resolve(m)
            else:
                self.deadlines.arm(uuid, m.marker, self.config.step_timeout_s)
            return
        if local in RUNNING:
            pause_point("target:before-done")
            crash_point("target:before-done")
            self.finish(m, RESULT_DONE)
            return
        if local == "paused":
            # libvirt is still switching the incoming copy over; its resume brings a lifecycle
            # change the periodic pass sees. After a step timeout, ground truth decides.
            if m.timed_out:
                self.resolve(m)
            else:
                self.deadlines.arm(uuid, m.marker, self.config.step_timeout_s)
            return
        if m.record.method_used == "live":
            # live reported success but nothing runs here: ask both sides
            self.resolve(m)
            return
        self.start_here(m)

    def start_here(self, m: Migration) -> None:
        uuid, record, version = m.uuid, m.record, m.version
        # Claim the start with a version-checked write before creating anything: if the source
        # ended the migration meanwhile (an abort gives the VM back to it, and its reconciler
        # starts it there), the claim fails and nothing starts here; once the claim is written, a
        # concurrent abort based on the older record fails instead (I1).
        pause_point("target:before-claim")
        path = self.schema.domain_migration(uuid)
        claim = replace(record, starting_on=self.node)
        try:
            self.store.commit({path: claim.to_json()}, expect_versions={path: version})
        except ConflictError:
            log.warning(
                "migration %s of %s: record changed before the start here could be claimed; re-reading", record.id, uuid
            )
            return
        except StoreError as exc:  # perhaps written all the same: the next pass reads the record again
            log.warning("migration %s of %s: the start here could not be claimed: %s", record.id, uuid, exc)
            return
        self.domains.wrote_migration(uuid, (record.id, version), claim, version + 1)
        m.moved_to(claim, version + 1)
        known = self.domains.get(uuid)
        xml = known.xml if known is not None and S.DOMAIN_XML in known.present else None
        xml = xml or self.store.find_text(self.schema.domain_key(uuid, S.DOMAIN_XML))
        pause_point("target:before-start")
        try:
            if not xml:
                raise HypervisorError("create", uuid, None, "no domain XML in ZooKeeper")
            # (the name was checked when the VM was first started: no read on the way here)
            refused = self.refusal_of(uuid, xml)
            if refused:
                raise HypervisorError("create", uuid, None, f"its domain XML is refused: {refused}")
            self.hypervisor.create(xml)
        except (HypervisorUnavailable, HypervisorTimeout) as exc:
            # libvirt went away or hung in the create: the VM may or may not run here now. Keep
            # the claim (the source does not take back a VM this node has claimed while it is
            # alive); the pass after the reconnect, or the deadline, finds out from libvirt.
            log.warning(
                "migration %s of %s: start on target %s not confirmed (%s); asking libvirt again once it answers",
                record.id,
                uuid,
                self.node,
                exc,
            )
            self.deadlines.arm(uuid, m.marker, self.config.step_timeout_s)
            return
        except HypervisorError as exc:
            # The VM runs nowhere now: give it back to the source, whose reconciler starts it.
            self.abort(m, f"start on target {self.node} failed: {exc}", node=record.source)
            return
        crash_point("target:started")
        self.finish(m, RESULT_DONE)

    # ---- ground truth -------------------------------------------------------------------------

    def resolve(self, m: Migration) -> None:
        """Finish or roll back from libvirt's view on both sides (docs/migration-protocol.md)."""
        uuid, record, version, marker = m.uuid, m.record, m.version, m.marker
        _, current = self.read_record(uuid)
        if current != version:
            return  # the record moved on (or ended) since it was handed to us: its watch brings it
        source, target = record.source, record.target
        on_source = self.state_on(source, uuid)
        on_target = self.state_on(target, uuid)
        log.info(
            "migration %s of %s: resolving from libvirt: source %s is %s, target %s is %s",
            record.id,
            uuid,
            source,
            on_source,
            target,
            on_target,
        )
        if UNKNOWN in (on_source, on_target):
            # A node we cannot ask may still run the VM: start nothing, ask again later (I1 first).
            self.deadlines.arm(uuid, f"{marker}:retry:{time.monotonic():.0f}", self.config.step_timeout_s)
            return
        src_active, tgt_active = on_source in ACTIVE, on_target in ACTIVE
        if src_active and on_target == "paused":
            self.deadlines.arm(uuid, f"{marker}:job:{time.monotonic():.0f}", self.config.step_timeout_s)
            return  # libvirt still transfers; check again later
        if src_active and tgt_active:
            # Must not happen through libvirt; keep the copy on the target (it has the newest
            # memory after a switch-over) and stop the other.
            log.error("VM %s runs on both %s and %s: stopping the copy on %s", uuid, source, target, source)
            if source == self.node:
                self.hypervisor.destroy(uuid)
                self.finish(m, RESULT_DONE)
            else:
                # The source stops its copy. Check again later: no periodic pass wakes a VM with a
                # migration record, so without a deadline this side would wait for ever.
                self.deadlines.arm(uuid, f"{marker}:both:{time.monotonic():.0f}", self.config.step_timeout_s)
            return
        if src_active:
            self.abort(m, "the transfer did not happen; the VM still runs on the source", node=source)
            return
        if tgt_active:
            if on_target in RUNNING:
                self.finish(m, RESULT_DONE)
            else:
                self.deadlines.arm(uuid, f"{marker}:paused:{time.monotonic():.0f}", self.config.step_timeout_s)
            return
        # Off on both sides.
        step = record.step
        shut_down_for_migration = record.method_used in ("shutdown", "offline") and step in (
            STEP_TRANSFERRING,
            STEP_TRANSFERRED,
        )
        if shut_down_for_migration and self.node == target:
            self.start_here(m)
            return
        if shut_down_for_migration and self.peer_alive(target):
            # The target is alive and starts the VM itself. Hand it on; once it has claimed the
            # start (`starting_on`) it may be creating the VM right now, and taking the VM back
            # here could start a second copy (I1): wait for it (a failed start aborts to us).
            if step == STEP_TRANSFERRING:
                self.advance(m, STEP_TRANSFERRED)  # the target starts it
                return
            if record.starting_on == target:
                self.deadlines.arm(uuid, f"{marker}:target-starts:{time.monotonic():.0f}", self.config.step_timeout_s)
                return
            # Alive, but a whole step timeout has passed without even a claim: its daemon cannot
            # act (e.g. its libvirtd is down or hung). Take the VM back: the abort is
            # version-checked against the record as read, so it and a claim exclude each other.
            self.abort(
                m,
                f"target {target} did not start the VM within {self.config.step_timeout_s:.0f} s; "
                f"it is given back to the source",
                node=source,
            )
            return
        if shut_down_for_migration and record.starting_on == target and not self.peer_fenced(target):
            # The target claimed the start and may be creating the VM right now although its
            # `alive` is gone: a process stalled past its session, or cut off just after the
            # claim, still makes the libvirt call. Taking the VM back here could start a second
            # copy (I1; models/ha.pml, rule D7). Wait for the target to come back, or for its
            # fence: a fenced node runs nothing, and then the VM is given back here.
            log.warning(
                "migration %s of %s: target %s claimed the start and is gone; waiting for it or its fence",
                record.id,
                uuid,
                target,
            )
            self.deadlines.arm(uuid, f"{marker}:claimed:{time.monotonic():.0f}", self.config.step_timeout_s)
            return
        # Nothing runs and the target cannot take over: back to the source, which starts it.
        self.abort(m, "the VM was not running on either node; it is given back to the source", node=source)

    # ---- a VM running here but assigned elsewhere -----------------------------------------------

    def rehome(self, uuid: str, assigned: str) -> None:
        """The VM runs here but ZooKeeper assigns it to ``assigned`` with no migration record."""
        on_assigned = self.peer_state(assigned, uuid)
        if on_assigned in RUNNING:
            log.error("VM %s runs here and on its assigned node %s: stopping the copy here", uuid, assigned)
            # A paused copy here is, after a libvirtd restart, an incoming migration's leftover
            # that the restarted libvirtd may not stop (node_daemon/hypervisor.py, "A stale
            # incoming copy"): stop_stale_copy ends it within a bounded time either way.
            outcome = self.hypervisor.stop_stale_copy(uuid)
            log.warning("VM %s: the copy here is stopped (%s)", uuid, outcome)
            return
        if on_assigned == UNKNOWN:
            log.warning(
                "VM %s runs here but is assigned to %s, which cannot be asked; leaving it running", uuid, assigned
            )
            return
        log.warning("VM %s runs here but is assigned to %s with no migration: migrating it there", uuid, assigned)
        vm = read_vm(self.store, uuid)
        if vm is None or vm.node != assigned or vm.migration is not None:
            return  # changed since it was decided: its watches bring the new values
        # The one request path (_requests.submit_request): the fit on the assigned node (which
        # counts the VM already, so it is given back first), its reservation and a version-checked
        # rewrite of its reservations znode, in one transaction with the record's creation; a
        # request written meanwhile wins, and this is re-decided from it. No n-1 check: the VM is
        # already assigned to that node, so what ZooKeeper admits does not change, and refusing
        # would leave it running where nothing counts it.
        try:
            plan = placement_plan(
                vm,
                self.node,
                vm.node,
                vm.lastnode,
                migrates=True,
                message=f"VM {vm.name} runs on {self.node} but is assigned to {vm.node}: migrating it there",
            )
            submit_request(self.store, plan, vm, requester=self.node)
        except ConflictError:
            log.info("VM %s changed while it was brought to %s; deciding again", uuid, assigned)
        except RequestError as exc:
            log.error("VM %s runs here but its assigned node cannot take it, so it keeps running here: %s", uuid, exc)
