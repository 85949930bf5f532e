"""cpu_use.CpuUse (bench f's CPU per role): what it attributes, on real processes of this
machine's own network namespace. No lab needed."""

from __future__ import annotations

import os
import subprocess
import sys

from .cpu_use import CpuUse, proc_cpu, role_of
from .lab import netns_inode_of_pid

# A child that, once told to go, burns ``target`` seconds of CPU by its own count, prints what it
# burnt, and waits to be told to end: its CPU is known while it is still alive for the last sample.
BURN = """
import sys, time
target = float(sys.argv[1])
sys.stdin.readline()
began = time.process_time()
while time.process_time() < began + target:
    pass
print(time.process_time() - began, flush=True)
sys.stdin.read()
"""


def burner(target_s: float) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", BURN, str(target_s)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )


def burn(child: subprocess.Popen) -> float:
    """Let the child burn; the CPU seconds it burnt, once it has."""
    child.stdin.write("go\n")
    child.stdin.flush()
    return float(child.stdout.readline())


def finish(child: subprocess.Popen) -> None:
    child.stdin.close()
    child.wait(60)


def own_inode() -> int:
    inode = netns_inode_of_pid(os.getpid())
    assert inode is not None
    return inode


def test_a_run_counts_what_a_process_of_the_role_used_during_it():
    child = burner(0.4)
    try:
        use = CpuUse([own_inode()], daemon_pids=[child.pid], period_s=0.05).start()
        burnt = burn(child)
        figures = use.stop()
    finally:
        finish(child)
    assert burnt >= 0.4
    # /proc counts in clock ticks: within a tick or two of the child's own count
    assert burnt - 0.05 <= figures["daemon"] <= burnt + 0.2
    assert figures["machine_busy_s"] >= burnt - 0.05
    assert figures["load_min"] <= figures["load_mean"] <= figures["load_max"]


def test_a_process_started_during_the_run_counts_all_of_its_cpu():
    use = CpuUse([own_inode()], period_s=0.05).start()
    child = burner(0.3)
    try:
        use.daemon_pids.add(child.pid)  # the roles are given when the figures are made
        burnt = burn(child)
        figures = use.stop()
    finally:
        finish(child)
    # the child's own start-up (before it reads "go") counts too, as a target's QEMU's would
    assert figures["daemon"] >= burnt - 0.05


def test_what_a_process_used_before_the_first_sample_is_not_the_runs():
    child = burner(0.5)
    try:
        before = burn(child)  # it has burnt 0.5 s and now only waits
        use = CpuUse([own_inode()], daemon_pids=[child.pid], period_s=0.05).start()
        figures = use.stop()
    finally:
        finish(child)
    assert before >= 0.5
    assert figures["daemon"] < 0.1


def test_processes_of_other_namespaces_do_not_count():
    child = burner(0.3)
    try:
        use = CpuUse([own_inode() + 1_000_000_000], daemon_pids=[child.pid], period_s=0.05).start()
        burn(child)
        figures = use.stop()
    finally:
        finish(child)
    assert all(figures[role] == 0.0 for role in ("daemon", "zookeeper", "libvirtd", "qemu", "other"))
    assert figures["other_by_name"] == {}


def test_what_other_was_is_named():
    child = burner(0.3)
    try:
        use = CpuUse([own_inode()], period_s=0.05).start()
        burnt = burn(child)
        figures = use.stop()
    finally:
        finish(child)
    name = proc_cpu(os.getpid())[0]  # the child runs the same interpreter
    assert figures["other_by_name"].get(name, 0.0) >= burnt - 0.05


def test_roles_by_name():
    assert role_of("qemu-system-x86", 10, set()) == "qemu"
    assert role_of("libvirtd", 11, set()) == "libvirtd"
    assert role_of("java", 12, set()) == "zookeeper"
    assert role_of("python3", 13, {13}) == "daemon"
    assert role_of("python3", 14, {13}) == "other"
    comm, started, cpu = proc_cpu(os.getpid())
    assert comm and started > 0 and cpu > 0
    assert proc_cpu(2**22 + 12345) is None
