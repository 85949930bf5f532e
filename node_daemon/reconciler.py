"""Drive every VM that concerns this node towards the state ZooKeeper records.

ZooKeeper watches on each VM's ``state``, ``node``, ``lastnode``, ``xml`` and ``migration`` keys
(the last two only while the VM concerns this node: see ``_follows``) keep the daemon's table
(domains.py) current and mark the VM dirty; a worker thread per VM (at
most one at a time, named ``vm-<name>``) asks libvirt for the VM's state and applies
:func:`vmstate.decide` to the table's values. Events that arrive while a worker runs make it run
once more, so a late or repeated watch is harmless.

Deciding from the table saves a round of reads per pass, which matters because a migration is a
chain of passes on two daemons. It is safe because of what each action writes or touches:
migration steps are written with the record's version as the table holds it (a stale record
fails to write), and every other action (start, stop, shutdown, rehome) is confirmed from fresh
reads before anything is done.
A periodic pass every keepalive interval also catches what no watch reports (a guest that crashed).
"""

from __future__ import annotations

import threading

from pvc_cluster_common import _decode as D
from pvc_cluster_common import _records as R
from pvc_cluster_common import _schema as S
from pvc_cluster_common._cluster import move_runstate
from pvc_cluster_common._decode import Invalid
from pvc_cluster_common._domain_policy import DomainPolicy, PolicyError, check_domain
from pvc_cluster_common._domain_xml import DomainXMLError
from pvc_cluster_common._store import StoreError, UnreachableError, Versioned, text_of

from .context import DaemonContext, Outage, Service
from .hypervisor import HypervisorError, HypervisorUnavailable
from .migration import UNAVAILABLE
from .log import get_logger
from .threads import ReusableThreads
from .vmstate import ACTIVE_LIBVIRT_STATES, Action, Desired, decide

log = get_logger(__name__)

WATCHED_KEYS = (S.DOMAIN_STATE, S.DOMAIN_RUNSTATE, S.DOMAIN_NODE, S.DOMAIN_XML, S.DOMAIN_MIGRATION, S.DOMAIN_LASTNODE)
# Keys only the nodes a VM concerns need every change of (see _follows); every migration
# rewrites the record about six times, and a temporary one rewrites lastnode.
FOLLOWED_KEYS = (S.DOMAIN_MIGRATION, S.DOMAIN_LASTNODE)
# The keys a node's memory figures are computed from (see table_loaded and keepalive.py).
ACCOUNTING_KEYS = (S.DOMAIN_NODE, S.DOMAIN_XML, S.DOMAIN_MIGRATION)
# What desired_from_table answers while a VM's first reads are still in flight: not "nothing is
# desired" (None), but "not known yet" (the answers queue another pass).
LOADING = object()
# What happens to a VM whose key is not valid, as the log says it.
LEFT_ALONE = "the VM is left as it is until the value is fixed"
RECORD_LEFT_ALONE = (
    "no daemon acts on the record and the VM is left as it is until an operator clears it "
    "(pvc.cluster.vm_migrate with state=cleared)"
)
XML_REFUSED = "the VM is neither started nor migrated until its XML is fixed"
RUNSTATE_IGNORED = "read as none: the VM's desired state applies"


class Reconciler(Service):
    def __init__(self, ctx: DaemonContext, migrations) -> None:
        super().__init__(ctx)
        self.migrations = migrations
        self._lock = threading.Lock()
        self._outage = Outage("reconciler")
        self._busy: set[str] = set()
        self._dirty: set[str] = set()
        self._idle = threading.Condition(self._lock)
        # One pass per VM at a time, each in a thread of its own (a slow shutdown of one VM never
        # delays another); the threads are reused between passes.
        self._workers = ReusableThreads("vm", keep_idle=8)
        self._watched: set[str] = set()
        # key -> VMs whose key is watched now (see _follows)
        self._followed: dict[str, set[str]] = {key: set() for key in FOLLOWED_KEYS}
        # uuids libvirt ran here at the last listing (refreshed by every pass and every start)
        self.local: set[str] = set()
        self.accepting = threading.Event()
        self.accepting.set()
        # The table is loaded once the list of VMs has been read and every listed VM's
        # accounting keys have answered: before that the node's memory figures would leave VMs
        # out (see table_loaded). Notified by every answer.
        self._listed = False
        self._answers = threading.Condition()

    # ---- watches ------------------------------------------------------------------------------

    def start(self) -> None:
        self.store.watch_children(self.schema.domains(), self._on_domains)
        self.hypervisor.add_lifecycle_listener(self._on_lifecycle)

    def _on_lifecycle(self, uuid: str, event: str, _detail: int) -> None:
        """On libvirt's events thread (must not block): a VM coming here by a live migration
        that starts or resumes gets a pass at once; the resume is the switch-over, which ends
        the migration (MigrationAgent.as_target). Other changes wait for the periodic pass."""
        if event not in ("started", "resumed"):
            return
        record = self.domains.get(uuid)
        if (
            record is not None
            and record.migration_target == self.node
            and record.migration is not None
            and record.migration.method_used == "live"
        ):
            self.enqueue(uuid)

    def _on_domains(self, children: list[str] | None) -> bool:
        current = set(children or [])
        for uuid in current - self._watched:
            self._watch_domain(uuid)
        for uuid in self._watched - current:
            self._watched.discard(uuid)
            self.domains.remove(uuid)
            self.enqueue(uuid)
        with self._answers:
            self._listed = True
            self._answers.notify_all()
        return True

    def table_loaded(self) -> bool:
        """Whether the table knows every VM of the cluster as far as this node's memory figures
        need it: the VM list was read, and each listed VM's node, XML and migration record have
        answered (whether or not they exist). Until then the keepalive publishes no figures."""
        if not self._listed:
            return False
        table = self.domains.snapshot()
        return all(uuid in table and table[uuid].has(*ACCOUNTING_KEYS) for uuid in list(self._watched))

    def wait_loaded(self, timeout_s: float) -> bool:
        """Wait (bounded) until :meth:`table_loaded`; woken by each watch's answer."""
        with self._answers:
            return self._answers.wait_for(self.table_loaded, timeout_s)

    def _watch_domain(self, uuid: str) -> None:
        self._watched.add(uuid)
        with self._lock:
            for followers in self._followed.values():
                followers.add(uuid)
        for key in WATCHED_KEYS:
            self._watch_key(uuid, key)

    def _follows(self, uuid: str) -> bool:
        """Whether this daemon needs every change of the VM's FOLLOWED_KEYS.

        Every daemon watches every VM, but only the two sides need a migration record's steps
        (and only the VM's own nodes its lastnode: a node being made ready reads lastnode fresh).
        The source is the VM's node when the request is written, the target its node from then
        on (the request moves ``node`` in the same transaction), so a daemon follows the keys
        while the VM is assigned here, runs here, or the last record it read names this node.
        It stops at a key's next change otherwise, and starts again when the VM's ``node``
        becomes this node or the VM appears in libvirt here.
        """
        record = self.domains.get(uuid)
        return record is None or uuid in self.local or record.node == self.node or self._concerns_me(record)

    def follow(self, uuid: str) -> None:
        """Watch the VM's FOLLOWED_KEYS again where they are not watched (see _follows)."""
        for key in FOLLOWED_KEYS:
            with self._lock:
                if uuid in self._followed[key] or uuid not in self._watched:
                    continue
                self._followed[key].add(uuid)
            self._watch_key(uuid, key)

    def _watch_key(self, uuid: str, key: str) -> None:
        """Keep the table's copy of one key current (``ClusterStore.follow``: each change starts an
        asynchronous read, so with every daemon watching every VM many re-reads are in flight at
        once). A FOLLOWED_KEYS key stops being read at its first change that no longer concerns
        this node (see _follows)."""

        def wanted() -> bool:
            if uuid not in self._watched:
                return False
            if key in self._followed:
                with self._lock:  # atomic with follow's check (see there)
                    if not self._follows(uuid):
                        self._followed[key].discard(uuid)
                        return False
            return True

        self.store.follow(self.schema.domain_key(uuid, key), lambda value: self._on_value(uuid, key, value), wanted)

    def rewatch(self) -> None:
        """Re-arm every watch (after a new ZooKeeper session, which drops them all)."""
        for uuid in list(self._watched):
            with self._lock:
                for followers in self._followed.values():
                    followers.add(uuid)
            for key in WATCHED_KEYS:
                self._watch_key(uuid, key)

    def _on_value(self, uuid: str, key: str, found: Versioned | None) -> None:
        if uuid not in self._watched:
            return
        value, version = (found.value, found.version) if found is not None else (None, -1)
        before = self.domains.get(uuid)
        self._record(uuid, key, value, version)
        after = self.domains.get(uuid)
        if key == S.DOMAIN_NODE and value == self.node:
            self.follow(uuid)
        if after == before:
            return  # nothing new (e.g. the answer to this daemon's own write, already recorded)
        # Every daemon watches every VM; only those that concern this node are worth a pass:
        # assigned or migrating here before or after the change, or running here.
        if self._concerns_me(before) or self._concerns_me(after) or uuid in self.local:
            self.enqueue(uuid)

    def _concerns_me(self, record) -> bool:
        return record is not None and self.node in (record.node, record.migration_source, record.migration_target)

    def _decoded(self, path: str, kind: str, decoder, value, version: int, fallback, consequence: str, *args):
        """(decoded value, "") or, for an invalid value (reported once per version), (fallback,
        why). A missing key (None) reads as ``fallback``."""
        if value is None:
            self.invalid.valid(path)
            return fallback, ""
        try:
            decoded = decoder(value, path, *args)
        except Invalid as exc:
            self.invalid.report(exc, kind, version, consequence)
            return fallback, str(exc)
        self.invalid.valid(path)
        return decoded, ""

    @property
    def policy(self) -> DomainPolicy:
        return getattr(self.config, "domain_policy", None) or DomainPolicy()

    def accepted_xml(self, value, path: str, uuid: str, name: str | None = None):
        """The decoder of a VM's XML here: a valid domain document (_records.domain_xml) that this
        node's domain XML policy accepts, with the VM's own UUID (and ``name``, when given).
        Returns its DomainInfo; raises Invalid naming the element and the rule."""
        document = D.text(value, path, max_bytes=D.MAX_XML_BYTES)
        try:
            return check_domain(document, self.policy, uuid, name)
        except DomainXMLError as exc:
            raise Invalid(path, f"a libvirt domain XML document ({exc})", value) from None
        except PolicyError as exc:
            raise Invalid(path, f"a domain XML that the policy accepts: {exc}", value) from None

    def _record(self, uuid: str, key: str, value: str | None, version: int) -> None:
        try:
            self._record_value(uuid, key, value, version)
        finally:
            with self._answers:
                self._answers.notify_all()

    def _record_value(self, uuid: str, key: str, value: str | None, version: int) -> None:
        exists = value is not None
        path = self.schema.domain_key(uuid, key)
        if key == S.DOMAIN_XML:
            info, error = self._decoded(path, "xml", self.accepted_xml, value, version, None, XML_REFUSED, uuid)
            if info is None:
                self.domains.put(
                    uuid,
                    key,
                    exists,
                    memory_mib=0,
                    vcpus=0,
                    xml=value or "",
                    xml_error=error or "no domain XML in ZooKeeper",
                )
                return
            self.domains.put(
                uuid, key, exists, name=info.name, memory_mib=info.memory_mib, vcpus=info.vcpus, xml_error="", xml=value
            )
        elif key == S.DOMAIN_STATE:
            state, error = self._decoded(path, "state", R.vm_state, value, version, "", LEFT_ALONE)
            self.domains.put(uuid, key, exists, desired_state=state, state_version=version, state_error=error)
        elif key == S.DOMAIN_RUNSTATE:
            record, _ = self._decoded(path, "state", R.runstate, value, version, None, RUNSTATE_IGNORED)
            self.domains.put(uuid, key, exists, runstate=record)
        elif key == S.DOMAIN_NODE:
            node, error = self._decoded(path, "node", R.vm_node, value, version, "", LEFT_ALONE)
            self.domains.put(uuid, key, exists, node=node, node_version=version, node_error=error)
        elif key == S.DOMAIN_LASTNODE:
            lastnode, _ = self._decoded(path, "lastnode", R.vm_node, value, version, "", "read as none (no home node)")
            self.domains.put(uuid, key, exists, lastnode=lastnode)
        elif key == S.DOMAIN_MIGRATION:
            record, error = self._decoded(
                path, "migration", R.migration_record, value, version, None, RECORD_LEFT_ALONE, uuid
            )
            current = self.domains.get(uuid)
            if (
                record
                and current
                and current.migration
                and current.migration.id == record.id
                and version < current.migration_version
            ):
                return  # an answer older than this daemon's own write, already recorded
            self.domains.put(
                uuid, key, exists, migration=record, migration_version=version if exists else -1, migration_error=error
            )

    # ---- work queue ---------------------------------------------------------------------------

    def enqueue(self, uuid: str) -> None:
        if not self.accepting.is_set():
            return
        with self._lock:
            if uuid in self._busy:
                self._dirty.add(uuid)
                return
            self._busy.add(uuid)
        record = self.domains.get(uuid)
        name = record.name if record and record.name else uuid[:8]
        self._workers.submit(lambda: self._work(uuid), name=f"vm-{name}")

    def _work(self, uuid: str) -> None:
        while True:
            try:
                self.reconcile(uuid)
                if self.store.connected:  # a pass decided from the table alone says nothing of it
                    self._outage.passed()
            except UnreachableError as exc:
                # nothing decided from a read that failed (a VM that could not be read is not
                # taken for deleted); the resync after the reconnection passes over it again
                self._outage.failed(exc)
            except Exception:  # one VM's failure must not stop the others
                log.exception("VM %s: reconcile failed", uuid)
            with self._lock:
                if uuid in self._dirty and self.accepting.is_set():
                    self._dirty.discard(uuid)
                    continue
                self._dirty.discard(uuid)
                self._busy.discard(uuid)
                self._idle.notify_all()
                return

    def resync(self, full: bool = True) -> None:
        """Queue the VMs that concern this node.

        ``full`` (start-up, reconnection): every VM assigned here, migrating through here or running
        here, each re-read from ZooKeeper. Otherwise (the periodic pass): only VMs whose state as
        the watches last reported it disagrees with libvirt, so the pass costs one libvirt listing
        however many VMs the cluster has.
        """
        try:
            local = {ref.uuid: (ref.status.state if ref.status else None) for ref in self.hypervisor.list_domains()}
        except HypervisorError as exc:
            log.warning("resync: cannot list libvirt domains: %s", exc)
            return
        self.local = set(local)
        for uuid in self.local:
            self.follow(uuid)
        for uuid, record in self.domains.snapshot().items():
            involved = self.node in (record.node, record.migration_source, record.migration_target)
            if not (involved or uuid in local):
                continue
            if full:
                self.enqueue(uuid)
                continue
            if record.migration_source is not None:
                continue  # migrations wake on watches and step deadlines
            desired = Desired(state=record.state, node=record.node, invalid=record.left_alone)
            if decide(self.node, desired, local.get(uuid)).action not in (Action.NOTHING, Action.FORGET):
                self.enqueue(uuid)
        if full:
            for uuid in self.migrations.records_for_node():
                self.follow(uuid)
                self.enqueue(uuid)

    def wait_idle(self, timeout_s: float) -> bool:
        with self._lock:
            return self._idle.wait_for(lambda: not self._busy, timeout=timeout_s)

    def run(self, stop: threading.Event) -> None:
        """A full pass every keepalive interval, catching what no watch reports."""
        while not stop.wait(self.config.keepalive_interval_s):
            if self.store.connected:
                self.resync(full=False)

    # ---- one VM -------------------------------------------------------------------------------

    def read_desired(self, uuid: str):
        """Fresh reads of the keys that decide what happens to the VM (None when it is gone),
        decoded as the watches decode them."""
        paths = (
            self.schema.domain_key(uuid, S.DOMAIN_STATE),
            self.schema.domain_key(uuid, S.DOMAIN_NODE),
            self.schema.domain_migration(uuid),
            self.schema.domain_key(uuid, S.DOMAIN_RUNSTATE),
        )
        values = self.store.get_many(paths)
        state, node, found, run = (values[path] for path in paths)
        if state is None or node is None:
            return None, None
        desired, state_error = self._decoded(paths[0], "state", R.vm_state, state.value, state.version, "", LEFT_ALONE)
        runstate, _ = self._decoded(
            paths[3], "state", R.runstate, text_of(run), run.version if run else -1, None, RUNSTATE_IGNORED
        )
        state = R.effective_state(desired, state.version, runstate)
        node, node_error = self._decoded(paths[1], "node", R.vm_node, node.value, node.version, "", LEFT_ALONE)
        record, record_error = (None, "")
        if found is not None:
            record, record_error = self._decoded(
                paths[2], "migration", R.migration_record, found.value, found.version, None, RECORD_LEFT_ALONE, uuid
            )
        desired = Desired(
            state=state,
            node=node,
            migration_source=record.source if record else None,
            migration_target=record.target if record else None,
            invalid=record_error or state_error or node_error,
        )
        return desired, ((record, found.version) if record else None)

    def desired_from_table(self, uuid: str):
        """(Desired, (record, version)) from the watch-fed table; (None, None) when the VM's
        state or node is not there; (LOADING, None) while its first reads are still in flight."""
        record = self.domains.get(uuid)
        if record is None:
            return None, None
        if not record.has(S.DOMAIN_STATE, S.DOMAIN_RUNSTATE, S.DOMAIN_NODE, S.DOMAIN_MIGRATION):
            return LOADING, None
        if S.DOMAIN_STATE not in record.present or S.DOMAIN_NODE not in record.present:
            return None, None
        desired = Desired(
            state=record.state,
            node=record.node,
            migration_source=record.migration_source,
            migration_target=record.migration_target,
            invalid=record.left_alone,
        )
        return desired, ((record.migration, record.migration_version) if record.migration else None)

    def reconcile(self, uuid: str) -> None:
        if not self.store.connected:
            return  # a reconnect queues a full pass; acting on a stale view is worse than waiting
        desired, known = self.desired_from_table(uuid)
        if desired is LOADING:
            return  # the answers of the first reads queue another pass
        try:
            status = self.hypervisor.status(uuid)
        except HypervisorUnavailable as exc:
            # No libvirt connection (the driver reconnects, and the reconnect queues a pass over
            # every VM): start, stop or re-home nothing on a state that is not known. A migration
            # still follows its steps and deadlines (the agent takes UNAVAILABLE into account).
            if (
                desired is not None
                and desired is not LOADING
                and known
                and self.node in (desired.migration_source, desired.migration_target)
            ):
                self.migrations.handle(uuid, known, local_state=UNAVAILABLE)
            else:
                log.info("VM %s: left as it is while libvirt is unavailable (%s)", uuid, exc.message)
            return
        local_state = status.state if status else None
        if local_state in ACTIVE_LIBVIRT_STATES and uuid not in self.local:
            # e.g. just migrated in: count it as running here before the next full listing
            self.local = self.local | {uuid}
            self.follow(uuid)
        decision = decide(self.node, desired, local_state) if desired else None
        if decision is None or decision.action not in (Action.NOTHING, Action.FORGET, Action.MIGRATION):
            # About to act outside the migration protocol, where no version check guards the
            # write: confirm from fresh reads (the table may be one answer behind).
            desired, known = self.read_desired(uuid)
            decision = decide(self.node, desired, local_state) if desired else None
        if desired is None:
            if local_state not in (None, "shutoff") and not self.store.exists(self.schema.domain(uuid)):
                log.warning("VM %s was removed from the cluster while running here: forced stop", uuid)
                self._destroy(uuid)
            return
        assert decision is not None  # decided whenever desired is not None
        if decision.action in (Action.NOTHING, Action.FORGET, Action.MIGRATION):
            log.debug("VM %s: %s", uuid, decision.why)
        else:
            log.info("VM %s: %s (%s)", uuid, decision.action.value, decision.why)
        if decision.action is Action.MIGRATION:
            self.migrations.handle(uuid, known or (None, -1), local_state=local_state)
        elif decision.action is Action.START:
            self.start_vm(uuid)
        elif decision.action is Action.RESTART:
            self._shutdown(uuid)
            if self.start_vm(uuid):
                self._set_state_if(uuid, "restart", "start")
        elif decision.action is Action.SHUTDOWN:
            self._shutdown(uuid)
            if decision.new_state:
                self._set_state_if(uuid, desired.state, decision.new_state)
        elif decision.action is Action.STOP:
            self._destroy(uuid)
        elif decision.action is Action.RECORD_STOPPED:
            if decision.new_state:
                self._set_state_if(uuid, desired.state, decision.new_state)
        elif decision.action is Action.REHOME:
            self.migrations.rehome(uuid, desired.node)

    # ---- actions ------------------------------------------------------------------------------

    def start_vm(self, uuid: str) -> bool:
        path = self.schema.domain_key(uuid, S.DOMAIN_XML)
        found = self.store.find(path)
        if not found:
            self._fail(uuid, "no domain XML in ZooKeeper")
            return False
        xml, refusal = self.checked_xml(uuid, *found)
        if refusal:
            self._fail(uuid, refusal)
            return False
        try:
            self.hypervisor.create(xml)
        except HypervisorUnavailable as exc:
            # not a fault of the VM: the pass after the reconnect starts it (or finds it running)
            log.warning("VM %s: not started, libvirt is unavailable (%s)", uuid, exc.message)
            return False
        except HypervisorError as exc:
            self._fail(uuid, str(exc))
            return False
        log.ok("VM %s: started", uuid)
        self.local = self.local | {uuid}
        self.follow(uuid)
        try:
            self.store.commit({self.schema.domain_key(uuid, S.DOMAIN_FAILEDREASON): ""})
        except StoreError as exc:  # an old reason left: cleared at its next start, or shown until then
            log.warning("VM %s: its last failure reason was not cleared: %s", uuid, exc)
        return True

    def checked_xml(self, uuid: str, xml: str, version: int) -> tuple[str, str]:
        """(the VM's XML, "") when it may be given to libvirt, else (xml, why not): the XML
        decodes (a bounded, parsed libvirt domain document with its memory size) and this
        node's domain XML policy accepts it, with the VM's own UUID and name."""
        name = self.store.find_text(self.schema.domain(uuid))
        _, error = self._decoded(
            self.schema.domain_key(uuid, S.DOMAIN_XML),
            "xml",
            self.accepted_xml,
            xml,
            version,
            None,
            XML_REFUSED,
            uuid,
            name,
        )
        return xml, (f"refused to start: {error}" if error else "")

    def _fail(self, uuid: str, reason: str) -> None:
        """The start failed: the VM's state becomes ``fail`` (its runstate record, for the
        desired state read now: an operator's next ``start`` tries again), with the reason."""
        log.error("VM %s: start failed: %s", uuid, reason)
        try:
            move_runstate(
                self.store,
                uuid,
                "fail",
                self.node,
                also={self.schema.domain_key(uuid, S.DOMAIN_FAILEDREASON): reason[: R.MAX_REASON_BYTES]},
            )
        except StoreError as exc:
            log.warning("VM %s: its failure was not recorded: %s", uuid, exc)

    def _shutdown(self, uuid: str) -> None:
        """Clean shutdown with the configured timeout, then a forced stop."""
        try:
            clean = self.hypervisor.shutdown_or_destroy(uuid, self.config.shutdown_timeout_s)
            log.ok("VM %s: %s", uuid, "shut down" if clean else "stopped (forced)")
        except HypervisorError as exc:
            log.error("VM %s: forced stop failed: %s", uuid, exc)

    def _destroy(self, uuid: str) -> None:
        try:
            self.hypervisor.destroy(uuid)
            log.ok("VM %s: stopped", uuid)
        except HypervisorError as exc:
            log.error("VM %s: forced stop failed: %s", uuid, exc)

    def _set_state_if(self, uuid: str, expected: str, new: str) -> None:
        """Record that the VM went from ``expected`` to ``new`` (its runstate record), only if
        its state is still ``expected``: an operator's newer desired state wins."""
        try:
            move_runstate(self.store, uuid, new, self.node, expected=expected)
        except StoreError as exc:
            log.warning("VM %s: state %s not recorded: %s", uuid, new, exc)
