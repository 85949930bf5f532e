"""The node daemon: wiring, registration, the daemon states and an orderly shutdown.

Phases: check (config, libvirt reachable) -> prepare (ZooKeeper, schema, register the node) ->
run (keepalive, reconciler, migration deadlines, flush/ready) -> shutdown on SIGTERM.
Daemon state: init -> run (first keepalive once the VM table is loaded) -> shutdown (SIGTERM) -> stop; peers write `dead`.
VMs keep running when the daemon stops: a daemon restart must never interrupt a guest.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import TYPE_CHECKING

from pvc_cluster_common import _schema as S
from pvc_cluster_common._cluster import read_node_state
from pvc_cluster_common._store import SESSION_CONNECTED, SESSION_LOST, SESSION_SUSPENDED, ClusterStore, StoreError

from .context import DaemonContext
from .domains import DomainTable
from .flush import NodeStateWorker
from .ha import HighAvailability
from .hypervisor import Hypervisor, HypervisorError
from .keepalive import Keepalive
from .log import get_logger
from .migration import MigrationAgent
from .reconciler import Reconciler

if TYPE_CHECKING:
    from .metrics import Metrics

log = get_logger(__name__)


class DaemonError(RuntimeError):
    """The daemon cannot start: libvirt or ZooKeeper unreachable, or the cluster schema refused."""


class NodeDaemon:
    def __init__(self, config) -> None:
        self.config = config
        self.node = config.node
        self.stop_event = threading.Event()
        self.store = ClusterStore(config.zookeeper, logger=logging.getLogger("pvc_node_daemon.store"))
        self.schema = self.store.schema
        # supervised: a libvirtd that restarts, dies or hangs costs a reconnect, not the daemon
        self.hypervisor = Hypervisor(config.libvirt_uri, call_timeout_s=config.libvirt_call_timeout_s, reconnect=True)
        self.metrics: Metrics | None = None
        if config.metrics_enabled:
            from .metrics import Metrics

            self.metrics = Metrics(self.node)
        # what every service shares (invalid values read from ZooKeeper are reported once each)
        self.context = DaemonContext(self.node, config, self.store, self.hypervisor, DomainTable(), self.metrics)
        self.domains = self.context.domains
        self.invalid = self.context.invalid
        self.migrations = MigrationAgent(self.context)
        self.reconciler = Reconciler(self.context, self.migrations)
        self.migrations.deadlines.wake = self.reconciler.enqueue
        self.keepalive = Keepalive(self.context)
        self.node_state = NodeStateWorker(self.context, self.reconciler)
        self.ha = HighAvailability(self.context, self.migrations)
        self.hypervisor.add_health_listener(self._on_libvirt_health)
        self.hypervisor.add_reconnect_listener(self._after_libvirt_reconnect)
        self.threads: list[threading.Thread] = []
        self._session_lost = threading.Event()

    # ---- start-up ---------------------------------------------------------------------------

    def check(self) -> None:
        try:
            self.hypervisor.open()
        except HypervisorError as exc:
            raise DaemonError(f"cannot reach libvirt at {self.config.libvirt_uri}: {exc}") from None
        log.system("libvirt: connected to %s", self.config.libvirt_uri)

    def prepare(self) -> None:
        if self.config.zookeeper.insecure:
            log.warning(
                "INSECURE: insecure is true: this daemon uses ZooKeeper without authentication and creates "
                "znodes anyone can read and write; anyone who reaches ZooKeeper can define a VM on this host"
            )
        try:
            self.store.start()
        except StoreError as exc:
            raise DaemonError(str(exc)) from None
        try:
            self.store.ensure_schema()
        except StoreError as exc:
            raise DaemonError(f"cannot create or verify the cluster schema in ZooKeeper: {exc}") from None
        try:
            self.register()
        except StoreError as exc:
            raise DaemonError(f"cannot register node {self.node} in ZooKeeper: {exc}") from None
        self.store.add_session_listener(self._on_connection_state)
        log.system("ZooKeeper: connected to %s, cluster root %s", self.config.zookeeper.hosts, self.schema.root or "/")

    def register(self) -> None:
        """Create this node's keys (keeping its domain state), publish its address (and, for
        people, its URIs), mark it alive."""
        self.secure_own_keys()
        # how its peers left it: fenced (by a verdict) means its VMs may run elsewhere, so it
        # stays flushed; every claim and verdict about its earlier states is answered by `init`
        before = read_node_state(self.store, self.node)
        values: dict[str, object] = {}
        delete: list[str] = []
        for key, default in S.NODE_DEFAULTS.items():
            path = self.schema.node_key(self.node, key)
            if key in (S.NODE_DOMAIN_STATE, S.NODE_MAINTENANCE) and self.store.exists(path):
                continue  # an operator's choice survives a restart (a fenced node stays flushed)
            values[path] = default
        if not self.store.exists(self.schema.node_reservations(self.node)):
            # created here: other nodes reserve memory in it, but may not create it under this node
            values[self.schema.node_reservations(self.node)] = ""
        if not self.store.exists(self.schema.node_fences(self.node)):
            values[self.schema.node_fences(self.node)] = ""  # this node's records of the peers it fences
        if not self.store.exists(self.schema.node_claims(self.node)):
            values[self.schema.node_claims(self.node)] = ""  # where peers claim its states to fence it
        else:
            claims = self.store.list_children(self.schema.node_claims(self.node), missing_ok=True)
            delete += [self.schema.node_claims(self.node) + "/" + claim for claim in claims]
        if before is not None and before.by_verdict and before.daemon_state == "fenced":
            values[self.schema.node_key(self.node, S.NODE_DOMAIN_STATE)] = "flushed"
            log.warning(
                "node %s was fenced by %s while it was away: it stays flushed until it is made ready",
                self.node,
                before.verdict.get("by", "?"),
            )
        values[self.schema.node_key(self.node, S.NODE_DAEMON_STATE)] = "init"
        values[self.schema.node_key(self.node, S.NODE_ADDRESS)] = self.config.published_address
        values[self.schema.node_key(self.node, S.NODE_LIBVIRT_URI)] = self.config.advertised_libvirt_uri
        values[self.schema.node_key(self.node, S.NODE_TRANSPORT_URI)] = self.config.advertised_transport_uri
        values[self.schema.node_key(self.node, S.NODE_MEMRESERVE)] = self.config.memory_reserve_mib
        values[self.schema.node_key(self.node, S.NODE_LIBVIRT)] = self.hypervisor.health
        try:
            # what the modules check a VM's vCPU count against (it does not change while libvirtd runs)
            values[self.schema.node_key(self.node, S.NODE_CPUTOTAL)] = self.hypervisor.host_cpus()
        except HypervisorError as exc:
            log.warning("cannot read the host's CPU count from libvirt; published as 0 (unknown): %s", exc)
        keep = {
            S.NODE_KEEPALIVE,
            S.NODE_MEMTOTAL,
            S.NODE_MEMUSED,
            S.NODE_MEMFREE,
            S.NODE_MEMALLOC,
            S.NODE_MEMPROV,
            S.NODE_VCPUALLOC,
            S.NODE_CPULOAD,
            S.NODE_DOMAINCOUNT,
            S.NODE_RUNNINGDOMAINS,
        }
        for key in keep:  # figures survive a restart until the first keepalive replaces them
            path = self.schema.node_key(self.node, key)
            if self.store.exists(path):
                values.pop(path, None)
        self.store.commit(values, delete=delete)
        self.mark_alive()
        log.ok("node %s registered (daemon state init)", self.node)

    def secure_own_keys(self) -> None:
        """Check the ACLs of this node's keys that exist (secure those an older version or an
        open cluster left open to anyone); refuse to start on a node znode secured for another
        identity (someone registered this node's name first)."""
        node = self.schema.node(self.node)
        paths = [node, self.schema.node_reservations(self.node), self.schema.node_claims(self.node)] + [
            self.schema.node_key(self.node, key) for key in S.NODE_DEFAULTS
        ]
        try:
            found = self.store.get_many(paths)
            self.store.check_acls([path for path in paths if found[path] is not None])
            own = found[node]
            if self.store.secured and own is not None:
                # ZooKeeper shows this identity the ACL's usernames, not their hashes: whether the
                # node znode is really this node's own is told by writing it (its data is unused)
                self.store.commit({node: own.value})
        except StoreError as exc:
            raise DaemonError(
                f"cannot secure the keys of node {self.node} (is another identity registered under its "
                f"name? only the operator can remove {node}): {exc}"
            ) from None

    def mark_alive(self) -> None:
        """(Re)create the ephemeral liveness znode for the current session."""
        path = self.schema.node_key(self.node, S.NODE_ALIVE)
        data = f"{socket.gethostname()} pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode()
        try:
            self.store.put_ephemeral(path, data)
        except StoreError as exc:  # not connected, or the session changed meanwhile
            log.error("cannot mark node %s alive: %s", self.node, exc)

    def _on_connection_state(self, state: str) -> None:
        # called on the store's connection thread, which must not block: only record and wake.
        if self.stop_event.is_set():
            return  # our own orderly disconnect
        if state != SESSION_CONNECTED:
            self.ha.on_connection(False)  # no session, no decisions about peers
        if state == SESSION_LOST:
            self._session_lost.set()
            log.warning("ZooKeeper session lost: no new work until it is re-established")
        elif state == SESSION_SUSPENDED:
            log.warning("ZooKeeper connection suspended: waiting for it to come back")
        elif state == SESSION_CONNECTED:
            log.info("ZooKeeper connection (re)established")
            threading.Thread(target=self._after_reconnect, name="reconnect", daemon=True).start()

    def _on_libvirt_health(self, health: str, reason: str) -> None:
        """The connection to libvirtd changed health (from the driver's supervisor thread):
        publish it at once, so that placement stops (or resumes) choosing this node without
        waiting for the next keepalive, which publishes it too."""
        if self.metrics:
            self.metrics.libvirt(health)
        if health == "ok":
            log.ok("libvirt: connection to %s healthy again", self.config.libvirt_uri)
        else:
            log.warning("libvirt: %s (%s): this node takes no migrations until it reconnects", health, reason)
        if self.stop_event.is_set() or not self.store.connected:
            return
        self._publish_libvirt(health)

    def _publish_libvirt(self, health: str) -> None:
        try:
            self.store.commit({self.schema.node_key(self.node, S.NODE_LIBVIRT): health})
        except StoreError as exc:  # written again after the next reconnection, and by every keepalive
            log.warning("cannot publish libvirt health %s: %s", health, exc)

    def _after_libvirt_reconnect(self) -> None:
        """A new libvirt connection (from the driver's supervisor thread): whatever happened
        while there was none (a migration's libvirt job ended, a guest stopped, libvirtd
        cancelled a job when it died) came with no event: list the domains again and pass over
        every VM that concerns this node."""
        if self.metrics:
            self.metrics.libvirt_reconnects.inc()
        if self.stop_event.is_set() or not self.store.connected:
            return
        self.reconciler.resync()

    def _after_reconnect(self) -> None:
        try:
            # a libvirt health change written while ZooKeeper was away is lost: write it again
            self._publish_libvirt(self.hypervisor.health)
            if self._session_lost.is_set():
                self._session_lost.clear()
                self.mark_alive()
                self.reconciler.rewatch()  # a new session has none of the old watches
            # every view may be stale: reconcile every VM from fresh reads
            self.reconciler.resync()
        except StoreError as exc:  # gone again: the next reconnection does all this again
            log.warning("after the reconnection to ZooKeeper: %s", exc)
        finally:
            self.ha.on_connection(True)  # every peer gets a whole detection window again

    # ---- run --------------------------------------------------------------------------------

    def _thread(self, target, name: str) -> None:
        thread = threading.Thread(target=target, args=(self.stop_event,), name=name, daemon=True)
        thread.start()
        self.threads.append(thread)

    def run(self) -> None:
        """Start the daemon's work; returns once its state is loaded (the node registered and
        running, the VM table read, a first pass queued): the CLI then tells systemd it is ready."""
        if self.metrics:
            self.metrics.serve(self.config.metrics_address, self.config.metrics_port)
            self.metrics.libvirt(self.hypervisor.health)
        self.migrations.start()
        self.reconciler.start()
        # The first keepalive writes `run` and the node's memory figures: not before the VM
        # table is loaded, or it would publish a full node as empty (docs/architecture.md,
        # "Memory accounting"). Bounded: a keepalive that finds the table still loading
        # publishes only its timestamp, and the state stays `init` until a later one.
        self.keepalive.table_loaded = self.reconciler.table_loaded
        self.keepalive.reader.start(self.stop_event)  # vm-thread: libvirt's figures, read apart from the keepalive
        if not self.reconciler.wait_loaded(self.config.step_timeout_s):
            log.warning(
                "the VM table is not loaded after %.0f s; the node stays in state init until it is",
                self.config.step_timeout_s,
            )
        # the first keepalive waits (bounded) for vm-thread's first figures; later ones never wait
        self.keepalive.tick(wait_for_read_s=min(self.config.keepalive_interval_s, self.config.libvirt_call_timeout_s))
        self._thread(self.migrations.deadlines.run, "deadlines")
        self._thread(self.keepalive.run, "keepalive")
        self._thread(self.reconciler.run, "reconciler")
        self._thread(self.ha.run, "ha")
        self.node_state.start()
        self.reconciler.resync()
        log.ok("node %s running", self.node)

    def wait(self) -> None:
        # a bounded wait in a loop, so that signals are handled promptly on every Python version
        while not self.stop_event.wait(3600):
            continue

    def _shutdown_write(self, values: dict, delete=()) -> None:
        try:
            self.store.commit(values, delete=delete)
        except StoreError as exc:  # the peers see the session end (alive goes) all the same
            log.warning("shutdown: cannot record %s: %s", ", ".join(sorted(values)), exc)

    def request_stop(self) -> None:
        self.stop_event.set()

    # ---- shutdown ---------------------------------------------------------------------------

    def shutdown(self, timeout_s: float = 60.0) -> None:
        """Record `shutdown`, let in-flight VM work finish (bounded), record `stop`, disconnect."""
        log.system("node %s shutting down", self.node)
        self.stop_event.set()
        if self.store.connected:
            self._shutdown_write({self.schema.node_key(self.node, S.NODE_DAEMON_STATE): "shutdown"})
        self.node_state.stop()
        self.reconciler.accepting.clear()
        if not self.reconciler.wait_idle(timeout_s):
            log.warning("VM work still running after %.0f s; stopping anyway (the next start resolves it)", timeout_s)
        if self.store.connected:
            self._shutdown_write(
                {
                    self.schema.node_key(self.node, S.NODE_DAEMON_STATE): "stop",
                    self.schema.node_key(self.node, S.NODE_KEEPALIVE): round(time.time(), 3),
                },
                delete=[self.schema.node_key(self.node, S.NODE_ALIVE)],
            )
        if self.metrics:
            self.metrics.stop()
        self.store.stop()
        self.hypervisor.close()
        log.ok("node %s stopped (daemon state stop)", self.node)
