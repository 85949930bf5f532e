"""The keepalive: every interval, one ZooKeeper transaction with this node's figures.

The keepalive never calls libvirt. Host and VM figures come from ``vm-thread``
(:class:`FiguresReader`), which reads them from libvirt on its own schedule, each call bounded by
the libvirt call timeout; the keepalive publishes the last figures it read, with their age
(``figures_age``, seconds) and whether they are stale (``figures_stale``: older than two keepalive
intervals). A hung libvirtd therefore leaves stale figures, published as stale and never as
zeros, and a node that keeps its keepalive: a health state, not a dead node. memprov does not
depend on libvirt at all (the VM table's XML memory for every VM assigned here).
Statistics are gathered only for running domains; paused (including incoming migrations) and
shut-off domains are skipped before any statistics call.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field

from pvc_cluster_common import _records as R
from pvc_cluster_common import _schema as S
from pvc_cluster_common._cluster import read_node_state, reservation_mib
from pvc_cluster_common._decode import Invalid
from pvc_cluster_common._records import NodeState
from pvc_cluster_common._memory import AccountedVM, NodeAccount, account_node
from pvc_cluster_common._store import ConflictError, StoreError, UnreachableError

from .context import DaemonContext, Outage, Service
from .hypervisor import ACTIVE_STATES
from .log import get_logger
from .reconciler import ACCOUNTING_KEYS

log = get_logger(__name__)

STATS_EVERY = 6
# Figures older than this many keepalive intervals are published as stale.
STALE_AFTER_INTERVALS = 2


@dataclass
class VMFigures:
    """What vm-thread learned from libvirt in one pass."""

    running: dict[str, tuple[int, int]] = field(default_factory=dict)  # uuid -> (max memory MiB, vCPUs)
    states: dict[str, str] = field(default_factory=dict)  # uuid -> libvirt state name
    stats: dict[str, dict] = field(default_factory=dict)  # uuid -> memory statistics (running only)


@dataclass(frozen=True)
class Reading:
    """The last figures vm-thread read; ``*_at`` is the wall time of each read (None: never)."""

    host: tuple[int, int, int] | None = None  # (total, used, free) MiB
    host_at: float | None = None
    vms: VMFigures = field(default_factory=VMFigures)
    vms_at: float | None = None
    stats_pass: int = -1  # the pass whose statistics ``vms.stats`` holds (-1: none)
    passes: int = 0  # passes finished, failed ones included

    @property
    def read_at(self) -> float | None:
        """When the oldest of the host and VM figures was read (None: one was never read)."""
        if self.host_at is None or self.vms_at is None:
            return None
        return min(self.host_at, self.vms_at)


class FiguresReader:
    """``vm-thread``: reads host and VM figures from libvirt, one pass every ``interval_s`` or
    when asked (:meth:`request`), until stopped. One thread: a pass stuck in a libvirt call
    delays only the next pass (each call gives up after the libvirt call timeout), never the
    keepalive, which takes :meth:`latest` as it is."""

    def __init__(self, hypervisor, interval_s: float, stats_every: int = STATS_EVERY) -> None:
        self.hypervisor = hypervisor
        self.interval_s = interval_s
        self.stats_every = stats_every
        self.started_at = time.time()
        self._reading = Reading()
        self._changed = threading.Condition()
        self._asked = threading.Event()
        self._started = 0  # passes started (a pass finishes as Reading.passes)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def start(self, stop: threading.Event | None = None) -> None:
        if self._thread is not None:
            return
        self._stop = stop or self._stop
        self.started_at = time.time()
        self._thread = threading.Thread(target=self.run, name="vm-thread", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._asked.set()

    @property
    def started(self) -> bool:
        return self._thread is not None

    def latest(self) -> Reading:
        with self._changed:
            return self._reading

    def request(self) -> int:
        """Ask for a pass now; returns the pass count that means "a pass that started after this
        request has finished" (see :meth:`wait`)."""
        with self._changed:
            target = self._started + 1
        self._asked.set()
        return target

    def wait(self, passes: int, timeout_s: float) -> bool:
        """Wait (bounded) until ``passes`` passes have finished."""
        with self._changed:
            return self._changed.wait_for(lambda: self._reading.passes >= passes, timeout_s)

    def run(self) -> None:
        while not self._stop.is_set():
            with self._changed:
                self._asked.clear()
                self._started += 1
            self.read_once()
            if self._asked.is_set():
                continue
            # woken early by request(); otherwise a timer (not a synchronisation)
            self._asked.wait(self.interval_s)

    def read_once(self) -> Reading:
        """One pass: host memory, then every running domain's figures (and, every
        ``stats_every`` passes, their statistics). A failed read keeps the last figures."""
        before = self.latest()
        host, host_at = before.host, before.host_at
        try:
            host, host_at = self.hypervisor.host_memory_mib(), time.time()
        except Exception as exc:  # kept, with its age: zeros would read as "no room" to placement
            log.warning("vm-thread: cannot read host memory (the last figures stay, marked by their age): %s", exc)
        with_stats = before.passes % self.stats_every == 0
        vms, vms_at, stats_pass = before.vms, before.vms_at, before.stats_pass
        try:
            vms, vms_at = self.gather_vm_figures(with_stats), time.time()
            if with_stats:
                stats_pass = before.passes
            else:
                vms.stats = before.vms.stats  # the last statistics pass's, published once (stats_pass)
        except Exception as exc:  # likewise
            log.warning("vm-thread: cannot read the VM figures (the last figures stay, marked by their age): %s", exc)
        reading = Reading(
            host=host, host_at=host_at, vms=vms, vms_at=vms_at, stats_pass=stats_pass, passes=before.passes + 1
        )
        with self._changed:
            self._reading = reading
            self._changed.notify_all()
        return reading

    def gather_vm_figures(self, with_stats: bool = True) -> VMFigures:
        """Memory and vCPUs of every running domain (one libvirt listing), and with ``with_stats``
        each running domain's balloon statistics (one call per domain: only when published)."""
        figures = VMFigures()
        for uuid, (status, maximum, vcpus) in self.hypervisor.running_figures().items():
            state = status.state if status else "nostate"
            figures.states[uuid] = state
            figures.running[uuid] = (maximum, vcpus)
            if not with_stats:
                continue
            if state != "running":
                # A paused domain (an incoming migration among them) can block memoryStats for a
                # long time: skip its statistics entirely.
                log.debug("vm-thread: %s is %s: statistics skipped", uuid, state)
                continue
            stats = self.hypervisor.memory_stats(uuid)
            figures.stats[uuid] = {
                "state": state,
                "memory_mib": maximum,
                "vcpus": vcpus,
                "memory_stats": stats or {},
                "updated": round(time.time(), 3),
            }
        return figures


class Keepalive(Service):
    def __init__(self, ctx: DaemonContext) -> None:
        self._outage = Outage("keepalive")
        super().__init__(ctx)
        self.reader = FiguresReader(ctx.hypervisor, ctx.config.keepalive_interval_s)
        self.ticks = 0
        self.stats_published = -1  # the reader pass whose statistics were published last
        self.clock = time.time
        # whether the VM table is loaded (set by the daemon: Reconciler.table_loaded)
        self.table_loaded = lambda: True

    # ---- one keepalive ----------------------------------------------------------------------

    def tick(self, wait_for_read_s: float = 0.0) -> bool:
        """One keepalive, from the figures vm-thread read last. ``wait_for_read_s``: first ask
        vm-thread for a pass and wait for it, bounded (the daemon's first keepalive, and tests);
        the keepalive loop never waits."""
        started = time.monotonic()
        if not self.reader.started:
            self.reader.start()
        if wait_for_read_s > 0:
            self.reader.wait(self.reader.request(), wait_for_read_s)
        reading = self.reader.latest()
        figures = reading.vms
        memtotal, memused, memfree = reading.host or (0, 0, 0)
        read_at = reading.read_at
        age = self.clock() - (read_at if read_at is not None else self.reader.started_at)
        stale = read_at is None or age > STALE_AFTER_INTERVALS * self.config.keepalive_interval_s
        if stale:
            log.warning("keepalive: libvirt's figures are %.1f s old (libvirt slow or hung?); published as stale", age)

        if not self.table_loaded():
            # Figures computed from a table that does not know every VM yet would leave VMs out
            # (after a start, memprov 0 on a full node): only the timestamp goes out, and the
            # daemon state stays `init` (no placement) until the table is loaded.
            ok = self._write({self.schema.node_key(self.node, S.NODE_KEEPALIVE): round(time.time(), 3)})
            self.ticks += 1
            log.info("keepalive: the VM table is still loading; no memory figures published yet")
            return ok
        snapshot = self.domains.snapshot()  # never iterate the live table: watches mutate it
        reservations = self.read_reservations()
        folds = self.foldable(reservations, snapshot, reading.vms.running)
        values, account = self.figures(reading, snapshot, reservations, folds, age, stale)
        state = read_node_state(self.store, self.node)
        # Per-VM statistics are for people, not placement: vm-thread gathers them every
        # STATS_EVERY passes, and each pass's are published once.
        if reading.stats_pass > self.stats_published:
            self.stats_published = reading.stats_pass
            for uuid, stats in figures.stats.items():
                if uuid in snapshot and snapshot[uuid].node == self.node:
                    values[self.schema.domain_key(uuid, S.DOMAIN_STATS)] = stats
        ok = self.write_figures(values, reservations, folds)
        if not ok and folds:
            # a reservation changed since it was read: publish without folding any (next tick)
            values |= self.figures(reading, snapshot, reservations, {}, age, stale)[0]
            ok = self._write(values)
        if ok:
            self.run_again(state)
        elapsed = time.monotonic() - started
        self.ticks += 1
        if self.metrics:
            self.metrics.keepalive(elapsed, ok, account, memtotal, memused, memfree, snapshot, self.node)
        if ok:
            log.tick(
                "keepalive: %d VMs running, memory total/used/free %d/%d/%d MiB, alloc %d, prov %d, %.2fs",
                account.domaincount,
                memtotal,
                memused,
                memfree,
                account.memalloc,
                account.memprov,
                elapsed,
            )
        else:
            log.error("keepalive: could not write this node's figures (see above)")
        return ok

    def run_again(self, state: NodeState | None) -> bool:
        """Write ``run`` when this node's state (as its peers read it, ``state``) says it is not
        running: the first keepalive after start (``init``), a node its peers judged dead or
        failed to fence (its VMs were never recovered elsewhere), or whose own state is not
        valid: it lives. Written at the version of its daemon_state that was read, so that it
        answers exactly the verdicts it saw, and, unless that version is claimed, with the claim
        of that version: a peer that fences this node claims the same version first, and then
        this write fails (a node being fenced, or fenced, never writes ``run``; only a restarted
        daemon, which registers with ``init``, runs again). A ``fence-failed`` version is
        claimed already, by the peer that gave up: nobody fences it any more, so it is answered
        by the version alone. True when ``run`` was written."""
        path = self.schema.node_key(self.node, S.NODE_DAEMON_STATE)
        if state is None:
            return self._write({path: "run"})
        if state.daemon_state not in ("init", "invalid", "dead", "fence-failed"):
            return False
        if state.claimed and state.daemon_state != "fence-failed":
            log.warning(
                "keepalive: this node's state %s is claimed by a peer that fences it: not running", state.version
            )
            return False
        values: dict[str, object] = {path: "run"}
        create = []
        if not state.claimed:
            claim = self.schema.node_claim(self.node, state.version)
            values[claim] = self.node
            create.append(claim)
        try:
            self.store.commit(values, expect_versions={path: state.version}, create=create)
        except ConflictError:
            log.warning("keepalive: this node's state changed, or a peer claimed it to fence this node: not running")
            return False
        except UnreachableError:
            raise  # the pass's (run)
        except StoreError as exc:
            log.error("keepalive: could not write this node's daemon state: %s", exc)
            return False
        if state.by_verdict:
            log.warning(
                "keepalive: node %s was judged %s by %s: it runs again",
                self.node,
                state.daemon_state,
                state.verdict.get("by", "?"),
            )
        return True

    # ---- accounting -------------------------------------------------------------------------

    def read_reservations(self) -> dict[str, tuple[str, int]]:
        """This node's incoming reservations: uuid -> (stored amount, znode version)."""
        parent = self.schema.node_reservations(self.node)
        names = self.store.list_children(parent, missing_ok=True)
        found = self.store.get_many([self.schema.node_reservation(self.node, uuid) for uuid in names])
        return {
            uuid: found[self.schema.node_reservation(self.node, uuid)]
            for uuid in names
            if found[self.schema.node_reservation(self.node, uuid)] is not None
        }

    def foldable(self, reservations: dict, snapshot: dict, running: dict | None = None) -> dict[str, int]:
        """Reservations this keepalive replaces by counting their VM in memprov, in the same
        transaction that deletes them (uuid -> reservation version): those of VMs the table
        knows to be assigned here with no migration in flight (a migration that ended here, or
        an abort that gave the VM back to this node), their memory known from a valid XML, and
        counted at least at what the reservation holds (``running``: libvirt's figures of the
        VMs running here, uuid -> (MiB, vCPUs)). A VM whose XML grew has a reservation of its
        new size (``pvc.cluster.vm``): until the table has the new XML, it stays reserved.

        Only this keepalive deletes a reservation its node still needs, and only together with
        a memprov that counts the VM: so a VM assigned here is covered at every instant, by the
        reservation or by memprov (docs/architecture.md, "Memory accounting").
        """
        folds = {}
        for uuid, (amount, version) in reservations.items():
            record = snapshot.get(uuid)
            if (
                record is None
                or not record.has(*ACCOUNTING_KEYS)
                or record.node != self.node
                or record.migration is not None
                or record.migration_error
                or not record.xml_ok
            ):
                continue
            counted = max(record.memory_mib, (running or {}).get(uuid, (0, 0))[0])
            held = self._held(uuid, amount)
            if held <= counted or self._xml_counted(uuid, counted):
                folds[uuid] = version
        return folds

    def _xml_counted(self, uuid: str, counted: int) -> bool:
        """Whether the VM's XML as stored now asks for no more than ``counted`` MiB (what this
        keepalive counts it at). Asked only of a reservation larger than the count: either the
        table has not seen a grown XML yet (the XML now is larger: keep the reservation), or the
        XML shrank after the growth that wrote it (``pvc.cluster.vm`` writes no reservation for a
        smaller XML), and then the reservation would never fold and would hold the difference
        out of placement for good. The XML is read after the reservation, and a growth writes
        both in one transaction, so it is at least as new as the growth; a later growth rewrites
        the reservation, whose version the fold checks. An XML that cannot be read or is not
        valid keeps the reservation."""
        path = self.schema.domain_key(uuid, S.DOMAIN_XML)
        value = self.store.find_text(path)
        if value is None:
            return False
        try:
            memory_mib = R.domain_xml(value, path).memory_mib
        except Invalid:
            return False
        return bool(memory_mib <= counted)

    def _held(self, uuid: str, amount: str | None) -> int:
        """What a reservation holds (MiB); an invalid amount reads as 0, as in every reader."""
        return reservation_mib(amount, self.schema.node_reservation(self.node, uuid), [])

    def figures(
        self, reading: Reading, snapshot: dict, reservations: dict, folds: dict, age: float, stale: bool
    ) -> tuple[dict, NodeAccount]:
        """The node keys of this keepalive's accounting, and the account they come from."""
        figures = reading.vms
        vms = []
        for uuid, record in snapshot.items():
            reserved = uuid in reservations and uuid not in folds
            if uuid in figures.running:
                memory_mib, vcpus = figures.running[uuid]
                running = figures.states.get(uuid) in ACTIVE_STATES  # a domain shutting down still holds its memory
                if record.node == self.node and record.xml_ok:
                    memory_mib = max(memory_mib, record.memory_mib)  # what its reservation held
            elif record.node == self.node:
                memory_mib, vcpus, running = record.memory_mib, record.vcpus, False
            else:
                continue
            vms.append(
                AccountedVM(
                    uuid=uuid,
                    node=record.node,
                    memory_mib=memory_mib,
                    vcpus=vcpus,
                    running_here=running,
                    reserved_here=reserved,
                )
            )
        # Domains libvirt runs here that ZooKeeper does not know still use memory.
        for uuid, (memory_mib, vcpus) in figures.running.items():
            if uuid not in snapshot:
                vms.append(
                    AccountedVM(
                        uuid=uuid, node="", memory_mib=memory_mib, vcpus=vcpus, running_here=True, reserved_here=False
                    )
                )
        account = account_node(self.node, vms)
        memtotal, memused, memfree = reading.host or (0, 0, 0)
        values: dict[str, object] = (
            {}
            if reading.host is None
            else {
                self.schema.node_key(self.node, S.NODE_MEMTOTAL): memtotal,
                self.schema.node_key(self.node, S.NODE_MEMUSED): memused,
                self.schema.node_key(self.node, S.NODE_MEMFREE): memfree,
            }
        )
        values |= {
            self.schema.node_key(self.node, S.NODE_MEMALLOC): account.memalloc,
            self.schema.node_key(self.node, S.NODE_MEMPROV): account.memprov,
            self.schema.node_key(self.node, S.NODE_MEMRESERVE): self.config.memory_reserve_mib,
            self.schema.node_key(self.node, S.NODE_VCPUALLOC): account.vcpualloc,
            self.schema.node_key(self.node, S.NODE_CPULOAD): round(os.getloadavg()[0], 2),
            self.schema.node_key(self.node, S.NODE_DOMAINCOUNT): account.domaincount,
            self.schema.node_key(self.node, S.NODE_RUNNINGDOMAINS): sorted(account.running),
            self.schema.node_key(self.node, S.NODE_FIGURES_AGE): round(max(age, 0.0), 3),
            self.schema.node_key(self.node, S.NODE_FIGURES_STALE): stale,
            self.schema.node_key(self.node, S.NODE_KEEPALIVE): round(time.time(), 3),
        }
        return values, account

    def write_figures(self, values: dict, reservations: dict, folds: dict) -> bool:
        """One transaction: the figures, and the reservations they now count deleted, each
        version-checked. Folding also rewrites the reservations znode: a request reads its
        version before this node's figures and checks it in its own transaction, so a request
        that read memprov before this write and the reservations after it fails and plans again
        instead of missing the VM in both."""
        if not folds:
            return self._write(values)
        parent = self.schema.node_reservations(self.node)
        paths = {self.schema.node_reservation(self.node, uuid): version for uuid, version in folds.items()}
        ok = self._write(
            {**values, parent: f"keepalive {round(time.time(), 3)}"}, expect_versions=paths, delete=list(paths)
        )
        if ok:
            log.info("keepalive: memprov now counts %s (their reservations released)", ", ".join(sorted(folds)))
        return ok

    def _write(self, values: dict, expect_versions: dict | None = None, delete=()) -> bool:
        """``commit``: False when a version-checked key changed meanwhile, or the write was
        refused (logged); UnreachableError is the pass's (``run``)."""
        try:
            self.store.commit(values, expect_versions, delete)
        except ConflictError:
            return False
        except UnreachableError:
            raise
        except StoreError as exc:
            log.error("keepalive: write refused: %s", exc)
            return False
        return True

    def run(self, stop: threading.Event) -> None:
        """Tick every interval until ``stop`` is set (a timer, not a synchronisation)."""
        while not stop.is_set():
            try:
                self.tick()
                self._outage.passed()
            except UnreachableError as exc:  # nothing published: the peers see the keepalive age
                self._outage.failed(exc)
            except Exception:  # one bad tick must not end the keepalive
                log.exception("keepalive tick failed")
            stop.wait(self.config.keepalive_interval_s)
