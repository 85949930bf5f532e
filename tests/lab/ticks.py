"""The ticks of the lab's real guests, received, and the downtime a guest saw at each switch-over.

A real lab guest (tests/lab/guest/pvc-guest.c) writes one line "<name> <boot> <seq> <monotonic us>" every
few milliseconds to a virtio console that its domain XML backs with UDP to the collector
(``GuestSpec.ticks`` in guests.py): ``TICK_PORT`` on the controller's address, from whichever host
runs the guest. ``TickCollector`` receives them in a thread of this process whose socket lives in
the controller namespace, with the kernel's arrival time of each datagram (``SO_TIMESTAMPNS``:
taken when the datagram arrives, so a busy Python thread delays nothing it measures).

Why the arrival times: QEMU stops the guest's clock while it has the guest paused (the
switch-over of a live migration; the paused time is simply missing from the guest's timeline,
here as on KVM), so the guest cannot see its own downtime. What it does see is measured from
outside, at the switch-over: the last tick that came from the source host and the first that came
from the target.

* ``gap_ms``: the time between their arrivals: how long the guest was silent, as anyone talking
  to it saw;
* ``frozen_ms``: that gap minus how far the guest's own clock moved between the two ticks: the
  time the guest did not exist (paused on the source, not yet resumed on the target). It does not
  depend on where the ticks fell in the guest's tick period, nor on a host too busy to run the
  guest (its clock runs on then), so it is the figure to compare between migrations: **the
  downtime as the guest sees it**.

A shutdown migration is not a switch-over: the guest boots again on the target, with a new boot
id and its sequence numbers from 0 again (``restarts`` reports those). Within one boot the
sequence numbers order the ticks: a tick written just before the pause may leave from the target,
after the resume, and arrive after a later one.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections import deque
from dataclasses import dataclass

from .daemons import in_netns
from .lab import LAB_NET, Lab, netns_inode

TICK_PORT = 5140
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)  # Linux; Python names it only on some builds
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
# A guest ticking every 10 ms for an hour: far more than any test, demo or benchmark keeps.
KEEP_TICKS = 360_000


@dataclass(frozen=True)
class Tick:
    arrival: float  # unix time the datagram arrived (kernel timestamp)
    boot: str  # the guest's boot id (its kernel's, shortened)
    seq: int  # the guest's tick counter (0 at boot)
    guest_us: int  # the guest's CLOCK_MONOTONIC, microseconds
    host: str  # the lab host whose QEMU sent it (nodeK)


@dataclass(frozen=True)
class Switchover:
    """Where the ticks of one guest moved from one host to another without the guest restarting."""

    source: str
    target: str
    last: Tick  # the last tick from the source
    first: Tick  # the first tick from the target

    @property
    def gap_ms(self) -> float:
        return (self.first.arrival - self.last.arrival) * 1000

    @property
    def guest_ms(self) -> float:
        """How far the guest's own clock moved between the two ticks."""
        return (self.first.guest_us - self.last.guest_us) / 1000

    @property
    def frozen_ms(self) -> float:
        """The downtime as the guest sees it (see the module docstring)."""
        return max(0.0, self.gap_ms - self.guest_ms)

    @property
    def lost_ticks(self) -> int:
        return self.first.seq - self.last.seq - 1

    def __str__(self) -> str:
        return (
            f"{self.source}->{self.target} at {time.strftime('%H:%M:%S', time.localtime(self.first.arrival))}: "
            f"guest frozen {self.frozen_ms:.0f} ms (silent {self.gap_ms:.0f} ms)"
        )


class TickCollector:
    """Receives every lab guest's ticks (see the module docstring). A context manager."""

    def __init__(self, lab: Lab, port: int = TICK_PORT) -> None:
        self.lab = lab
        self.port = port
        self._hosts = {h.address: h.name for h in lab.hosts}
        self._ticks: dict[str, deque[Tick]] = {}
        self._changed = threading.Condition()
        self._socket: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._netns: int | None = None
        self.malformed = 0

    @property
    def address(self) -> tuple[str, int]:
        """Where the guests send their ticks: the controller's lab address (``GuestSpec.ticks``)."""
        return self.lab.ctl_address, self.port

    # ---- running ----------------------------------------------------------------------------

    def ensure(self) -> TickCollector:
        """Start receiving, or start again in the controller namespace the lab has now (a lab
        taken down and up again has a new one). The ticks received so far are kept."""
        if self._socket is not None and self._netns == netns_inode(self.lab.ctl_netns):
            return self
        self.stop()
        return self.start()

    def start(self) -> TickCollector:
        self._netns = netns_inode(self.lab.ctl_netns)

        def bind() -> socket.socket:  # in a thread that joined the controller namespace
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            try:  # room for a few seconds of ticks of many guests should this thread be held up
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 << 20)
            except OSError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
            sock.bind(self.address)
            return sock

        self._socket = in_netns(self.lab.ctl_netns, bind)
        self._socket.settimeout(0.2)  # so that stop() is noticed
        self._thread = threading.Thread(target=self._run, name="tick-collector", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._socket is not None:
            self._socket.close()
            self._socket = None
        self._stop = threading.Event()  # the next start's; the old thread keeps the one it was given

    def __enter__(self) -> TickCollector:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _run(self) -> None:
        sock, stop = self._socket, self._stop
        ancillary = socket.CMSG_SPACE(16)
        while not stop.is_set():
            try:
                data, ancdata, _flags, sender = sock.recvmsg(256, ancillary)
            except TimeoutError:
                continue
            except OSError:
                if stop.is_set():
                    return
                raise
            arrival = None
            for level, kind, value in ancdata:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(value) >= 16:
                    seconds, nanoseconds = struct.unpack("qq", value[:16])
                    arrival = seconds + nanoseconds / 1e9
            tick = self._parse(data, sender[0], arrival if arrival is not None else time.time())
            if tick is None:
                self.malformed += 1
                continue
            name, tick = tick
            with self._changed:
                self._ticks.setdefault(name, deque(maxlen=KEEP_TICKS)).append(tick)
                self._changed.notify_all()

    def _parse(self, data: bytes, sender: str, arrival: float) -> tuple[str, Tick] | None:
        fields = data.split()
        if len(fields) != 4 or not sender.startswith(LAB_NET + "."):
            return None
        try:
            name, boot, seq, guest_us = fields[0].decode(), fields[1].decode(), int(fields[2]), int(fields[3])
        except (UnicodeDecodeError, ValueError):
            return None
        return name, Tick(arrival, boot, seq, guest_us, self._hosts.get(sender, sender))

    # ---- reading -----------------------------------------------------------------------------

    def ticks(self, name: str, since: float | None = None) -> list[Tick]:
        with self._changed:
            ticks = list(self._ticks.get(name, ()))
        return [t for t in ticks if since is None or t.arrival >= since]

    def wait_ticking(
        self, name: str, host: str | None = None, since: float | None = None, timeout_s: float = 120
    ) -> Tick:
        """Wait for a tick of ``name`` (from ``host``, arrived after ``since``): the guest is up.
        Woken by each tick that arrives (no polling)."""

        def found():
            for tick in reversed(self._ticks.get(name, ())):
                if since is not None and tick.arrival < since:
                    return None
                if host is None or tick.host == host:
                    return tick
            return None

        with self._changed:
            if not self._changed.wait_for(found, timeout=timeout_s):
                seen = self._ticks.get(name)
                raise AssertionError(
                    f"guest {name} sent no tick{' from ' + host if host else ''} within {timeout_s} s "
                    f"(last tick: {seen[-1] if seen else 'none ever'})"
                )
            return found()

    def boots(self, name: str, since: float | None = None) -> list[list[Tick]]:
        """``name``'s ticks since ``since``, one list per boot (in the order the boots began), each
        in the guest's own order (sequence numbers)."""
        by_boot: dict[str, list[Tick]] = {}
        for tick in self.ticks(name, since):
            by_boot.setdefault(tick.boot, []).append(tick)
        return sorted(
            (sorted(ticks, key=lambda t: t.seq) for ticks in by_boot.values()),
            key=lambda ticks: min(t.arrival for t in ticks),
        )

    def switchovers(self, name: str, since: float | None = None) -> list[Switchover]:
        """Every switch-over of ``name``'s ticks from one host to another within one boot (see the
        module docstring), in order."""
        result = []
        for ticks in self.boots(name, since):
            for previous, tick in zip(ticks, ticks[1:]):
                if tick.host != previous.host:
                    result.append(Switchover(previous.host, tick.host, previous, tick))
        return sorted(result, key=lambda switch: switch.first.arrival)

    def restarts(self, name: str, since: float | None = None) -> list[Tick]:
        """The first tick of each boot of ``name`` that began after the first boot seen since
        ``since`` (a guest started again, e.g. by a shutdown migration)."""
        return [ticks[0] for ticks in self.boots(name, since)[1:]]

    def switchover_near(
        self, name: str, start: float, end: float, host_from: str | None = None, host_to: str | None = None
    ) -> Switchover | None:
        """The switch-over of ``name`` whose first tick from the target arrived within [start, end]
        (unix times, e.g. a migration's `transferring` and `done` stamps, widened a little)."""
        for switch in self.switchovers(name, since=start - 60):
            if (
                start <= switch.first.arrival <= end
                and (host_from in (None, switch.source))
                and (host_to in (None, switch.target))
            ):
                return switch
        return None


# How the lab's measurement names itself in an audit record (guest_downtime_by).
MEASURED_BY = "lab tick collector: the guest's serial ticks at the switch-over (frozen time, tests/lab/ticks.py)"


def record_switchover(
    store, collector: TickCollector, uuid: str, name: str, entry: dict, timeout_s: float = 30
) -> Switchover | None:
    """The lab's measurement hook for item "downtime as the guest sees it": find the switch-over
    of live migration ``entry`` (an audit record, read_history's) in guest ``name``'s ticks and
    add its frozen time to the audit record (``_cluster.record_guest_downtime``). Waits (on the
    ticks, no polling) for the guest's first tick from the target after the migration began, so
    it may be called as soon as the record says done. None when no switch-over was seen (the
    guest does not tick); the figure is written only once (a record that has one keeps it)."""
    from pvc_cluster_common._cluster import record_guest_downtime

    began = entry["steps"].get("transferring", entry["steps"].get("requested"))
    ended = entry["steps"].get("done")
    if began is None or ended is None:
        return None
    try:
        first = collector.wait_ticking(name, host=entry["target"], since=began, timeout_s=timeout_s)
    except AssertionError:
        return None
    switch = collector.switchover_near(name, began, max(ended, first.arrival) + 1, entry["source"], entry["target"])
    if switch is not None:
        record_guest_downtime(store, uuid, entry["id"], switch.frozen_ms, MEASURED_BY)
    return switch
