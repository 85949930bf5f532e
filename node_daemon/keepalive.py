"""The keepalive: every interval, one ZooKeeper transaction with this node's figures.

VM figures come from libvirt in a named subthread (``vm-thread``) with a deadline, so a hung
libvirt call delays nothing: the keepalive then writes the host figures, the timestamp and the
last VM figures it had, and says so. Statistics are gathered only for running domains; paused
(including incoming migrations) and shut-off domains are skipped before any statistics call.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field

from pvc_cluster_common import _schema as S
from pvc_cluster_common._memory import AccountedVM, NodeAccount, account_node

from .domains import DomainTable
from .hypervisor import HypervisorError
from .log import get_logger
from .reconciler import ACCOUNTING_KEYS

log = get_logger(__name__)

STATS_EVERY = 6


@dataclass
class VMFigures:
    """What vm-thread learned from libvirt in one pass."""

    running: dict[str, tuple[int, int]] = field(default_factory=dict)   # uuid -> (max memory MiB, vCPUs)
    states: dict[str, str] = field(default_factory=dict)               # uuid -> libvirt state name
    stats: dict[str, dict] = field(default_factory=dict)                # uuid -> memory statistics (running only)


class Keepalive:
    def __init__(self, node, config, store, hypervisor, domains: DomainTable, metrics=None) -> None:
        self.node = node
        self.config = config
        self.store = store
        self.schema = store.schema
        self.hypervisor = hypervisor
        self.domains = domains
        self.metrics = metrics
        self.last_vm_figures = VMFigures()
        self.last_host_memory: tuple[int, int, int] | None = None   # (total, used, free) MiB
        self._vm_thread: threading.Thread | None = None
        self.ticks = 0
        self.host_memory_read = False
        # whether the VM table is loaded (set by the daemon: Reconciler.table_loaded)
        self.table_loaded = lambda: True

    # ---- vm-thread ------------------------------------------------------------------------

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
            figures.stats[uuid] = {"state": state, "memory_mib": maximum, "vcpus": vcpus,
                                   "memory_stats": stats or {}, "updated": round(time.time(), 3)}
        return figures

    def _run_vm_thread(self, holder: dict, with_stats: bool) -> None:
        try:
            holder["figures"] = self.gather_vm_figures(with_stats)
        except Exception as exc:  # the keepalive must survive any libvirt failure
            holder["error"] = exc

    def collect_vm_figures(self, deadline_s: float, with_stats: bool = True) -> tuple[VMFigures, bool]:
        """Run vm-thread with a deadline. Returns the figures and whether they are fresh."""
        if self._vm_thread is not None and self._vm_thread.is_alive():
            log.warning("vm-thread from an earlier keepalive is still blocked in libvirt; using the last VM figures")
            return self.last_vm_figures, False
        holder: dict = {}
        thread = threading.Thread(target=self._run_vm_thread, args=(holder, with_stats), name="vm-thread", daemon=True)
        self._vm_thread = thread
        thread.start()
        thread.join(deadline_s)
        if thread.is_alive():
            log.warning("vm-thread did not finish within %.1f s (libvirt is slow or hung); using the last VM figures", deadline_s)
            return self.last_vm_figures, False
        if "error" in holder:
            log.error("vm-thread failed: %s; using the last VM figures", holder["error"])
            return self.last_vm_figures, False
        self.last_vm_figures = holder["figures"]
        return self.last_vm_figures, True

    # ---- one keepalive ----------------------------------------------------------------------

    def tick(self) -> bool:
        started = time.monotonic()
        deadline = max(0.1, min(self.config.keepalive_interval_s * 0.8, self.config.libvirt_call_timeout_s))
        # Per-VM statistics are for people, not placement: gathered and published every
        # STATS_EVERY keepalives, which keeps both the libvirt calls and the transaction small
        # on a node with many VMs.
        with_stats = self.ticks % STATS_EVERY == 0
        figures, fresh = self.collect_vm_figures(deadline, with_stats)

        try:
            host_memory = self.hypervisor.host_memory_mib()
            self.last_host_memory = host_memory
        except HypervisorError as exc:
            # Published zeros would read as "no room" to every placement decision: the figures
            # published last stay until a keepalive can read them again.
            log.warning("main-thread: cannot read host memory (the last published figures stay): %s", exc)
            host_memory = None
        self.host_memory_read = host_memory is not None
        memtotal, memused, memfree = self.last_host_memory or (0, 0, 0)

        if not self.table_loaded():
            # Figures computed from a table that does not know every VM yet would leave VMs out
            # (after a start, memprov 0 on a full node): only the timestamp goes out, and the
            # daemon state stays `init` (no placement) until the table is loaded.
            ok = self.store.write({self.schema.node_key(self.node, S.NODE_KEEPALIVE): round(time.time(), 3)})
            self.ticks += 1
            log.info("keepalive: the VM table is still loading; no memory figures published yet")
            return ok
        snapshot = self.domains.snapshot()   # never iterate the live table: watches mutate it
        reservations = self.read_reservations()
        folds = self.foldable(reservations, snapshot)
        values, account = self.figures(figures, snapshot, reservations, folds)
        state = self.store.read(self.schema.node_key(self.node, S.NODE_DAEMON_STATE))
        if state in ("init", "dead", "fence-failed") or state not in S.DAEMON_STATES:
            # the first keepalive after start, or a node its peers thought dead or failed to fence
            # (its VMs were never recovered elsewhere), or whose state someone overwrote with
            # garbage: it lives. Never over `fencing` (a peer is powering this node off) or
            # `fenced` (its VMs may run elsewhere now; only a restarted daemon, which registers
            # with `init`, runs again).
            values[self.schema.node_key(self.node, S.NODE_DAEMON_STATE)] = "run"
        if fresh and with_stats:
            for uuid, stats in figures.stats.items():
                if uuid in snapshot and snapshot[uuid].node == self.node:
                    values[self.schema.domain_key(uuid, S.DOMAIN_STATS)] = stats
        ok = self.write_figures(values, reservations, folds)
        if not ok and folds:
            # a reservation changed since it was read: publish without folding any (next tick)
            values |= self.figures(figures, snapshot, reservations, {})[0]
            ok = self.store.write(values)
        elapsed = time.monotonic() - started
        self.ticks += 1
        if self.metrics:
            self.metrics.keepalive(elapsed, ok, account, memtotal, memused, memfree, snapshot, self.node)
        if ok:
            log.tick("keepalive: %d VMs running, memory total/used/free %d/%d/%d MiB, alloc %d, prov %d, %.2fs",
                     account.domaincount, memtotal, memused, memfree, account.memalloc, account.memprov, elapsed)
        else:
            log.error("keepalive: could not write this node's figures (see the store's error above)")
        return ok

    # ---- accounting -------------------------------------------------------------------------

    def read_reservations(self) -> dict[str, tuple[str, int]]:
        """This node's incoming reservations: uuid -> (stored amount, znode version)."""
        parent = self.schema.node_reservations(self.node)
        names = self.store.children(parent) or []
        found = self.store.read_many([self.schema.node_reservation(self.node, uuid) for uuid in names])
        return {uuid: found[self.schema.node_reservation(self.node, uuid)] for uuid in names
                if found[self.schema.node_reservation(self.node, uuid)] is not None}

    def foldable(self, reservations: dict, snapshot: dict) -> dict[str, int]:
        """Reservations this keepalive replaces by counting their VM in memprov, in the same
        transaction that deletes them (uuid -> reservation version): those of VMs the table
        knows to be assigned here with no migration in flight (a migration that ended here, or
        an abort that gave the VM back to this node), their memory known from a valid XML.

        Only this keepalive deletes a reservation its node still needs, and only together with
        a memprov that counts the VM: so a VM assigned here is covered at every instant, by the
        reservation or by memprov (docs/architecture.md, "Memory accounting").
        """
        folds = {}
        for uuid, (_, version) in reservations.items():
            record = snapshot.get(uuid)
            if (record is not None and record.has(*ACCOUNTING_KEYS) and record.node == self.node
                    and record.migration is None and not record.migration_error and record.xml_ok):
                folds[uuid] = version
        return folds

    def figures(self, figures: VMFigures, snapshot: dict, reservations: dict, folds: dict) -> tuple[dict, NodeAccount]:
        """The node keys of this keepalive's accounting, and the account they come from."""
        vms = []
        for uuid, record in snapshot.items():
            reserved = uuid in reservations and uuid not in folds
            if uuid in figures.running:
                memory_mib, vcpus = figures.running[uuid]
                running = figures.states.get(uuid) in ("running", "blocked", "paused", "pmsuspended")
                if record.node == self.node and record.xml_ok:
                    memory_mib = max(memory_mib, record.memory_mib)   # what its reservation held
            elif record.node == self.node:
                memory_mib, vcpus, running = record.memory_mib, record.vcpus, False
            else:
                continue
            vms.append(AccountedVM(uuid=uuid, node=record.node, memory_mib=memory_mib, vcpus=vcpus,
                                   running_here=running, reserved_here=reserved))
        # Domains libvirt runs here that ZooKeeper does not know still use memory.
        for uuid, (memory_mib, vcpus) in figures.running.items():
            if uuid not in snapshot:
                vms.append(AccountedVM(uuid=uuid, node="", memory_mib=memory_mib, vcpus=vcpus,
                                       running_here=True, reserved_here=False))
        account = account_node(self.node, vms)
        memtotal, memused, memfree = self.last_host_memory or (0, 0, 0)
        values = {} if not self.host_memory_read else {
            self.schema.node_key(self.node, S.NODE_MEMTOTAL): memtotal,
            self.schema.node_key(self.node, S.NODE_MEMUSED): memused,
            self.schema.node_key(self.node, S.NODE_MEMFREE): memfree,
        }
        values |= {
            self.schema.node_key(self.node, S.NODE_MEMALLOC): account.memalloc,
            self.schema.node_key(self.node, S.NODE_MEMPROV): account.memprov,
            self.schema.node_key(self.node, S.NODE_MEMRESERVE): self.config.memory_reserve_mib,
            self.schema.node_key(self.node, S.NODE_VCPUALLOC): account.vcpualloc,
            self.schema.node_key(self.node, S.NODE_CPULOAD): round(os.getloadavg()[0], 2),
            self.schema.node_key(self.node, S.NODE_DOMAINCOUNT): account.domaincount,
            self.schema.node_key(self.node, S.NODE_RUNNINGDOMAINS): sorted(account.running),
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
            return self.store.write(values)
        parent = self.schema.node_reservations(self.node)
        paths = {self.schema.node_reservation(self.node, uuid): version for uuid, version in folds.items()}
        ok = self.store.write({**values, parent: f"keepalive {round(time.time(), 3)}"}, expect_versions=paths,
                              delete=list(paths))
        if ok:
            log.info("keepalive: memprov now counts %s (their reservations released)", ", ".join(sorted(folds)))
        return ok

    def run(self, stop: threading.Event) -> None:
        """Tick every interval until ``stop`` is set (a timer, not a synchronisation)."""
        while not stop.is_set():
            try:
                self.tick()
            except Exception:  # one bad tick must not end the keepalive
                log.exception("keepalive tick failed")
            stop.wait(self.config.keepalive_interval_s)
