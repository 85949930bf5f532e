"""CPU the lab's processes use during a timed run, by role, read from /proc (bench f).

f's two sides do not run beside the same processes: our flush runs with the daemons (and
ZooKeeper serving them) beside the six busy guests on a 2-core machine, the virsh loops with the
daemons stopped. What each role took of the CPU during each timed run says whether that costs our
side anything measurable. ``CpuUse`` samples every process in the given network namespaces (the
lab's hosts: the daemons, ZooKeeper, libvirtd, QEMU) from /proc every ``period_s`` and sums, per
role, each process's user and system time over the run: from its value at the first sample (0 for
a process started during the run, such as a target's QEMU) to its last sample. A process that ends
between two samples (a source's QEMU after its migration) loses what it used since its last one
(at most ``period_s`` of CPU time per process and CPU), on both sides alike. Beside the roles,
the machine's busy CPU (from /proc/stat, every process's) and the load average (1 minute) sampled
over the run.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from pathlib import Path

from .lab import netns_inode, netns_inode_of_pid

ROLES = ("daemon", "zookeeper", "libvirtd", "qemu", "other")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def proc_cpu(pid: int) -> tuple[str, int, float] | None:
    """(comm, start time in clock ticks, user + system CPU seconds of all its threads) of
    ``pid``; None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    comm = stat[stat.index("(") + 1 : stat.rindex(")")]
    fields = stat[stat.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15, starttime 22
    return comm, int(fields[19]), (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def machine_cpu() -> tuple[float, float]:
    """(busy, all) CPU seconds of the machine since boot, summed over its CPUs (/proc/stat)."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    # user nice system idle iowait irq softirq steal (guest and guest_nice are inside user/nice)
    idle = values[3] + values[4]
    total = sum(values[:8])
    return (total - idle) / CLOCK_TICKS, total / CLOCK_TICKS


def load_average() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def role_of(comm: str, pid: int, daemon_pids: set[int]) -> str:
    if pid in daemon_pids:
        return "daemon"
    if comm.startswith("qemu"):
        return "qemu"
    if comm == "libvirtd":
        return "libvirtd"
    if comm == "java":
        return "zookeeper"
    return "other"


class CpuUse:
    """Start with ``start()`` (the first sample is taken before it returns), end with ``stop()``,
    which takes a last sample and returns the figures (``figures()``): CPU seconds per role of
    ROLES and ``other_by_name``, ``machine_busy_s`` (every process's) and ``machine_cores`` (the CPUs the machine
    counted), ``load_min``/``load_mean``/``load_max`` (1-minute load average over the samples).
    ``inodes``: the network namespaces' inodes whose processes count; ``daemon_pids``: which of
    them are our daemons."""

    def __init__(self, inodes: Iterable[int], daemon_pids: Iterable[int] = (), period_s: float = 0.5) -> None:
        self.inodes = set(inodes)
        self.daemon_pids = set(daemon_pids)
        self.period_s = period_s
        self._first: dict[tuple[int, int], float] = {}
        self._last: dict[tuple[int, int], float] = {}
        self._comm: dict[tuple[int, int], str] = {}
        self._loads: list[float] = []
        self._machine: list[tuple[float, float]] = []
        self._samples = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def of_lab(cls, lab, daemon_pids: Iterable[int | None] = ()) -> CpuUse:
        """Every process in the lab's hosts' namespaces (not the switch's or the controller's)."""
        inodes = [netns_inode(h.netns) for h in lab.hosts]
        return cls([i for i in inodes if i is not None], [p for p in daemon_pids if p is not None])

    def sample(self) -> None:
        initial = self._samples == 0
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            if netns_inode_of_pid(pid) not in self.inodes:
                continue
            got = proc_cpu(pid)
            if got is None:
                continue
            comm, started, cpu = got
            key = (pid, started)
            if key not in self._first:
                # at the first sample: what it used before the run is not the run's; a process
                # started during the run used all of its CPU in the run
                self._first[key] = cpu if initial else 0.0
            # the name it has now: a QEMU is first seen as libvirtd's child, before its exec
            self._comm[key] = comm
            self._last[key] = cpu
        self._loads.append(load_average())
        self._machine.append(machine_cpu())
        self._samples += 1

    def start(self) -> CpuUse:
        self.sample()
        self._thread = threading.Thread(target=self._run, name="cpu-use", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):  # a sampling period, not a wait for a state
            self.sample()

    def stop(self) -> dict[str, float]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()
        return self.figures()

    def figures(self) -> dict[str, float]:
        used = dict.fromkeys(ROLES, 0.0)
        others: dict[str, float] = {}
        for key, last in self._last.items():
            role = role_of(self._comm[key], key[0], self.daemon_pids)
            used[role] += last - self._first[key]
            if role == "other":
                others[self._comm[key]] = others.get(self._comm[key], 0.0) + last - self._first[key]
        (busy0, all0), (busy1, all1) = self._machine[0], self._machine[-1]
        elapsed = all1 - all0
        return {
            **{role: round(value, 2) for role, value in used.items()},
            "machine_busy_s": round(busy1 - busy0, 2),
            "machine_busy_share": round((busy1 - busy0) / elapsed, 3) if elapsed > 0 else 0.0,
            "load_min": min(self._loads),
            "load_mean": round(sum(self._loads) / len(self._loads), 2),
            "load_max": max(self._loads),
            # what "other" was, by process name (those that used 0.05 s or more)
            "other_by_name": {name: round(value, 2) for name, value in sorted(others.items()) if value >= 0.05},
        }
