# -*- coding: utf-8 -*-
# Copyright: pvc.cluster developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The node daemon's driver for the local hypervisor: a small interface over libvirt-python.

Design
======

* **One connection per driver, and one per outgoing migration.** ``Hypervisor(uri)`` opens one
  libvirt connection in ``open()`` and every thread of the daemon shares it (libvirt connections
  are thread-safe). The exception is the one long call: a peer-to-peer ``migrate()`` runs on a
  connection of its own, opened for it and closed when it returns. On a shared remote connection
  (``qemu+unix``, ``qemu+tls``...) the replies to other threads' calls made while a
  ``migrateToURI3`` is in flight are not handed to them until some other call goes over the
  connection (seen with the lab's libvirtd: another domain's ``state()`` returned only when a
  third thread called ``listAllDomains``, 1.5 s later, or near the migration's end), so the
  daemon's next periodic call, up to a keepalive interval later, released them: the source of a
  flush's second migration waited that long before its transfer. Drivers inside this process
  (``test:``) keep their one connection: the ``test:///<file>`` driver keeps a private state per
  connection, so a second one would see a different "host" (and they have no RPC client to
  share). (Managed migration opens a short-lived connection to the *destination* URI; that is
  another host.)

* **The connection is supervised** (``reconnect=True``, as the node daemon opens it). libvirtd
  restarts (package upgrades, a configuration change) and can crash or hang; none of that may
  leave the driver with a dead connection for good. The driver notices a lost connection three
  ways: libvirt's close callback (``registerCloseCallback``: libvirtd went away, or its
  keepalive probes, 5 s x 3, went unanswered), a call that fails while libvirt says the
  connection is no longer alive (``isAlive()``), and a call that times out followed by a probe
  (``getLibVersion``) that times out too (a libvirtd that hangs, e.g. SIGSTOP). It then drops
  the connection (closed in the background: closing a hung one could block), and a supervisor
  thread (``libvirt-reconnect``) opens a new one with a bounded backoff (``reconnect_delay_s``
  doubling up to ``reconnect_max_delay_s``), registers the lifecycle, close and keepalive
  callbacks on it again, and tells the reconnect listeners (the daemon re-lists the domains and
  has its reconciler pass over every VM: events sent while disconnected are lost). While there
  is no connection every call fails at once with ``HypervisorUnavailable``, never hangs.
  ``health`` says ``ok``, ``down`` (no connection; libvirtd refuses or is gone) or ``hung``
  (libvirtd accepts but does not answer); health listeners hear every change.

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
  the keepalive and got the node fenced. Nor while this driver migrates the domain away (its own
  ``migrate()`` call has not returned), nor while ``controlInfo()`` reports a job: the query job
  it takes holds up libvirt's own migration calls, and QEMU answers slowly while it migrates.
  ``controlInfo()`` alone does not see a migration: libvirt (9.0) runs it as an *asynchronous*
  job, and reports ``ok`` for all but the moments its migration thread talks to QEMU (in the lab,
  each outgoing migration of a busy guest got two or three ``query-balloon`` from the statistics
  pass before this driver remembered its own migrations; virsh's got none).

* **Host memory.** ``host_memory_mib()`` uses ``virNodeGetMemoryStats`` (all cells). The test
  driver does not support it (VIR_ERR_NO_SUPPORT); then the driver reads the local
  ``/proc/meminfo`` instead, which is right only when libvirt runs on this host (always so for
  the node daemon). ``getInfo()`` is not used for memory: it reports NUMA node 0 only on some hosts.

* **A stale incoming copy** (``stop_stale_copy()``). A libvirtd killed while it received a live
  migration leaves the incoming QEMU behind, paused; the restarted libvirtd reconnects to it and
  ends it itself (its reconnect kills an incoming migration that never finished), within a second
  or two in the lab (the dead QEMU must be reaped first, and until then the domain is still listed
  as paused and calls to it wait). A daemon that asks in that moment sees the copy and stops it
  with ``destroy()``. Should that destroy not be answered within the call timeout (once seen in
  the lab, and every later destroy of that copy went unanswered too), the driver ends that copy's
  QEMU process itself: only for a domain libvirt reported paused for an incoming migration
  (reason ``migration`` or ``starting_up``), and only a process that is a ``qemu-system-*`` or
  ``qemu-kvm`` executable, whose command line carries ``-uuid <that UUID>`` and libvirt's
  directory of that domain ID (``domain-<id>-``), in this process's network namespace (a lab
  host's; on a node, the host's), and only when exactly one process matches. libvirt then sees
  its monitor close and drops the domain, which the driver waits for.

* **Migration** (``migrate()``): peer-to-peer ``migrateToURI3`` by default, or managed ``migrate3``
  over a short-lived connection to ``dest_uri``. ``migration_uri`` goes into
  ``VIR_MIGRATE_PARAM_URI`` (needed when libvirt would otherwise resolve the destination's
  hostname to the wrong address, as in the lab whose hosts share one kernel). ``tls=True`` adds
  ``VIR_MIGRATE_TLS``: QEMU's memory stream goes over TLS, and the source's QEMU checks that the
  target's certificate names the host of ``migration_uri``.
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

import os
import signal
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
    "HypervisorUnavailable",
    "HEALTH_DOWN",
    "HEALTH_HUNG",
    "HEALTH_OK",
    "LIFECYCLE_EVENTS",
    "MigrationSetup",
    "PeerUnreachable",
    "STATE_NAMES",
    "STALE_INCOMING_REASONS",
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

# Reasons of a paused domain that is (or was, if its migration died) an incoming migration's copy.
STALE_INCOMING_REASONS = frozenset({libvirt.VIR_DOMAIN_PAUSED_MIGRATION, libvirt.VIR_DOMAIN_PAUSED_STARTING_UP})

# Reason codes per state (virDomain<State>Reason). Written out, because the constant prefixes
# collide with flag names (VIR_DOMAIN_SHUTDOWN_* are also shutdown-method flags).
_REASON_SUFFIXES = {
    "nostate": ("UNKNOWN",),
    "running": (
        "UNKNOWN",
        "BOOTED",
        "MIGRATED",
        "RESTORED",
        "FROM_SNAPSHOT",
        "UNPAUSED",
        "MIGRATION_CANCELED",
        "SAVE_CANCELED",
        "WAKEUP",
        "CRASHED",
        "POSTCOPY",
        "POSTCOPY_FAILED",
    ),
    "blocked": ("UNKNOWN",),
    "paused": (
        "UNKNOWN",
        "USER",
        "MIGRATION",
        "SAVE",
        "DUMP",
        "IOERROR",
        "WATCHDOG",
        "FROM_SNAPSHOT",
        "SHUTTING_DOWN",
        "SNAPSHOT",
        "CRASHED",
        "STARTING_UP",
        "POSTCOPY",
        "POSTCOPY_FAILED",
    ),
    "shutdown": ("UNKNOWN", "USER"),
    "shutoff": (
        "UNKNOWN",
        "SHUTDOWN",
        "DESTROYED",
        "CRASHED",
        "MIGRATED",
        "SAVED",
        "FAILED",
        "FROM_SNAPSHOT",
        "DAEMON",
    ),
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
    """A libvirt operation failed. ``code`` is libvirt's error code (None when not from libvirt);
    ``origin`` the part of libvirt that raised it (its error domain, e.g. VIR_FROM_RPC for a
    connection between libvirt processes that failed), None when not known."""

    def __init__(self, op: str, domain: str | None, code: int | None, message: str, origin: int | None = None) -> None:
        super().__init__(op, domain, code, message)
        self.op = op
        self.domain = domain
        self.code = code
        self.message = message
        self.origin = origin

    @property
    def connection_failed(self) -> bool:
        """Whether a connection between libvirt processes failed (libvirt's RPC layer: a
        libvirtd that went away, a socket closed, a peer that cannot be reached)."""
        return self.origin == libvirt.VIR_FROM_RPC

    def __str__(self) -> str:
        where = f" on domain {self.domain}" if self.domain else ""
        code = f" (libvirt error {self.code})" if self.code is not None else ""
        return f"{self.op}{where} failed: {self.message}{code}"


class HypervisorTimeout(HypervisorError):
    """A libvirt call did not return in time. The thread running it was abandoned."""


class DomainNotFound(HypervisorError):
    """libvirt does not know the domain (VIR_ERR_NO_DOMAIN)."""


class HypervisorUnavailable(HypervisorError):
    """There is no working connection to libvirtd (closed, dead or hung): the call was not made,
    or its connection was lost while it ran (then its outcome is not known: ask again once
    reconnected). A supervised driver reconnects by itself."""


class PeerUnreachable(HypervisorError):
    """Another node's libvirt cannot be reached from this process at all: its URI names a driver
    that lives inside that node's own process (libvirt's ``test:`` driver). The caller learns of
    the peer some other way."""


# What the driver knows of its connection (``Hypervisor.health``; the node publishes it).
HEALTH_OK = "ok"  # connected, and libvirtd answers
HEALTH_DOWN = "down"  # no connection: libvirtd is gone or refuses, or closed the connection
HEALTH_HUNG = "hung"  # libvirtd accepts but does not answer within the call timeout


class _ConnectionLost(Exception):
    """Raised in a call's thread when a libvirt call failed and its connection is no longer
    alive; the waiting caller turns it into HypervisorUnavailable."""

    def __init__(self, error: libvirt.libvirtError) -> None:
        super().__init__(error)
        self.error = error


def _guarded(conn: Any, fn: Callable[[], Any]) -> Callable[[], Any]:
    """fn, made to raise _ConnectionLost when it fails because ``conn`` is dead (asked of libvirt
    with ``isAlive()``, which answers from the client's own state, without a round trip)."""

    def run() -> Any:
        try:
            return fn()
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                raise
            try:
                alive = conn.isAlive()
            except libvirt.libvirtError:  # "invalid connection pointer": closed meanwhile (retired)
                alive = 0
            if alive != 1:
                raise _ConnectionLost(exc) from exc
            raise

    return run


def _translate(op: str, domain: str | None, exc: libvirt.libvirtError) -> HypervisorError:
    code = exc.get_error_code()
    message = exc.get_error_message() or str(exc)
    cls = DomainNotFound if code == libvirt.VIR_ERR_NO_DOMAIN else HypervisorError
    return cls(op, domain, code, message, exc.get_error_domain())


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
    domain: Any = None  # the libvirt.virDomain looked up
    connection: Any = None  # the libvirt.virConnect it belongs to
    events_before: int = 0
    generation: int = -1  # the driver's connection generation it was made on


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
            time.sleep(0.1)  # backoff, so a persistent failure does not spin the CPU


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


_CLOSE_REASONS = {
    libvirt.VIR_CONNECT_CLOSE_REASON_ERROR: "I/O error",
    libvirt.VIR_CONNECT_CLOSE_REASON_EOF: "end of file: libvirtd went away",
    libvirt.VIR_CONNECT_CLOSE_REASON_KEEPALIVE: "keepalive timeout: libvirtd does not answer",
    libvirt.VIR_CONNECT_CLOSE_REASON_CLIENT: "closed by the client",
}


# ---- /proc/meminfo ---------------------------------------------------------------------------


def _qemu_executable(path: str) -> bool:
    name = os.path.basename(path.removesuffix(" (deleted)"))
    return name.startswith("qemu-system-") or name == "qemu-kvm"


def find_qemu_pids(uuid: str, domain_id: int, proc_root: str = "/proc", netns: str | None = None) -> list[int]:
    """The PIDs of the QEMU processes of domain ``uuid`` with libvirt domain ID ``domain_id``
    (see "A stale incoming copy" above): a ``qemu-system-*`` or ``qemu-kvm`` executable, whose
    command line has ``-uuid`` followed by ``uuid`` and names libvirt's directory of that
    domain ID (``domain-<id>-<name>``), in the network namespace ``netns`` (a namespace file;
    by default this process's). Processes that vanish or cannot be read while they are looked
    at are left out."""
    want = uuid.lower()
    marker = f"/domain-{int(domain_id)}-"
    try:
        own_ns = os.stat(netns or os.path.join(proc_root, "self", "ns", "net"))
    except OSError:
        return []  # no namespace to compare with: nothing can be said to be this host's
    found = []
    for entry in os.listdir(proc_root):
        if not entry.isdigit():
            continue
        base = os.path.join(proc_root, entry)
        try:
            if not _qemu_executable(os.readlink(os.path.join(base, "exe"))):
                continue
            with open(os.path.join(base, "cmdline"), "rb") as f:
                argv = [arg.decode(errors="replace") for arg in f.read().split(b"\0")]
            ns = os.stat(os.path.join(base, "ns", "net"))
        except OSError:
            continue
        if (ns.st_dev, ns.st_ino) != (own_ns.st_dev, own_ns.st_ino):
            continue
        uuids = [argv[i + 1].lower() for i, arg in enumerate(argv[:-1]) if arg == "-uuid"]
        if uuids != [want] or not any(marker in arg for arg in argv):
            continue
        found.append(int(entry))
    return sorted(found)


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
    ``reconnect``: supervise the connection and replace it when it is lost (see above);
    ``reconnect_delay_s`` / ``reconnect_max_delay_s``: the backoff between attempts.
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
        reconnect: bool = False,
        reconnect_delay_s: float = 0.1,
        reconnect_max_delay_s: float = 1.0,
    ) -> None:
        if call_timeout_s <= 0:
            raise ValueError(f"call_timeout_s must be positive, got {call_timeout_s}")
        if reconnect_delay_s <= 0 or reconnect_max_delay_s < reconnect_delay_s:
            raise ValueError(
                f"reconnect delays must be positive and the maximum at least the first, got "
                f"{reconnect_delay_s} and {reconnect_max_delay_s}"
            )
        self.uri = uri
        self.call_timeout_s = float(call_timeout_s)
        # How long migrate() waits for the migrate call to return after abortJob().
        self.abort_wait_s = float(call_timeout_s)
        self.poll_interval_s = float(poll_interval_s)
        self.meminfo_path = meminfo_path
        # Where stop_stale_copy() looks for a stale copy's QEMU process, and the network namespace
        # (a namespace file) of this host's QEMUs: None, this process's (the daemon runs on its host).
        self.proc_root = "/proc"
        self.host_netns: str | None = None
        self.abandoned_calls = 0
        self.reconnects = 0  # connections replaced since open()
        self._counter_lock = threading.Lock()
        self._events = events
        self._reconnect = reconnect
        self.reconnect_delay_s = float(reconnect_delay_s)
        self.reconnect_max_delay_s = float(reconnect_max_delay_s)
        self._conn: libvirt.virConnect | None = None
        self._lifecycle_cb_id: int | None = None
        self._open_lock = threading.Lock()
        # Guards the connection, its generation and health, and wakes the supervisor. Never held
        # across a libvirt call (the close callback takes it on the events thread).
        self._link = threading.Condition()
        self._generation = 0  # +1 for every connection installed
        self._health = HEALTH_DOWN
        self._lost_reason = "call open() first"
        self._suspect: int | None = None  # generation whose call timed out: probe it
        self._retired: list[tuple[Any, int | None]] = []  # lost connections, to close
        self._supervising: threading.Event | None = None  # set to end the current supervisor
        self._health_listeners: list[Callable[[str, str], None]] = []
        self._reconnect_listeners: list[Callable[[], None]] = []
        self._state_changed = threading.Condition()
        self._event_seq = 0
        # uuid -> the value of _event_seq at the domain's last lifecycle event (see setup_is_current).
        # Never pruned: an entry dropped on a domain's stop would let a setup made before the stop
        # pass as current; one small entry per domain ever seen here is cheap.
        self._domain_events: dict[str, int] = {}
        self._listeners: list[Callable[[str, str, int], None]] = []
        # uuids whose migrate() call (this driver's outgoing migration) has not returned yet: the
        # statistics leave them alone (memory_stats). Removed by the call's thread when libvirt
        # returns, even from a call that migrate() abandoned after its timeout.
        self._migrating_out: set[str] = set()
        self._migrating_lock = threading.Lock()

    # ---- connection -----------------------------------------------------------------------

    def open(self) -> Hypervisor:
        """Open the connection (idempotent). Raises HypervisorError / HypervisorTimeout. With
        ``reconnect``, the connection is supervised from then on, until close()."""
        with self._open_lock:
            if self._conn is not None or (self._supervising is not None and not self._supervising.is_set()):
                return self  # connected, or a supervisor is reconnecting
            _silence_libvirt_stderr()
            if self._events:
                ensure_event_loop()
            conn, cb_id = self._connect()
            with self._link:
                self._install(conn, cb_id)
            if self._reconnect:
                stop = threading.Event()
                self._supervising = stop
                threading.Thread(target=self._supervise, args=(stop,), name="libvirt-reconnect", daemon=True).start()
        log.debug("libvirt connection to %s open", self.uri)
        return self

    def _connect(self) -> tuple[libvirt.virConnect, int | None]:
        """A new connection with every callback this driver uses registered on it: lifecycle
        events, the close callback and (remote URIs) keepalive. Raises HypervisorError."""
        uri = self.uri
        conn = self._run("open", None, lambda: libvirt.open(uri), self.call_timeout_s, on_abandoned=lambda c: c.close())
        cb_id = None
        try:
            if self._events:
                try:
                    cb_id = self._run(
                        "open",
                        None,
                        lambda: conn.domainEventRegisterAny(
                            None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, None
                        ),
                        self.call_timeout_s,
                    )
                except HypervisorTimeout:
                    raise
                except HypervisorError as exc:
                    log.warning("libvirt lifecycle events unavailable on %s (%s); polling instead", uri, exc)
                if not uri.startswith("test:"):
                    try:
                        self._run(
                            "open",
                            None,
                            lambda: conn.setKeepAlive(self.KEEPALIVE_INTERVAL_S, self.KEEPALIVE_COUNT),
                            self.call_timeout_s,
                        )
                    except HypervisorTimeout:
                        raise
                    except HypervisorError as exc:
                        log.warning("libvirt keepalive not enabled on %s: %s", uri, exc)
            if self._reconnect:
                try:
                    self._run(
                        "open", None, lambda: conn.registerCloseCallback(self._on_close, None), self.call_timeout_s
                    )
                except HypervisorTimeout:
                    raise
                except HypervisorError as exc:  # still supervised: errors and probes tell
                    log.warning("libvirt close callback not registered on %s: %s", uri, exc)
        except HypervisorError:
            self._retire_later(conn, cb_id)
            raise
        return conn, cb_id

    def _install(self, conn: libvirt.virConnect, cb_id: int | None) -> None:
        """Make ``conn`` the connection (``_link`` held)."""
        self._generation += 1
        self._conn, self._lifecycle_cb_id = conn, cb_id
        self._health, self._lost_reason, self._suspect = HEALTH_OK, "", None

    def close(self) -> None:
        """Close the connection and end its supervision (idempotent; errors are logged, never
        raised)."""
        with self._open_lock:
            with self._link:
                if self._supervising is not None:
                    self._supervising.set()
                    self._supervising = None
                conn, self._conn = self._conn, None
                cb_id, self._lifecycle_cb_id = self._lifecycle_cb_id, None
                retired, self._retired = self._retired, []
                self._health, self._lost_reason = HEALTH_DOWN, "the connection was closed (call open() first)"
                self._link.notify_all()
        for old, old_cb in retired:
            self._retire_later(old, old_cb)
        if conn is None:
            return
        try:
            self._run("close", None, self._closer(conn, cb_id), self.call_timeout_s)
        except HypervisorError as exc:
            log.warning("closing the libvirt connection to %s: %s", self.uri, exc)
        with self._state_changed:
            self._event_seq += 1
            self._state_changed.notify_all()

    def _closer(self, conn: libvirt.virConnect, cb_id: int | None) -> Callable[[], None]:
        def do_close() -> None:
            if cb_id is not None:
                try:
                    conn.domainEventDeregisterAny(cb_id)
                except libvirt.libvirtError as exc:  # the connection is closing anyway
                    log.debug("deregistering lifecycle events of %s failed: %s", self.uri, exc)
            if self._reconnect:
                try:
                    conn.unregisterCloseCallback()
                except libvirt.libvirtError as exc:  # likewise
                    log.debug("unregistering the close callback of %s failed: %s", self.uri, exc)
            conn.close()

        return do_close

    def _retire_later(self, conn: libvirt.virConnect, cb_id: int | None) -> None:
        """Close a lost connection in a thread of its own: on a hung libvirtd that blocks until
        libvirtd answers or the connection fails, and nothing may wait for it."""

        def run() -> None:
            try:
                self._closer(conn, cb_id)()
            except libvirt.libvirtError as exc:
                log.debug("closing a lost libvirt connection to %s: %s", self.uri, exc)

        threading.Thread(target=run, name="libvirt-retire", daemon=True).start()

    def __enter__(self) -> Hypervisor:
        return self.open()

    def __exit__(self, *_exc: object) -> None:
        self.close()

    @property
    def connected(self) -> bool:
        return self._conn is not None

    @property
    def health(self) -> str:
        """HEALTH_OK, HEALTH_DOWN or HEALTH_HUNG (see the module docstring)."""
        return self._health

    @property
    def health_reason(self) -> str:
        """Why the health is not ok ("" when it is)."""
        return self._lost_reason

    @property
    def generation(self) -> int:
        """How many connections this driver has installed (one more after each reconnect)."""
        return self._generation

    @property
    def connection(self) -> libvirt.virConnect:
        """The raw libvirt connection, for tests and diagnostics. Calls on it have no timeout."""
        return self._connection("connection", None)[0]

    def is_alive(self) -> bool:
        """Whether the connection is open and libvirt considers it alive (never raises)."""
        conn = self._conn
        if conn is None:
            return False
        try:
            return bool(self._run("is_alive", None, conn.isAlive, self.call_timeout_s))
        except HypervisorError:
            return False

    def add_health_listener(self, listener: Callable[[str, str], None]) -> None:
        """Call listener(health, reason) on every change of ``health``, from the supervisor's
        thread (it may block briefly; it must not call this driver's close())."""
        self._health_listeners.append(listener)

    def add_reconnect_listener(self, listener: Callable[[], None]) -> None:
        """Call listener() after every reconnection, from the supervisor's thread, once the
        new connection's callbacks are registered (events sent meanwhile were lost)."""
        self._reconnect_listeners.append(listener)

    # ---- supervision ----------------------------------------------------------------------

    def _on_close(self, conn, reason: int, _opaque) -> None:
        """libvirt's close callback (on the events thread: no blocking, no libvirt calls). It
        concerns the connection it was registered on only while that is the current one."""
        why = _CLOSE_REASONS.get(reason, f"reason {reason}")
        with self._link:
            generation = self._generation if conn is self._conn else None
        if generation is not None:
            self._lose(generation, HEALTH_DOWN, f"libvirt closed the connection ({why})")

    def _lose(self, generation: int, health: str, reason: str) -> bool:
        """Drop connection ``generation`` if it is still the current one: calls fail at once
        from now on, and the supervisor reconnects. False when it was already replaced."""
        with self._link:
            if generation != self._generation or self._conn is None:
                return False
            self._retired.append((self._conn, self._lifecycle_cb_id))
            self._conn, self._lifecycle_cb_id = None, None
            self._health, self._lost_reason, self._suspect = health, reason, None
            self._link.notify_all()
        log.warning("libvirt connection to %s lost: %s; reconnecting", self.uri, reason)
        with self._state_changed:  # a shutdown() waiting on events re-checks (and learns)
            self._event_seq += 1
            self._state_changed.notify_all()
        return True

    def _suspect_hung(self, generation: int) -> None:
        """A call on connection ``generation`` timed out: have the supervisor probe it."""
        with self._link:
            if generation == self._generation and self._conn is not None:
                self._suspect = generation
                self._link.notify_all()

    def _supervise(self, stop: threading.Event) -> None:
        """The supervisor: closes lost connections, probes suspect ones, reconnects."""
        reported = self._health
        while True:
            with self._link:
                self._link.wait_for(
                    lambda: (
                        stop.is_set()
                        or self._retired
                        or self._suspect is not None
                        or self._conn is None
                        or self._health != reported  # noqa: B023 (called at once)
                    )
                )
                if stop.is_set():
                    return
                retired, self._retired = self._retired, []
                suspect, self._suspect = self._suspect, None
                conn = self._conn
            for old, cb_id in retired:
                self._retire_later(old, cb_id)
            if suspect is not None and conn is not None:
                self._probe(conn, suspect)
            reported = self._report(reported)
            if self._conn is None:
                self._reconnect_loop(stop)
                reported = self._report(reported)
                if self._conn is not None and not stop.is_set():
                    for listener in list(self._reconnect_listeners):
                        try:
                            listener()
                        except Exception:
                            log.exception("libvirt reconnect listener %r failed", listener)

    def _probe(self, conn: libvirt.virConnect, generation: int) -> None:
        """A call timed out: does libvirtd still answer at all? A probe that times out as well
        means a hung libvirtd, and the connection is replaced."""
        timeout = min(self.call_timeout_s, 5.0)
        try:
            self._run("probe", None, _guarded(conn, conn.getLibVersion), timeout)
        except HypervisorTimeout:
            self._lose(generation, HEALTH_HUNG, f"libvirtd did not answer a probe within {timeout:g} s")
        except _ConnectionLost as exc:
            self._lose(generation, HEALTH_DOWN, f"the connection failed: {exc.error.get_error_message()}")
        except HypervisorError as exc:
            log.debug("libvirt probe of %s failed but the connection is alive: %s", self.uri, exc)

    def _reconnect_loop(self, stop: threading.Event) -> None:
        """Open a new connection, waiting reconnect_delay_s (doubling up to reconnect_max_delay_s)
        between attempts, until one succeeds or the driver is closed."""
        delay = self.reconnect_delay_s
        attempts = 0
        while not stop.is_set():
            attempts += 1
            try:
                conn, cb_id = self._connect()
            except HypervisorError as exc:
                health = HEALTH_HUNG if isinstance(exc, HypervisorTimeout) else HEALTH_DOWN
                with self._link:
                    if stop.is_set():
                        return
                    changed = health != self._health
                    self._health, self._lost_reason = health, f"cannot reconnect: {exc.message}"
                if changed or attempts == 1:
                    log.warning("libvirt at %s: cannot reconnect (%s); retrying", self.uri, exc.message)
                    self._report(None)
                stop.wait(delay)  # the backoff between attempts (close() ends it)
                delay = min(delay * 2, self.reconnect_max_delay_s)
                continue
            with self._link:
                if stop.is_set():
                    self._retire_later(conn, cb_id)
                    return
                self._install(conn, cb_id)
            with self._counter_lock:
                self.reconnects += 1
            log.system("libvirt: reconnected to %s after %d attempt(s)", self.uri, attempts)
            with self._state_changed:
                self._event_seq += 1
                self._state_changed.notify_all()
            return

    def _report(self, reported: str | None) -> str:
        """Tell the health listeners when health differs from ``reported``; returns it."""
        health, reason = self._health, self._lost_reason
        if health != reported:
            for listener in list(self._health_listeners):
                try:
                    listener(health, reason)
                except Exception:
                    log.exception("libvirt health listener %r failed", listener)
        return health

    # ---- the one place that calls libvirt -------------------------------------------------

    def _run(
        self,
        op: str,
        domain: str | None,
        fn: Callable[[], Any],
        timeout_s: float | None,
        on_abandoned: Callable[[Any], None] | None = None,
        generation: int | None = None,
    ) -> Any:
        """Run fn in a daemon thread; wait at most timeout_s. See the module docstring.
        ``generation``: the connection fn uses (guarded: see _guarded), which a lost connection
        or a timeout concerns."""
        call = _Call(op, domain, fn).start()
        timeout = self.call_timeout_s if timeout_s is None else timeout_s
        if not call.wait(timeout):
            self._count_abandoned()
            if on_abandoned is not None:
                threading.Thread(
                    target=self._reap, args=(call, on_abandoned), name=f"libvirt-reap-{op}", daemon=True
                ).start()
            if generation is not None:
                self._suspect_hung(generation)
            raise HypervisorTimeout(
                op, domain, None, f"libvirt did not answer within {timeout:g} s; the call was abandoned"
            )
        try:
            return call.result()
        except _ConnectionLost as exc:
            if generation is None:
                raise
            message = exc.error.get_error_message() or str(exc.error)
            self._lose(generation, HEALTH_DOWN, f"the connection failed: {message}")
            raise HypervisorUnavailable(
                op, domain, exc.error.get_error_code(), f"the connection to libvirtd was lost ({message}); reconnecting"
            ) from None

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
        except Exception as exc:  # best effort: the caller already gave up on this call
            log.debug("cleanup after an abandoned libvirt call failed: %s", exc)

    def _connection(self, op: str, domain: str | None) -> tuple[libvirt.virConnect, int]:
        """(the connection, its generation); HypervisorUnavailable at once when there is none."""
        with self._link:
            conn, generation, reason = self._conn, self._generation, self._lost_reason
        if conn is None:
            raise HypervisorUnavailable(op, domain, None, f"not connected to {self.uri}: {reason}")
        return conn, generation

    def _call(self, op: str, fn: Callable[[libvirt.virConnect], Any], timeout_s: float | None = None) -> Any:
        conn, generation = self._connection(op, None)
        return self._run(op, None, _guarded(conn, lambda: fn(conn)), timeout_s, generation=generation)

    def _dom_call(
        self, op: str, uuid: str, fn: Callable[[libvirt.virDomain], Any], timeout_s: float | None = None
    ) -> Any:
        """Look the domain up by UUID and apply fn to it, both in one call with one timeout."""
        conn, generation = self._connection(op, uuid)
        return self._run(
            op, uuid, _guarded(conn, lambda: fn(conn.lookupByUUIDString(uuid))), timeout_s, generation=generation
        )

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

    def migrating_out(self, uuid: str) -> bool:
        """Whether this driver's migrate() of ``uuid`` is under way (libvirt has not returned)."""
        with self._migrating_lock:
            return uuid.lower() in self._migrating_out

    def memory_stats(self, uuid: str, timeout_s: float | None = None) -> dict[str, int] | None:
        """The balloon statistics of a *running* domain that is not migrating, else None.

        A domain this driver is migrating away (``migrating_out``) gets None with no libvirt call
        at all. Otherwise the state is read first; for every other state (paused, an incoming
        migration, shut off, ...) and for an unknown domain this returns None without calling
        ``memoryStats()``. So it does while ``controlInfo()`` reports a job (one started by
        another client): ``memoryStats()`` would take a query job that libvirt's own calls for
        the migration then wait behind, and QEMU answers slowly while it migrates (seconds in
        the lab), which lengthened the guest's downtime at the switch-over. ``controlInfo()``
        reports libvirt's synchronous jobs only, so it misses most of a migration (an
        asynchronous job): hence ``migrating_out`` for our own.
        """

        if self.migrating_out(uuid):
            return None

        def fn(dom: libvirt.virDomain) -> dict[str, int] | None:
            state, _reason = dom.state()
            if state != libvirt.VIR_DOMAIN_RUNNING:
                return None
            if dom.controlInfo()[0] == libvirt.VIR_DOMAIN_CONTROL_JOB:
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
            stats = self._call(
                "host_memory", lambda conn: conn.getMemoryStats(libvirt.VIR_NODE_MEMORY_STATS_ALL_CELLS, 0)
            )
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
                raise HypervisorError(
                    "host_memory",
                    None,
                    None,
                    f"libvirt cannot report host memory and {self.meminfo_path} is unreadable: {err}",
                ) from None
        return _memory_triplet(
            stats.get("total", 0), stats.get("free", 0), stats.get("buffers", 0), stats.get("cached", 0)
        )

    def host_cpus(self) -> int:
        """Active host CPUs, as libvirt reports them (``getInfo()[2]``)."""
        return int(self._call("host_cpus", lambda conn: conn.getInfo())[2])

    # ---- other nodes -----------------------------------------------------------------------

    def peer_status(self, uri: str, uuid: str, call_timeout_s: float | None = None) -> DomainStatus | None:
        """The status of ``uuid`` as the libvirt at ``uri`` (another node's) reports it, over a
        short-lived connection of its own; None when that libvirt does not know the domain.
        Raises PeerUnreachable for a URI whose driver lives inside the peer's process (``test:``:
        a connection from here would open a private, empty "host"), HypervisorError when it
        cannot be asked."""
        if uri.startswith("test:"):
            raise PeerUnreachable("status", uuid, None, f"{uri} names a libvirt driver inside the peer's own process")
        with Hypervisor(uri, call_timeout_s=call_timeout_s or self.call_timeout_s) as remote:
            return remote.status(uuid)

    def migration_job_moving(self, uuid: str) -> bool:
        """Whether libvirt reports a job of ``uuid`` that runs and moves memory (or has run for
        100 ms). Asked directly on the current connection, without a call thread: the crash-point
        watcher (faults.py) polls it while migrate() runs. False when it cannot be asked."""
        conn = self._conn
        if conn is None:
            return False
        try:
            info = conn.lookupByUUIDString(uuid).jobInfo()
        except libvirt.libvirtError:
            return False
        # jobInfo: [type, timeElapsed (ms), timeRemaining, dataTotal, dataProcessed, ...]
        return bool(info) and info[0] != libvirt.VIR_DOMAIN_JOB_NONE and (info[4] > 0 or info[1] >= 100)

    # ---- lifecycle -------------------------------------------------------------------------

    def define(self, xml: str) -> str:
        """Define a persistent (stopped) domain from XML; returns its UUID."""
        return self._call("define", lambda conn: conn.defineXML(xml).UUIDString())

    def undefine(self, uuid: str) -> None:
        """Remove a persistent domain's definition (a running domain becomes transient).

        Managed-save images, snapshot and checkpoint metadata go with it; NVRAM files are kept.
        Drivers that reject those flags (the test driver) get a plain undefine.
        """
        flags = (
            libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
            | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
            | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
            | libvirt.VIR_DOMAIN_UNDEFINE_KEEP_NVRAM
        )

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
                    return False  # a transient domain vanishes as it stops
                raise

        try:
            if not self._dom_call("shutdown", uuid, request):
                return True
        except DomainNotFound:
            return True
        return self._wait_off(uuid, deadline)

    def _wait_off(self, uuid: str, deadline: float, unanswered_is_on: bool = False) -> bool:
        """Wait until ``uuid`` is off or the monotonic ``deadline`` passes (True: off), on
        lifecycle events, re-reading the state at least every poll_interval_s. With
        ``unanswered_is_on``, a state read that libvirt does not answer in time counts as not off
        yet (a domain libvirt is still busy with); otherwise its HypervisorTimeout is raised."""
        while True:
            with self._state_changed:
                seq = self._event_seq
            try:
                if self._is_off(uuid):
                    return True
            except HypervisorTimeout:
                if not unanswered_is_on:
                    raise
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            with self._state_changed:
                self._state_changed.wait_for(
                    lambda: self._event_seq != seq,  # noqa: B023 (called at once)
                    timeout=min(remaining, self.poll_interval_s),
                )

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

    def stop_stale_copy(self, uuid: str) -> str:
        """Forced stop of a copy of ``uuid`` that must not run here (its assigned node runs it).
        Returns what happened: ``gone`` (libvirt no longer has it, or it was off), ``destroyed``
        (libvirt's destroy stopped it), or ``killed`` (a paused incoming copy that libvirt's
        destroy did not stop within the call timeout: its QEMU process was ended, see "A stale
        incoming copy" above, and libvirt dropped the domain). Raises HypervisorError when it
        cannot be stopped (``HypervisorUnavailable`` while there is no libvirt: nothing is ended
        then)."""
        try:
            state, reason, domain_id = self._dom_call("destroy", uuid, lambda dom: (*dom.state(), dom.ID()))
        except DomainNotFound:
            return "gone"
        status = DomainStatus.from_libvirt(state, reason)
        incoming = status.state == "paused" and status.reason in STALE_INCOMING_REASONS
        try:
            return "destroyed" if self.destroy(uuid) else "gone"
        except HypervisorUnavailable:
            raise
        except HypervisorError as exc:
            if not incoming or domain_id <= 0:
                raise
            failure = exc
        pids = find_qemu_pids(uuid, domain_id, self.proc_root, self.host_netns)
        if len(pids) != 1:
            log.error(
                "the stale copy of %s here (%s) was not stopped by libvirt (%s), and %s QEMU processes "
                "match it (%s): leaving it to libvirt",
                uuid,
                status,
                failure,
                len(pids),
                pids,
            )
            raise failure
        pid = pids[0]
        log.error(
            "the stale copy of %s here (%s, libvirt domain ID %d) was not stopped by libvirt (%s): "
            "ending its QEMU process %d",
            uuid,
            status,
            domain_id,
            failure,
            pid,
        )
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # it ended meanwhile
        if not self._wait_off(uuid, time.monotonic() + self.call_timeout_s, unanswered_is_on=True):
            raise HypervisorTimeout(
                "destroy",
                uuid,
                None,
                f"its QEMU process {pid} was ended, but libvirt still lists the domain after {self.call_timeout_s:g} s",
            )
        log.warning("the stale copy of %s here is gone: its QEMU process %d was ended", uuid, pid)
        return "killed"

    # ---- migration -------------------------------------------------------------------------

    def prepare_migration(self, uuid: str, max_downtime_ms: int | None = None) -> MigrationSetup:
        """Look the domain up, ask whether it is persistent and apply its maximum downtime (QEMU
        keeps it as its ``downtime-limit`` migration parameter), in one call of one thread: what
        ``migrate()`` needs before the transfer starts, made ahead of time when there is time to
        spare (the daemon's source side does it while the target prepares). Raises as
        ``migrate()`` would (op ``migrate``)."""
        if max_downtime_ms is not None and int(max_downtime_ms) <= 0:
            raise ValueError(f"max_downtime_ms must be positive, got {max_downtime_ms}")
        conn, generation = self._connection("migrate", uuid)
        with self._state_changed:
            events_before = self._event_seq

        def run() -> tuple[Any, bool, libvirt.libvirtError | None]:
            dom = conn.lookupByUUIDString(uuid)
            persistent = bool(dom.isPersistent())
            if max_downtime_ms is None:
                return dom, persistent, None
            try:
                dom.migrateSetMaxDowntime(int(max_downtime_ms), 0)
            except libvirt.libvirtError as exc:  # reported with the setting's name, below
                return dom, persistent, exc
            return dom, persistent, None

        dom, persistent, downtime_error = self._run("migrate", uuid, _guarded(conn, run), None, generation=generation)
        if downtime_error is not None:
            exc = _translate("migrate", uuid, downtime_error)
            message = f"cannot set the maximum downtime to {max_downtime_ms} ms: {exc.message}"
            raise HypervisorError("migrate", uuid, exc.code, message)
        return MigrationSetup(
            uuid=uuid,
            max_downtime_ms=None if max_downtime_ms is None else int(max_downtime_ms),
            persistent=persistent,
            domain=dom,
            connection=conn,
            events_before=events_before,
            generation=generation,
        )

    def setup_is_current(self, setup: MigrationSetup, uuid: str, max_downtime_ms: int | None) -> bool:
        """Whether ``setup`` still holds for a migration of ``uuid`` with ``max_downtime_ms``:
        made on this connection, for that downtime, and no lifecycle event of the domain has
        come since it began. Without lifecycle events a stop and start could go unnoticed, so
        then no setup is current. (An event still on its way from libvirtd is not seen: a
        domain restarted within that moment migrates with QEMU's default downtime.)"""
        wanted = None if max_downtime_ms is None else int(max_downtime_ms)
        if (
            setup.uuid != uuid
            or setup.max_downtime_ms != wanted
            or self._lifecycle_cb_id is None
            or setup.connection is not self._conn
        ):
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
        tls: bool = False,
    ) -> None:
        """Migrate a running domain to dest_uri (see the module docstring).

        ``dest_uri``: the destination libvirt URI (as the *source* libvirtd sees it for
        peer-to-peer, as this process sees it for managed). ``migration_uri``: where QEMU sends the
        data (VIR_MIGRATE_PARAM_URI, e.g. ``tcp://10.77.0.2``). Raises HypervisorError, or
        HypervisorTimeout after aborting the job when it takes longer than timeout_s. ``setup``:
        what ``prepare_migration()`` made earlier; made again here unless it is still current.
        ``auto_converge``: QEMU may throttle the guest's vCPUs, more at each pass, until the
        migration converges (VIR_MIGRATE_AUTO_CONVERGE; the VM's ``migration_auto_converge``).
        ``tls``: QEMU streams the memory over TLS (VIR_MIGRATE_TLS; both libvirtds need the
        certificates of qemu.conf's ``migrate_tls_x509_cert_dir``, and the target's must name the
        address of ``migration_uri``, which the source checks).
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
        if tls:
            flags |= libvirt.VIR_MIGRATE_TLS
        if setup.persistent:
            flags |= libvirt.VIR_MIGRATE_PERSIST_DEST | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE

        key = uuid.lower()
        own_connection = peer_to_peer and not self.uri.startswith("test:")

        def run() -> None:
            try:
                if own_connection:
                    self._migrate_on_own_connection(uuid, dest_uri, params, flags)
                    return
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
            finally:
                with self._migrating_lock:
                    self._migrating_out.discard(key)

        log.debug("migrating %s to %s (params %s, flags %#x)", uuid, dest_uri, params, flags)
        with self._migrating_lock:
            self._migrating_out.add(key)
        try:
            call = _Call("migrate", uuid, _guarded(setup.connection, run)).start()
        except BaseException:
            with self._migrating_lock:
                self._migrating_out.discard(key)
            raise
        if call.wait(timeout_s):
            self._migrate_result(call, setup.generation)
            return

        # Too slow: abort the job, then give the migrate call a moment to return.
        try:
            self._run("migrate", uuid, _guarded(setup.connection, dom.abortJob), None, generation=setup.generation)
            aborted = "the job was aborted"
        except HypervisorError as exc:
            aborted = f"aborting the job failed: {exc.message}"
        if call.wait(self.abort_wait_s):
            try:
                self._migrate_result(call, setup.generation)
            except HypervisorUnavailable:
                raise
            except HypervisorError as exc:
                raise HypervisorTimeout(
                    "migrate",
                    uuid,
                    None,
                    f"migration to {dest_uri} did not finish within {timeout_s:g} s; {aborted} ({exc.message})",
                ) from None
            log.warning("migration of %s to %s completed while being aborted", uuid, dest_uri)
            return
        self._count_abandoned()
        raise HypervisorTimeout(
            "migrate",
            uuid,
            None,
            f"migration to {dest_uri} did not finish within {timeout_s:g} s; {aborted}, "
            f"but the migrate call still has not returned; its thread was abandoned",
        )

    def _migrate_on_own_connection(self, uuid: str, dest_uri: str, params: dict[str, Any], flags: int) -> None:
        """``migrateToURI3`` of ``uuid`` on a connection opened for this migration alone (see the
        module docstring: a long call on the shared connection holds up the replies to every other
        thread's calls). Runs in the migrate call's thread; raises _ConnectionLost when the call
        failed because that connection died (libvirtd went away), libvirtError otherwise."""
        conn = libvirt.open(self.uri)
        try:
            if self._events:
                try:  # as on the shared connection: a dead libvirtd fails the call instead of hanging it
                    conn.setKeepAlive(self.KEEPALIVE_INTERVAL_S, self.KEEPALIVE_COUNT)
                except libvirt.libvirtError as exc:
                    log.debug("libvirt keepalive not enabled on the migration's connection: %s", exc)
            _guarded(conn, lambda: conn.lookupByUUIDString(uuid).migrateToURI3(dest_uri, params, flags))()
        finally:
            try:
                conn.close()
            except libvirt.libvirtError as exc:
                log.debug("closing the migration's connection failed: %s", exc)

    def _migrate_result(self, call: _Call, generation: int) -> None:
        """The finished migrate call's outcome; HypervisorUnavailable when this side's own
        connection was lost under it (where the VM runs is then for libvirt to say, once
        reconnected: libvirtd recovers or cancels the job it had when it died)."""
        try:
            call.result()
        except _ConnectionLost as exc:
            message = exc.error.get_error_message() or str(exc.error)
            self._lose(generation, HEALTH_DOWN, f"the connection failed: {message}")
            raise HypervisorUnavailable(
                "migrate",
                call.domain,
                exc.error.get_error_code(),
                f"the connection to libvirtd was lost during the migration ({message}); reconnecting",
            ) from None
