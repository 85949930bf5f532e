# -*- coding: utf-8 -*-
# Copyright: pvc.cluster developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The node daemon's driver for the local hypervisor: a small interface over libvirt-python.

Design
======

* **One connection per driver.** ``Hypervisor(uri)`` opens one libvirt connection in ``open()``
  and every thread of the daemon shares it (libvirt connections are thread-safe). The driver never
  opens a second connection to its own URI: the ``test:///<file>`` driver keeps a private state
  per connection, so a second connection would see a different "host". (Managed migration opens a
  short-lived connection to the *destination* URI; that is another host.)

* **Every call that can block has a timeout.** Each libvirt call runs in a daemon thread of its
  own (an idle one reused, see ``threads.py``) and the caller waits at most ``call_timeout_s``
  for it (``migrate`` has its own ``timeout_s``). On timeout the caller gets
  ``HypervisorTimeout``; the stuck thread is *abandoned*: Python cannot interrupt a thread
  blocked inside libvirt, so it stays blocked until libvirt returns (or the process exits; it is
  a daemon thread, so it never delays exit), and only then serves again. ``abandoned_calls``
  counts them.
  With a real libvirtd, client keepalive (below) makes libvirt fail the calls of a dead
  connection, so abandoned threads do end eventually.

* **Errors.** A ``libvirt.libvirtError`` becomes ``HypervisorError(op, domain, code, message)``;
  "no such domain" is the subclass ``DomainNotFound``. libvirt's own printing of every error to
  stderr is switched off (``registerErrorHandler``).

* **Events.** With ``events=True`` (the default) the process-wide libvirt default event loop is
  registered (``virEventRegisterDefaultImpl``, before the connection is opened) and run by one
  daemon thread, ``libvirt-events``. It delivers lifecycle events, which ``shutdown()`` waits on,
  and it lets a remote connection use keepalive (the driver asks for 5 s x 3 probes). Listeners
  added with ``add_lifecycle_listener`` run on that thread and must neither block nor call libvirt.
  ``shutdown()`` also polls the state every ``poll_interval_s`` (0.5 s) as a safety net, so it works
  without events too.

* **Domains are named by UUID** everywhere (lowercase canonical form in results).

* **memory_stats() only for running domains.** It reads the state first and returns None for
  every state but ``running`` *without* calling ``memoryStats()``: on a paused domain (an incoming
  live migration is paused) ``memoryStats()`` can block for a long time, which in PVC 0.9.1 hung
  the keepalive and got the node fenced.

* **Host memory.** ``host_memory_mib()`` uses ``virNodeGetMemoryStats`` (all cells). The test
  driver does not support it (VIR_ERR_NO_SUPPORT); then the driver reads the local
  ``/proc/meminfo`` instead, which is right only when libvirt runs on this host (always so for
  the node daemon). ``getInfo()`` is not used for memory: it reports NUMA node 0 only on some hosts.

* **Migration** (``migrate()``): peer-to-peer ``migrateToURI3`` by default, or managed ``migrate3``
  over a short-lived connection to ``dest_uri``. ``migration_uri`` goes into
  ``VIR_MIGRATE_PARAM_URI`` (needed when libvirt would otherwise resolve the destination's
  hostname to the wrong address, as in the lab whose hosts share one kernel).
  ``PERSIST_DEST | UNDEFINE_SOURCE`` are set only for persistent domains (the daemon normally runs
  transient domains created from the XML in ZooKeeper). A maximum downtime is applied with
  ``migrateSetMaxDowntime`` on the source domain *just before* the migration starts: QEMU keeps the
  value as its ``downtime-limit`` migration parameter and libvirt does not reset it when the job
  starts, so there is no need to race a second thread against the running job. When the
  migration does not finish within ``timeout_s``, the driver calls ``abortJob()`` and raises
  ``HypervisorTimeout``; if the migration completes while being aborted, that is a success.
  ``prepare_migration()`` makes those calls ahead of time (the lookup, whether the domain is
  persistent, the maximum downtime) and returns a ``MigrationSetup`` that ``migrate()`` takes
  instead of making them again, as long as no lifecycle event of the domain has come since (a
  domain stopped and started again is another QEMU process, without the downtime).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import libvirt

from .log import get_logger
from .threads import ReusableThreads

__all__ = [
    "DomainNotFound",
    "DomainRef",
    "DomainStatus",
    "Hypervisor",
    "HypervisorError",
    "HypervisorTimeout",
    "LIFECYCLE_EVENTS",
    "MigrationSetup",
    "STATE_NAMES",
    "ACTIVE_STATES",
    "RUNNING_STATES",
    "read_meminfo_mib",
]

log = get_logger(__name__)

# ---- names -----------------------------------------------------------------------------------

STATE_NAMES = {
    libvirt.VIR_DOMAIN_NOSTATE: "nostate",
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "blocked",
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTDOWN: "shutdown",
    libvirt.VIR_DOMAIN_SHUTOFF: "shutoff",
    libvirt.VIR_DOMAIN_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "pmsuspended",
}

# The daemon's one vocabulary of domain states (names of STATE_NAMES), used by every module.
# Active: the domain's QEMU process exists here, so it holds this host's memory and must not be
# started anywhere else: running, blocked, paused (an incoming migration's copy is paused until
# the switch-over), being shut down, or suspended to memory.
ACTIVE_STATES = frozenset({"running", "blocked", "paused", "shutdown", "pmsuspended"})
# Running: the guest runs (its vCPUs run, or wait on the host).
RUNNING_STATES = frozenset({"running", "blocked"})

# Reason codes per state (virDomain<State>Reason). Written out, because the constant prefixes
# collide with flag names (VIR_DOMAIN_SHUTDOWN_* are also shutdown-method flags).
_REASON_SUFFIXES = {
    "nostate": ("UNKNOWN",),
    "running": ("UNKNOWN", "BOOTED", "MIGRATED", "RESTORED", "FROM_SNAPSHOT", "UNPAUSED",
                "MIGRATION_CANCELED", "SAVE_CANCELED", "WAKEUP", "CRASHED", "POSTCOPY", "POSTCOPY_FAILED"),
    "blocked": ("UNKNOWN",),
    "paused": ("UNKNOWN", "USER", "MIGRATION", "SAVE", "DUMP", "IOERROR", "WATCHDOG", "FROM_SNAPSHOT",
               "SHUTTING_DOWN", "SNAPSHOT", "CRASHED", "STARTING_UP", "POSTCOPY", "POSTCOPY_FAILED"),
    "shutdown": ("UNKNOWN", "USER"),
    "shutoff": ("UNKNOWN", "SHUTDOWN", "DESTROYED", "CRASHED", "MIGRATED", "SAVED", "FAILED",
                "FROM_SNAPSHOT", "DAEMON"),
    "crashed": ("UNKNOWN", "PANICKED"),
    "pmsuspended": ("UNKNOWN",),
}
_REASON_NAMES = {
    state: {
        getattr(libvirt, f"VIR_DOMAIN_{state.upper()}_{suffix}"): suffix.lower()
        for suffix in suffixes
        if hasattr(libvirt, f"VIR_DOMAIN_{state.upper()}_{suffix}")
    }
    for state, suffixes in _REASON_SUFFIXES.items()
}

LIFECYCLE_EVENTS = {
    libvirt.VIR_DOMAIN_EVENT_DEFINED: "defined",
    libvirt.VIR_DOMAIN_EVENT_UNDEFINED: "undefined",
    libvirt.VIR_DOMAIN_EVENT_STARTED: "started",
    libvirt.VIR_DOMAIN_EVENT_SUSPENDED: "suspended",
    libvirt.VIR_DOMAIN_EVENT_RESUMED: "resumed",
    libvirt.VIR_DOMAIN_EVENT_STOPPED: "stopped",
    libvirt.VIR_DOMAIN_EVENT_SHUTDOWN: "shutdown",
    libvirt.VIR_DOMAIN_EVENT_PMSUSPENDED: "pmsuspended",
    libvirt.VIR_DOMAIN_EVENT_CRASHED: "crashed",
}

# ---- errors ----------------------------------------------------------------------------------


class HypervisorError(Exception):
    """A libvirt operation failed. ``code`` is libvirt's error code (None when not from libvirt)."""

    def __init__(self, op: str, domain: str | None, code: int | None, message: str) -> None:
        super().__init__(op, domain, code, message)
        self.op = op
        self.domain = domain
        self.code = code
        self.message = message

    def __str__(self) -> str:
        where = f" on domain {self.domain}" if self.domain else ""
        code = f" (libvirt error {self.code})" if self.code is not None else ""
        return f"{self.op}{where} failed: {self.message}{code}"


class HypervisorTimeout(HypervisorError):
    """A libvirt call did not return in time. The thread running it was abandoned."""


class DomainNotFound(HypervisorError):
    """libvirt does not know the domain (VIR_ERR_NO_DOMAIN)."""


def _translate(op: str, domain: str | None, exc: libvirt.libvirtError) -> HypervisorError:
    code = exc.get_error_code()
    message = exc.get_error_message() or str(exc)
    cls = DomainNotFound if code == libvirt.VIR_ERR_NO_DOMAIN else HypervisorError
    return cls(op, domain, code, message)


# ---- values ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DomainStatus:
    """A domain's state name (see STATE_NAMES) and libvirt's reason code for it."""

    state: str
    reason: int = 0

    @classmethod
    def from_libvirt(cls, state: int, reason: int) -> DomainStatus:
        return cls(STATE_NAMES.get(state, "nostate"), reason)

    @property
    def reason_name(self) -> str:
        """The reason as a word ("booted", "migrated", "destroyed", ...), or "reason <n>"."""
        return _REASON_NAMES.get(self.state, {}).get(self.reason, f"reason {self.reason}")

    @property
    def running(self) -> bool:
        return self.state in RUNNING_STATES

    def __str__(self) -> str:
        return f"{self.state} ({self.reason_name})"


@dataclass(frozen=True)
class DomainRef:
    uuid: str
    name: str
    status: DomainStatus


@dataclass(frozen=True)
class MigrationSetup:
    """A domain made ready for ``Hypervisor.migrate()`` by ``prepare_migration()``: looked up,
    its persistence known, its maximum downtime applied. ``events_before``: the driver's
    lifecycle event count when the setup began; a later event of the domain makes the setup
    stale (see ``Hypervisor.setup_is_current``)."""

    uuid: str
    max_downtime_ms: int | None
    persistent: bool
    domain: Any = None         # the libvirt.virDomain looked up
    connection: Any = None     # the libvirt.virConnect it belongs to
    events_before: int = 0


# ---- the libvirt event loop (one per process) -----------------------------------------------

_event_loop_lock = threading.Lock()
_event_loop_thread: threading.Thread | None = None
_error_handler_lock = threading.Lock()
_error_handler_set = False


def _silence_libvirt_stderr() -> None:
    global _error_handler_set
    with _error_handler_lock:
        if not _error_handler_set:
            libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
            _error_handler_set = True


def _run_event_loop() -> None:
    while True:
        try:
            libvirt.virEventRunDefaultImpl()
        except Exception:  # keep the loop alive whatever happens in one iteration
            log.exception("libvirt event loop iteration failed")
            time.sleep(0.1)   # backoff, so a persistent failure does not spin the CPU


def ensure_event_loop() -> None:
    """Register libvirt's default event implementation and start its thread, once per process."""
    global _event_loop_thread
    with _event_loop_lock:
        if _event_loop_thread is not None:
            return
        libvirt.virEventRegisterDefaultImpl()
        thread = threading.Thread(target=_run_event_loop, name="libvirt-events", daemon=True)
        thread.start()
        _event_loop_thread = thread


# ---- calls with a timeout ------------------------------------------------------------------


# Threads that run libvirt calls, shared by every connection in the process. Kept idle for
# reuse: the test driver answers in microseconds, and a new thread per call cost more than that.
_CALLERS = ReusableThreads("libvirt", keep_idle=4)


class _Call:
    """One libvirt call running in a thread of its own (until it returns)."""

    def __init__(self, op: str, domain: str | None, fn: Callable[[], Any]) -> None:
        self.op = op
        self.domain = domain
        self._fn = fn
        self._done = threading.Event()
        self._value: Any = None
        self._error: BaseException | None = None

    def _run(self) -> None:
        try:
            self._value = self._fn()
        except BaseException as exc:  # handed to the waiting caller
            self._error = exc
        finally:
            self._done.set()

    def start(self) -> _Call:
        _CALLERS.submit(self._run, name=f"libvirt-{self.op}")
        return self

    def wait(self, timeout_s: float | None) -> bool:
        return self._done.wait(timeout_s)

    def result(self) -> Any:
        if self._error is not None:
            if isinstance(self._error, libvirt.libvirtError):
                raise _translate(self.op, self.domain, self._error)
            raise self._error
        return self._value


# ---- /proc/meminfo ---------------------------------------------------------------------------


def read_meminfo_mib(path: str = "/proc/meminfo") -> tuple[int, int, int]:
    """(total, used, free) MiB from a meminfo file; used = total - free - buffers - cached."""
    values: dict[str, int] = {}
    with open(path, encoding="ascii") as handle:
        for line in handle:
            key, _, rest = line.partition(":")
            fields = rest.split()
            if fields and fields[0].isdigit():
                values[key.strip()] = int(fields[0])  # kB in meminfo means KiB
    try:
        total, free = values["MemTotal"], values["MemFree"]
    except KeyError as exc:
        raise ValueError(f"{path} has no {exc.args[0]} line") from None
    return _memory_triplet(total, free, values.get("Buffers", 0), values.get("Cached", 0))


def _memory_triplet(total_kib: int, free_kib: int, buffers_kib: int, cached_kib: int) -> tuple[int, int, int]:
    used_kib = max(0, total_kib - free_kib - buffers_kib - cached_kib)
    return total_kib // 1024, used_kib // 1024, free_kib // 1024


# ---- the driver ----------------------------------------------------------------------------


class Hypervisor:
    """The local hypervisor, through one libvirt connection. See the module docstring.

    ``uri``: e.g. ``qemu:///system``, ``qemu+unix:///system?socket=/path/libvirt-sock``,
    ``test:///default`` or ``test:///abs/path/node.xml``. ``call_timeout_s``: the longest any one
    libvirt call may take. ``events``: use libvirt lifecycle events (see above).
    ``poll_interval_s``: how often ``shutdown()`` re-reads the state while waiting.
    ``meminfo_path``: the fallback for host memory when libvirt cannot report it.
    """

    # Client keepalive for remote connections: probe after 5 s idle, give up after 3 lost probes.
    KEEPALIVE_INTERVAL_S = 5
    KEEPALIVE_COUNT = 3

    def __init__(
        self,
        uri: str,
        call_timeout_s: float = 30.0,
        *,
        events: bool = True,
        poll_interval_s: float = 0.5,
        meminfo_path: str = "/proc/meminfo",
    ) -> None:
        if call_timeout_s <= 0:
            raise ValueError(f"call_timeout_s must be positive, got {call_timeout_s}")
        self.uri = uri
        self.call_timeout_s = float(call_timeout_s)
        # How long migrate() waits for the migrate call to return after abortJob().
        self.abort_wait_s = float(call_timeout_s)
        self.poll_interval_s = float(poll_interval_s)
        self.meminfo_path = meminfo_path
        self.abandoned_calls = 0
        self._counter_lock = threading.Lock()
        self._events = events
        self._conn: libvirt.virConnect | None = None
        self._lifecycle_cb_id: int | None = None
        self._open_lock = threading.Lock()
        self._state_changed = threading.Condition()
        self._event_seq = 0
        # uuid -> the value of _event_seq at the domain's last lifecycle event (see setup_is_current).
        # Never pruned: an entry dropped on a domain's stop would let a setup made before the stop
        # pass as current; one small entry per domain ever seen here is cheap.
        self._domain_events: dict[str, int] = {}
        self._listeners: list[Callable[[str, str, int], None]] = []

    # ---- connection -----------------------------------------------------------------------

    def open(self) -> Hypervisor:
        """Open the connection (idempotent). Raises HypervisorError / HypervisorTimeout."""
        with self._open_lock:
            if self._conn is not None:
                return self
            _silence_libvirt_stderr()
            if self._events:
                ensure_event_loop()
            uri = self.uri
            conn = self._run("open", None, lambda: libvirt.open(uri), self.call_timeout_s,
                             on_abandoned=lambda c: c.close())
            if self._events:
                try:
                    self._lifecycle_cb_id = self._run(
                        "open", None,
                        lambda: conn.domainEventRegisterAny(
                            None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, None),
                        self.call_timeout_s)
                except HypervisorError as exc:
                    log.warning("libvirt lifecycle events unavailable on %s (%s); polling instead", uri, exc)
                if not uri.startswith("test:"):
                    try:
                        self._run("open", None, lambda: conn.setKeepAlive(self.KEEPALIVE_INTERVAL_S,
                                                                          self.KEEPALIVE_COUNT),
                                  self.call_timeout_s)
                    except HypervisorError as exc:
                        log.warning("libvirt keepalive not enabled on %s: %s", uri, exc)
            self._conn = conn
        log.debug("libvirt connection to %s open", self.uri)
        return self

    def close(self) -> None:
        """Close the connection (idempotent; errors are logged, never raised)."""
        with self._open_lock:
            conn, self._conn = self._conn, None
            cb_id, self._lifecycle_cb_id = self._lifecycle_cb_id, None
        if conn is None:
            return

        def do_close() -> None:
            if cb_id is not None:
                try:
                    conn.domainEventDeregisterAny(cb_id)
                except libvirt.libvirtError as exc:   # the connection is closing anyway
                    log.debug("deregistering lifecycle events of %s failed: %s", self.uri, exc)
            conn.close()

        try:
            self._run("close", None, do_close, self.call_timeout_s)
        except HypervisorError as exc:
            log.warning("closing the libvirt connection to %s: %s", self.uri, exc)
        with self._state_changed:
            self._event_seq += 1
            self._state_changed.notify_all()

    def __enter__(self) -> Hypervisor:
        return self.open()

    def __exit__(self, *_exc: object) -> None:
        self.close()

    @property
    def connected(self) -> bool:
        return self._conn is not None

    @property
    def connection(self) -> libvirt.virConnect:
        """The raw libvirt connection, for tests and diagnostics. Calls on it have no timeout."""
        return self._connection("connection", None)

    def is_alive(self) -> bool:
        """Whether the connection is open and libvirt considers it alive (never raises)."""
        conn = self._conn
        if conn is None:
            return False
        try:
            return bool(self._run("is_alive", None, conn.isAlive, self.call_timeout_s))
        except HypervisorError:
            return False

    # ---- the one place that calls libvirt -------------------------------------------------

    def _run(self, op: str, domain: str | None, fn: Callable[[], Any], timeout_s: float | None,
             on_abandoned: Callable[[Any], None] | None = None) -> Any:
        """Run fn in a daemon thread; wait at most timeout_s. See the module docstring."""
        call = _Call(op, domain, fn).start()
        timeout = self.call_timeout_s if timeout_s is None else timeout_s
        if not call.wait(timeout):
            self._count_abandoned()
            if on_abandoned is not None:
                threading.Thread(target=self._reap, args=(call, on_abandoned), name=f"libvirt-reap-{op}",
                                 daemon=True).start()
            raise HypervisorTimeout(op, domain, None,
                                    f"libvirt did not answer within {timeout:g} s; the call was abandoned")
        return call.result()

    def _count_abandoned(self) -> None:
        with self._counter_lock:
            self.abandoned_calls += 1

    @staticmethod
    def _reap(call: _Call, cleanup: Callable[[Any], None]) -> None:
        """Release what an abandoned call produced once it returns (e.g. a late connection)."""
        call.wait(None)
        try:
            value = call.result()
        except BaseException:
            return
        try:
            cleanup(value)
        except Exception as exc:   # best effort: the caller already gave up on this call
            log.debug("cleanup after an abandoned libvirt call failed: %s", exc)

    def _connection(self, op: str, domain: str | None) -> libvirt.virConnect:
        conn = self._conn
        if conn is None:
            raise HypervisorError(op, domain, None, f"not connected to {self.uri} (call open() first)")
        return conn

    def _call(self, op: str, fn: Callable[[libvirt.virConnect], Any], timeout_s: float | None = None) -> Any:
        conn = self._connection(op, None)
        return self._run(op, None, lambda: fn(conn), timeout_s)

    def _dom_call(self, op: str, uuid: str, fn: Callable[[libvirt.virDomain], Any],
                  timeout_s: float | None = None) -> Any:
        """Look the domain up by UUID and apply fn to it, both in one call with one timeout."""
        conn = self._connection(op, uuid)
        return self._run(op, uuid, lambda: fn(conn.lookupByUUIDString(uuid)), timeout_s)

    # ---- events --------------------------------------------------------------------------

    def _on_lifecycle(self, _conn, dom, event: int, detail: int, _opaque) -> None:
        """Runs on the libvirt-events thread: no blocking, no libvirt calls beyond local ones."""
        uuid = dom.UUIDString()  # local: the virDomain object holds its UUID
        with self._state_changed:
            self._event_seq += 1
            self._domain_events[uuid] = self._event_seq
            self._state_changed.notify_all()
        if self._listeners:
            name = LIFECYCLE_EVENTS.get(event, f"event {event}")
            for listener in list(self._listeners):
                try:
                    listener(uuid, name, detail)
                except Exception:
                    log.exception("lifecycle listener %r failed", listener)

    def add_lifecycle_listener(self, listener: Callable[[str, str, int], None]) -> None:
        """Call listener(uuid, event_name, detail) on every lifecycle event (needs events=True).

        Runs on the libvirt event-loop thread: it must return quickly and must not call libvirt.
        """
        self._listeners.append(listener)

    # ---- queries ---------------------------------------------------------------------------

    def list_domains(self, active_only: bool = False, timeout_s: float | None = None) -> list[DomainRef]:
        """Every domain libvirt knows (or only the active ones), with its status."""
        flags = libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE if active_only else 0

        def fn(conn: libvirt.virConnect) -> list[DomainRef]:
            refs = []
            for dom in conn.listAllDomains(flags):
                try:
                    refs.append(DomainRef(dom.UUIDString(), dom.name(), DomainStatus.from_libvirt(*dom.state())))
                except libvirt.libvirtError as exc:
                    if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                        raise
                    # a transient domain that stopped since the listing: gone
            return refs

        return self._call("list_domains", fn, timeout_s)

    def running_figures(self, timeout_s: float | None = None) -> dict[str, tuple[DomainStatus, int, int]]:
        """Every active domain: uuid -> (status, configured maximum memory MiB, current vCPUs),
        gathered in one call (one worker thread for the whole listing, not one per domain)."""

        def fn(conn: libvirt.virConnect) -> dict[str, tuple[DomainStatus, int, int]]:
            figures = {}
            for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
                try:
                    # info(): [state, maxMem KiB, memory KiB, nrVirtCpu, cpuTime]
                    info = dom.info()
                    figures[dom.UUIDString()] = (DomainStatus.from_libvirt(*dom.state()), info[1] // 1024, int(info[3]))
                except libvirt.libvirtError as exc:
                    if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                        raise
                    # stopped since the listing: gone
            return figures

        return self._call("running_figures", fn, timeout_s)

    def exists(self, uuid: str) -> bool:
        try:
            self._dom_call("exists", uuid, lambda dom: None)
        except DomainNotFound:
            return False
        return True

    def status(self, uuid: str) -> DomainStatus | None:
        """The domain's status, or None when libvirt does not know the domain."""
        try:
            return self._dom_call("status", uuid, lambda dom: DomainStatus.from_libvirt(*dom.state()))
        except DomainNotFound:
            return None

    def memory_mib(self, uuid: str) -> tuple[int, int]:
        """(current, maximum) memory in MiB: the balloon size and the configured maximum."""
        info = self._dom_call("memory_mib", uuid, lambda dom: dom.info())
        return info[2] // 1024, info[1] // 1024

    def vcpus(self, uuid: str) -> int:
        """The domain's current vCPU count."""
        return int(self._dom_call("vcpus", uuid, lambda dom: dom.info())[3])

    def xml(self, uuid: str, migratable: bool = False) -> str:
        """The domain XML (``VIR_DOMAIN_XML_MIGRATABLE`` when migratable)."""
        flags = libvirt.VIR_DOMAIN_XML_MIGRATABLE if migratable else 0
        return self._dom_call("xml", uuid, lambda dom: dom.XMLDesc(flags))

    def memory_stats(self, uuid: str, timeout_s: float | None = None) -> dict[str, int] | None:
        """The balloon statistics of a *running* domain, else None.

        The state is read first; for every other state (paused, an incoming migration, shut off,
        ...) and for an unknown domain this returns None without calling ``memoryStats()``.
        """

        def fn(dom: libvirt.virDomain) -> dict[str, int] | None:
            state, _reason = dom.state()
            if state != libvirt.VIR_DOMAIN_RUNNING:
                return None
            try:
                return dict(dom.memoryStats())
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_OPERATION_INVALID:
                    return None  # stopped between the two calls
                raise

        try:
            return self._dom_call("memory_stats", uuid, fn, timeout_s)
        except DomainNotFound:
            return None

    def host_memory_mib(self) -> tuple[int, int, int]:
        """(total, used, free) host memory in MiB; used = total - free - buffers - cached.

        From ``virNodeGetMemoryStats``. Where libvirt does not support it: for the test driver, the
        memory of its node XML (active domains counted as used); otherwise ``meminfo_path`` (the
        local /proc/meminfo).
        """
        try:
            stats = self._call("host_memory",
                               lambda conn: conn.getMemoryStats(libvirt.VIR_NODE_MEMORY_STATS_ALL_CELLS, 0))
        except HypervisorError as exc:
            if exc.code != libvirt.VIR_ERR_NO_SUPPORT:
                raise
            if self.uri.startswith("test:"):
                # A test-driver "host" is the <node> of its XML file: report its memory, with the
                # memory of its active domains as used, rather than the real machine's.
                def simulated(conn: libvirt.virConnect) -> tuple[int, int, int]:
                    total = conn.getInfo()[1]
                    used = 0
                    for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
                        try:
                            used += dom.maxMemory() // 1024
                        except libvirt.libvirtError as exc:
                            if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                                raise
                            # stopped (and gone, if transient) since the listing: uses nothing
                    return total, min(used, total), max(total - used, 0)
                return self._call("host_memory", simulated)
            try:
                return read_meminfo_mib(self.meminfo_path)
            except (OSError, ValueError) as err:
                raise HypervisorError("host_memory", None, None,
                                      f"libvirt cannot report host memory and {self.meminfo_path} "
                                      f"is unreadable: {err}") from None
        return _memory_triplet(stats.get("total", 0), stats.get("free", 0), stats.get("buffers", 0),
                               stats.get("cached", 0))

    def host_cpus(self) -> int:
        """Active host CPUs, as libvirt reports them (``getInfo()[2]``)."""
        return int(self._call("host_cpus", lambda conn: conn.getInfo())[2])

    # ---- lifecycle -------------------------------------------------------------------------

    def define(self, xml: str) -> str:
        """Define a persistent (stopped) domain from XML; returns its UUID."""
        return self._call("define", lambda conn: conn.defineXML(xml).UUIDString())

    def undefine(self, uuid: str) -> None:
        """Remove a persistent domain's definition (a running domain becomes transient).

        Managed-save images, snapshot and checkpoint metadata go with it; NVRAM files are kept.
        Drivers that reject those flags (the test driver) get a plain undefine.
        """
        flags = (libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                 | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA | libvirt.VIR_DOMAIN_UNDEFINE_KEEP_NVRAM)

        def fn(dom: libvirt.virDomain) -> None:
            try:
                dom.undefineFlags(flags)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() not in (libvirt.VIR_ERR_INVALID_ARG, libvirt.VIR_ERR_NO_SUPPORT):
                    raise
                dom.undefine()

        self._dom_call("undefine", uuid, fn)

    def start(self, uuid: str) -> None:
        """Start a defined (persistent) domain."""
        self._dom_call("start", uuid, lambda dom: dom.create())

    def create(self, xml: str) -> str:
        """Start a transient domain straight from XML; returns its UUID.

        The daemon's normal start path: the XML in ZooKeeper is the source of truth.
        """
        return self._call("create", lambda conn: conn.createXML(xml, 0).UUIDString())

    def _is_off(self, uuid: str) -> bool:
        try:
            return not self._dom_call("shutdown", uuid, lambda dom: dom.isActive())
        except DomainNotFound:
            return True

    def shutdown(self, uuid: str, timeout_s: float) -> bool:
        """Ask the guest to shut down and wait until it is off.

        True when the domain is off (also when it already was, or libvirt does not know it);
        False when it is still running after timeout_s. Never forces: call destroy() for that.
        Waits on lifecycle events, re-reading the state at least every poll_interval_s.
        """
        deadline = time.monotonic() + timeout_s

        def request(dom: libvirt.virDomain) -> bool:
            """Ask; True while the domain still runs (in the same call: a guest, or a driver,
            that stops at once needs no wait)."""
            if not dom.isActive():
                return False
            try:
                dom.shutdown()
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_OPERATION_INVALID and not dom.isActive():
                    return False
                raise
            try:
                return bool(dom.isActive())
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    return False   # a transient domain vanishes as it stops
                raise

        try:
            if not self._dom_call("shutdown", uuid, request):
                return True
        except DomainNotFound:
            return True
        while True:
            with self._state_changed:
                seq = self._event_seq
            if self._is_off(uuid):
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            with self._state_changed:
                self._state_changed.wait_for(lambda: self._event_seq != seq,  # noqa: B023 (called at once)
                                             timeout=min(remaining, self.poll_interval_s))

    def shutdown_or_destroy(self, uuid: str, timeout_s: float) -> bool:
        """A clean shutdown within ``timeout_s``, else a forced stop (a guest may ignore the
        request). True when the guest shut down by itself. Raises HypervisorError only when the
        forced stop fails too."""
        try:
            if self.shutdown(uuid, timeout_s):
                return True
            log.warning("domain %s did not shut down within %.0f s: forced stop", uuid, timeout_s)
        except HypervisorError as exc:
            log.warning("clean shutdown of domain %s failed (%s): forced stop", uuid, exc)
        self.destroy(uuid)
        return False

    def destroy(self, uuid: str) -> bool:
        """Forced stop. True if this stopped it; False if it was already off or is unknown."""

        def fn(dom: libvirt.virDomain) -> bool:
            if not dom.isActive():
                return False
            try:
                dom.destroy()
            except libvirt.libvirtError as exc:
                if exc.get_error_code() in (libvirt.VIR_ERR_OPERATION_INVALID, libvirt.VIR_ERR_NO_DOMAIN):
                    return False  # stopped (and, if transient, vanished) meanwhile
                raise
            return True

        try:
            return bool(self._dom_call("destroy", uuid, fn))
        except DomainNotFound:
            return False

    # ---- migration -------------------------------------------------------------------------

    def prepare_migration(self, uuid: str, max_downtime_ms: int | None = None) -> MigrationSetup:
        """Look the domain up, ask whether it is persistent and apply its maximum downtime (QEMU
        keeps it as its ``downtime-limit`` migration parameter), in one call of one thread: what
        ``migrate()`` needs before the transfer starts, made ahead of time when there is time to
        spare (the daemon's source side does it while the target prepares). Raises as
        ``migrate()`` would (op ``migrate``)."""
        if max_downtime_ms is not None and int(max_downtime_ms) <= 0:
            raise ValueError(f"max_downtime_ms must be positive, got {max_downtime_ms}")
        conn = self._connection("migrate", uuid)
        with self._state_changed:
            events_before = self._event_seq

        def run() -> tuple[Any, bool, libvirt.libvirtError | None]:
            dom = conn.lookupByUUIDString(uuid)
            persistent = bool(dom.isPersistent())
            if max_downtime_ms is None:
                return dom, persistent, None
            try:
                dom.migrateSetMaxDowntime(int(max_downtime_ms), 0)
            except libvirt.libvirtError as exc:   # reported with the setting's name, below
                return dom, persistent, exc
            return dom, persistent, None

        dom, persistent, downtime_error = self._run("migrate", uuid, run, None)
        if downtime_error is not None:
            exc = _translate("migrate", uuid, downtime_error)
            message = f"cannot set the maximum downtime to {max_downtime_ms} ms: {exc.message}"
            raise HypervisorError("migrate", uuid, exc.code, message)
        return MigrationSetup(uuid=uuid, max_downtime_ms=None if max_downtime_ms is None else int(max_downtime_ms),
                              persistent=persistent, domain=dom, connection=conn, events_before=events_before)

    def setup_is_current(self, setup: MigrationSetup, uuid: str, max_downtime_ms: int | None) -> bool:
        """Whether ``setup`` still holds for a migration of ``uuid`` with ``max_downtime_ms``:
        made on this connection, for that downtime, and no lifecycle event of the domain has
        come since it began. Without lifecycle events a stop and start could go unnoticed, so
        then no setup is current. (An event still on its way from libvirtd is not seen: a
        domain restarted within that moment migrates with QEMU's default downtime.)"""
        wanted = None if max_downtime_ms is None else int(max_downtime_ms)
        if (setup.uuid != uuid or setup.max_downtime_ms != wanted or self._lifecycle_cb_id is None
                or setup.connection is not self._conn):
            return False
        with self._state_changed:
            return self._domain_events.get(uuid, -1) <= setup.events_before

    def migrate(
        self,
        uuid: str,
        dest_uri: str,
        migration_uri: str | None = None,
        live: bool = True,
        peer_to_peer: bool = True,
        max_downtime_ms: int | None = None,
        timeout_s: float = 600.0,
        setup: MigrationSetup | None = None,
        auto_converge: bool = False,
    ) -> None:
        """Migrate a running domain to dest_uri (see the module docstring).

        ``dest_uri``: the destination libvirt URI (as the *source* libvirtd sees it for
        peer-to-peer, as this process sees it for managed). ``migration_uri``: where QEMU sends the
        data (VIR_MIGRATE_PARAM_URI, e.g. ``tcp://10.77.0.2``). Raises HypervisorError, or
        HypervisorTimeout after aborting the job when it takes longer than timeout_s. ``setup``:
        what ``prepare_migration()`` made earlier; made again here unless it is still current.
        ``auto_converge``: QEMU may throttle the guest's vCPUs, more at each pass, until the
        migration converges (VIR_MIGRATE_AUTO_CONVERGE; the VM's ``migration_auto_converge``).
        """
        params: dict[str, Any] = {}
        if migration_uri:
            params[libvirt.VIR_MIGRATE_PARAM_URI] = migration_uri
        if setup is None or not self.setup_is_current(setup, uuid, max_downtime_ms):
            setup = self.prepare_migration(uuid, max_downtime_ms)
        dom = setup.domain
        flags = libvirt.VIR_MIGRATE_LIVE if live else 0
        if peer_to_peer:
            flags |= libvirt.VIR_MIGRATE_PEER2PEER
        if auto_converge:
            flags |= libvirt.VIR_MIGRATE_AUTO_CONVERGE
        if setup.persistent:
            flags |= libvirt.VIR_MIGRATE_PERSIST_DEST | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE

        def run() -> None:
            if peer_to_peer:
                dom.migrateToURI3(dest_uri, params, flags)
                return
            dconn = libvirt.open(dest_uri)
            try:
                dom.migrate3(dconn, params, flags)
            finally:
                try:
                    dconn.close()
                except libvirt.libvirtError as exc:
                    log.debug("closing the destination connection failed: %s", exc)

        log.debug("migrating %s to %s (params %s, flags %#x)", uuid, dest_uri, params, flags)
        call = _Call("migrate", uuid, run).start()
        if call.wait(timeout_s):
            call.result()
            return

        # Too slow: abort the job, then give the migrate call a moment to return.
        try:
            self._run("migrate", uuid, dom.abortJob, None)
            aborted = "the job was aborted"
        except HypervisorError as exc:
            aborted = f"aborting the job failed: {exc.message}"
        if call.wait(self.abort_wait_s):
            try:
                call.result()
            except HypervisorError as exc:
                raise HypervisorTimeout("migrate", uuid, None,
                                        f"migration to {dest_uri} did not finish within {timeout_s:g} s; "
                                        f"{aborted} ({exc.message})") from None
            log.warning("migration of %s to %s completed while being aborted", uuid, dest_uri)
            return
        self._count_abandoned()
        raise HypervisorTimeout("migrate", uuid, None,
                                f"migration to {dest_uri} did not finish within {timeout_s:g} s; {aborted}, "
                                f"but the migrate call still has not returned; its thread was abandoned")
