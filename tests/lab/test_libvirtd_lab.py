"""A libvirtd restart must never cost a VM (issue #12; docs/migration-protocol.md, "libvirtd
restarts, dies or hangs"), with real daemons, real libvirtds and real QEMU guests.

Each test restarts, kills or stops (SIGSTOP) a host's libvirtd under running daemons, with or
without a migration in flight, and then checks, once the cluster settles:

* I1 the VM never ran on two hosts (libvirt on every host, sampled throughout: a libvirtd that is
  down or stopped cannot be sampled while it is, and its QEMU processes keep running);
* I2 its state is start and it runs on exactly one host, the one ZooKeeper names;
* I3 no migration record, reservation or lock is left; I4 each migration has its audit record;
* the daemon reconnected by itself (never restarted), published its libvirt health and took
  migrations again: a migration in both directions works afterwards.
"""

from __future__ import annotations

import json
import signal
import time

import pytest

from pvc_cluster_common import _schema as S
from pvc_cluster_common._cluster import read_vm
from pvc_cluster_common._requests import RequestError

from .daemons import PAUSE_ENV, PAUSE_RELEASE_ENV, RunningMonitor, lab_cluster  # noqa: F401  (fixture)

pytestmark = pytest.mark.lab

# A short step timeout, so that a side that waits for a peer which cannot act resolves in
# seconds; a libvirt call timeout shorter than the SIGSTOP test's stop.
CONFIG = {"migration": {"step_timeout_s": 8, "live_timeout_base_s": 30}, "libvirt": {"call_timeout_s": 4}}


def libvirt_health_path(cluster, node: str) -> str:
    return cluster.schema.node_key(node, S.NODE_LIBVIRT)


def wait_libvirt_health(cluster, node: str, health: str, timeout_s: float = 90) -> None:
    cluster.wait(
        libvirt_health_path(cluster, node),
        lambda value: value == health,
        timeout_s,
        f"{node} to publish libvirt {health}",
    )


def migrate_both_ways(cluster, uuid: str) -> None:
    """A migration from where the VM runs to another node and back, each done and settled."""
    home = read_vm(cluster.store, uuid).node
    away = next(node for node in ("node1", "node2") if node != home)
    for target in (away, home):
        record = cluster.request(uuid, "migrate", target=target)
        cluster.settle(uuid, timeout_s=180)
        final = cluster.history(uuid)[-1]
        assert final["id"] == record.id and final["result"] == "done", final
        assert cluster.running_nodes(cluster.libvirt_states(uuid)) == [target]


def daemons_never_restarted(cluster, pids: dict) -> None:
    for node, pid in pids.items():
        assert cluster.daemons[node].pid == pid and cluster.daemons[node].running(), f"{node}'s daemon restarted"
        assert cluster.store.find_text(cluster.schema.node_key(node, S.NODE_DAEMON_STATE)) == "run"


def wait_transfer_running(cluster, uuid: str, source: str = "node1", timeout_s: float = 90) -> None:
    """Until the source's libvirt reports the live migration job moving memory (libvirt sends no
    event for that: its job info is polled)."""
    import libvirt

    conn = cluster.host(source).connect()
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                info = conn.lookupByUUIDString(uuid).jobInfo()
            except libvirt.libvirtError:
                info = None
            # jobInfo: [type, timeElapsed (ms), timeRemaining, dataTotal, dataProcessed, ...]
            if info and info[0] != libvirt.VIR_DOMAIN_JOB_NONE and (info[4] > 0 or info[1] >= 100):
                return
            time.sleep(0.005)  # no libvirt event says "memory is moving"
    finally:
        conn.close()
    raise AssertionError(f"no live migration job of {uuid} on {source} within {timeout_s} s\n{cluster.logs()}")


def test_a_clean_libvirtd_restart_with_no_migration(lab_cluster, lab):
    """SIGTERM and restart of a target-to-be's libvirtd, then of the VM's own host's: each daemon
    publishes `down`, is no target meanwhile, reconnects by itself and publishes `ok`; the guest
    never stops; migrations both ways work afterwards (before #12: every one aborted)."""
    cluster = lab_cluster(**CONFIG)
    cluster.start("node1", "node2")
    pids = {node: cluster.daemons[node].pid for node in ("node1", "node2")}
    uuid = cluster.define_vm("idle-restart", "node1")
    cluster.wait_running_on("node1", uuid)
    domid = cluster.domain_id("node1", uuid)
    with RunningMonitor(lab.hosts[:2]) as monitor:
        for node in ("node2", "node1"):
            mark = len(cluster.daemons[node].log())
            cluster.host(node).stop_libvirtd(signal.SIGTERM)
            wait_libvirt_health(cluster, node, "down")
            if node == "node2":
                with pytest.raises(RequestError, match="libvirt is down on the node"):
                    cluster.request(uuid, "migrate", target="node2")
            cluster.host(node).start_libvirtd()
            wait_libvirt_health(cluster, node, "ok")
            cluster.daemons[node].wait_log("libvirt: reconnected", after=mark)
        assert cluster.domain_id("node1", uuid) == domid  # the guest never stopped
        migrate_both_ways(cluster, uuid)
    cluster.check_invariants([uuid], monitor)
    daemons_never_restarted(cluster, pids)


# ---- libvirtd SIGKILLed and restarted at each step of a migration ---------------------------------

# The steps a migration's record goes through (docs/migration-protocol.md, "Steps"; `done` and
# `aborted` are never stored) and how the test holds the record at each while a libvirtd dies:
# the side whose daemon waits, at which pause point (node_daemon/migration.py). A live
# migration's `transferring` is not held by a daemon: the kill lands while libvirt moves the
# memory of a guest that cannot converge (BUSY_GUEST), so the job is still running whenever the
# kill comes.
STEPS = ("requested", "prepared", "transferring", "transferred")
HOLDS = {
    ("live", "requested"): ("target", "target:before-prepare"),
    ("live", "prepared"): ("source", "source:before-transfer"),
    ("live", "transferring"): None,
    # the VM resumed on the target, whose daemon waits before `done`: the source writes `transferred`
    ("live", "transferred"): ("target", "target:before-done"),
    ("shutdown", "requested"): ("target", "target:before-prepare"),
    ("shutdown", "prepared"): ("source", "source:before-transfer"),
    # `transferring` written, the VM still running on the source, which has not shut it down yet
    ("shutdown", "transferring"): ("source", "source:before-shutdown"),
    # the VM off on the source, the target before its start claim
    ("shutdown", "transferred"): ("target", "target:before-claim"),
}
SIDES = {"source": "node1", "target": "node2"}
# A guest that writes its 24 MiB buffer over at 48 MiB/s, migrated at 16 MiB/s: no pre-copy pass
# ever leaves little enough to switch over (tests/lab/test_migration_lab.py, "busy guests"), so
# the live job runs until the completion timeout (30 s + 30 s/GiB here) unless something ends it.
BUSY_GUEST = {"dirty_mib_s": 48, "dirty_buf_mib": 24}
MIGRATE_SPEED_MIB_S = 16
# The matrix's step timeout is longer than CONFIG's: between the pause point and the kill the
# test does a few things (on a loaded machine, seconds), and the held record must not be ended
# by the peer's deadline meanwhile. No case needs a deadline to end: the reconnect brings a pass.
# Its libvirt call timeout is the lab's default, not CONFIG's 4 s (made for the SIGSTOP test):
# on a loaded machine QEMU's start once took longer, and the VM was marked failed before the
# migration was requested (a request then only re-homes it).
MATRIX_CONFIG = {"migration": {**CONFIG["migration"], "step_timeout_s": 20}}


def set_migrate_speed(cluster, node: str, uuid: str, mib_s: int | None) -> int:
    """Cap libvirt's migrate speed of the VM on ``node`` (libvirt keeps it for the domain and
    applies it when a migration starts); None: lift the cap (libvirt's maximum). Returns the
    speed libvirt had before."""
    conn = cluster.host(node).connect()
    try:
        dom = conn.lookupByUUIDString(uuid)
        before = dom.migrateGetMaxSpeed(0)
        if mib_s is not None:
            dom.migrateSetMaxSpeed(mib_s, 0)
            assert dom.migrateGetMaxSpeed(0) == mib_s
        return before
    finally:
        conn.close()


@pytest.mark.parametrize("victim", ["target", "source"])
@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("method", ["live", "shutdown"])
def test_libvirtd_killed_and_restarted_at_each_step(lab_cluster, lab, tmp_path, method, step, victim):
    """One side's libvirtd SIGKILLed while the migration's record is
    at ``step``, and started again: the migration ends (done or aborted, as the protocol and
    libvirt decide) with the VM running on exactly the node ZooKeeper names, never on two (every
    libvirtd sampled throughout), record and reservation gone and an audit record written; no
    daemon restarted, the victim's reconnected by itself; and a migration in both directions works
    afterwards.

    ``live`` is the method `default` (live, with a shutdown migration as its fallback): a dying
    libvirtd must never turn it into a shutdown migration, and a live migration that aborts leaves
    the guest running where it was, never restarted. ``shutdown`` is the method `shutdown`. The
    record is held at the step by a pause point of the side that acts next; the victim's
    libvirtd is killed, its daemon is seen to know (``libvirt`` = down), the held side is released
    at once and libvirtd restarted right after, so the released step meets a libvirtd that is
    down or just back."""
    hold = HOLDS[(method, step)]
    victim_node = SIDES[victim]
    cluster = lab_cluster(**MATRIX_CONFIG)
    release = tmp_path / "release"
    env = {SIDES[hold[0]]: {PAUSE_ENV: hold[1], PAUSE_RELEASE_ENV: str(release)}} if hold else {}
    cluster.start("node1", "node2", env=env)
    pids = {node: cluster.daemons[node].pid for node in ("node1", "node2")}
    in_flight = hold is None
    booted = time.time()
    # Only the transfer in flight needs a real guest (a busy one); the other steps take a guest
    # with no OS, which costs no boot (it ignores ACPI: a shutdown migration stops it by force
    # after shutdown_timeout_s, which changes nothing in the protocol).
    uuid = cluster.define_vm(
        f"{method}-{step}-{victim}",
        "node1",
        meta={S.META_MIGRATION_METHOD: "shutdown"} if method == "shutdown" else None,
        **(BUSY_GUEST if in_flight else {"guest": "none"}),
    )
    cluster.wait_running_on("node1", uuid)
    if in_flight:
        cluster.wait_guest_up(uuid, "node1", since=booted)  # it dirties memory once it runs
        status = cluster.guest_port(uuid).status()
        assert (status["dirty_mib_s"], status["dirty_buf_mib"]) == ("48", "24"), status
        unlimited = set_migrate_speed(cluster, "node1", uuid, MIGRATE_SPEED_MIB_S)
    domid = cluster.domain_id("node1", uuid)
    host = cluster.host(victim_node)
    mark = len(cluster.daemons[victim_node].log())
    with RunningMonitor(lab.hosts) as monitor:
        record = cluster.request(uuid, "migrate", target="node2")
        if in_flight:
            wait_transfer_running(cluster, uuid)
        else:
            cluster.daemons[SIDES[hold[0]]].wait_log(f"pause point {hold[1]} reached")
            cluster.wait_step(uuid, step)
        killed_at = time.time()
        host.stop_libvirtd(signal.SIGKILL)
        wait_libvirt_health(cluster, victim_node, "down")
        if hold:
            release.touch()
        host.start_libvirtd()
        wait_libvirt_health(cluster, victim_node, "ok")
        cluster.daemons[victim_node].wait_log("libvirt: reconnected", after=mark)
        cluster.settle(uuid, timeout_s=180)
        cluster.check_invariants([uuid], monitor)
        final = next(entry for entry in cluster.history(uuid) if entry["id"] == record.id)
        print(f"{method} {step} {victim}: {final['result']} {final.get('reason') or ''}")
        assert final["result"] in ("done", "aborted"), final
        # the kill landed at the step: the record had reached it, and had gone no further
        reached = [name for name in (*STEPS, final["result"]) if name in final["steps"]]
        assert final["steps"][step] <= killed_at, (killed_at, final)
        assert all(final["steps"][name] > killed_at for name in reached[reached.index(step) + 1 :]), (killed_at, final)
        if method == "live":
            assert final.get("method_used") in (None, "live") and not final.get("fallback_reason"), final
            if final["result"] == "aborted":
                assert cluster.domain_id("node1", uuid) == domid, "the guest was restarted"
        else:
            assert final.get("method_used") in (None, "shutdown"), final
        if in_flight:
            # the guest idle and the speed cap lifted, so that the migrations below converge
            cluster.guest_port(uuid).set_dirty_rate(0)
            home = cluster.running_nodes(cluster.libvirt_states(uuid))[0]
            set_migrate_speed(cluster, home, uuid, unlimited)
        migrate_both_ways(cluster, uuid)
    cluster.check_invariants([uuid], monitor)
    daemons_never_restarted(cluster, pids)


def test_a_libvirtd_stopped_longer_than_the_call_timeout(lab_cluster, lab):
    """SIGSTOP of the target-to-be's libvirtd for longer than the libvirt call timeout: its daemon
    finds it hung (a call times out, then its probe), publishes `hung`, is no target, keeps its
    keepalive (never marked dead), and after SIGCONT replaces the connection and takes
    migrations again."""
    cluster = lab_cluster(**CONFIG)
    cluster.start("node1", "node2")
    pids = {node: cluster.daemons[node].pid for node in ("node1", "node2")}
    uuid = cluster.define_vm("stopped-libvirtd", "node1")
    cluster.wait_running_on("node1", uuid)
    mark = len(cluster.daemons["node2"].log())
    host = cluster.host("node2")
    host.pause_libvirtd()
    try:
        # the keepalive's listing (every keepalive) times out after call_timeout_s; the probe then
        wait_libvirt_health(cluster, "node2", "hung")
        with pytest.raises(RequestError, match="libvirt is hung on the node"):
            cluster.request(uuid, "migrate", target="node2")
        # a few keepalives later it is still alive for its peers
        keepalive = cluster.schema.node_key("node2", S.NODE_KEEPALIVE)
        first = float(cluster.store.find_text(keepalive))
        cluster.wait(keepalive, lambda value: float(value or 0) > first + 3, 60, "node2's keepalives going on")
        assert cluster.store.find_text(cluster.schema.node_key("node2", S.NODE_DAEMON_STATE)) == "run"
    finally:
        host.resume_libvirtd()
    wait_libvirt_health(cluster, "node2", "ok")
    cluster.daemons["node2"].wait_log("libvirt: reconnected", after=mark)
    with RunningMonitor(lab.hosts[:2]) as monitor:
        migrate_both_ways(cluster, uuid)
    cluster.check_invariants([uuid], monitor)
    daemons_never_restarted(cluster, pids)


def test_a_live_transfer_to_a_target_whose_libvirtd_died_at_prepared_aborts_without_a_shutdown(
    lab_cluster, lab, tmp_path
):
    """The target prepared, then its libvirtd died (SIGKILL) before the source started the
    transfer (held at source:before-transfer): the live transfer cannot reach the target's
    libvirtd, and the migration (method default) aborts with the guest never stopped, instead of
    a shutdown migration to a target that cannot start it."""
    cluster = lab_cluster(**CONFIG)
    release = tmp_path / "release"
    cluster.start(
        "node1", "node2", env={"node1": {PAUSE_ENV: "source:before-transfer", PAUSE_RELEASE_ENV: str(release)}}
    )
    uuid = cluster.define_vm("prepared-kill", "node1")
    cluster.wait_running_on("node1", uuid)
    domid = cluster.domain_id("node1", uuid)
    with RunningMonitor(lab.hosts[:2]) as monitor:
        record = cluster.request(uuid, "migrate", target="node2")
        cluster.daemons["node1"].wait_log("pause point source:before-transfer reached")
        host = cluster.host("node2")
        host.stop_libvirtd(signal.SIGKILL)
        release.touch()
        cluster.wait_no_migration(uuid, timeout_s=180)
        final = cluster.history(uuid)[-1]
        assert final["id"] == record.id and final["result"] == "aborted", final
        assert "no shutdown migration is tried" in final["reason"] and not final.get("fallback_reason"), final
        assert cluster.domain_id("node1", uuid) == domid  # the guest never stopped
        host.start_libvirtd()
        wait_libvirt_health(cluster, "node2", "ok")
        migrate_both_ways(cluster, uuid)
    cluster.check_invariants([uuid], monitor)


def test_a_target_whose_libvirtd_dies_as_it_starts_a_shut_down_vm_keeps_its_claim(lab_cluster, lab, tmp_path):
    """A shutdown migration's target has claimed the start (held at target:before-start) when its
    libvirtd dies: the create cannot say whether the VM started, so the target keeps the claim and
    the source, at its deadline, does not take the VM back; once libvirtd is back the target
    starts the VM and ends the migration done."""
    cluster = lab_cluster(**CONFIG)
    release = tmp_path / "release"
    cluster.start("node1", "node2", env={"node2": {PAUSE_ENV: "target:before-start", PAUSE_RELEASE_ENV: str(release)}})
    booted = time.time()
    uuid = cluster.define_vm("claimed-start", "node1", meta={S.META_MIGRATION_METHOD: "shutdown"})
    cluster.wait_running_on("node1", uuid)
    cluster.wait_guest_up(uuid, "node1", since=booted)
    with RunningMonitor(lab.hosts[:2]) as monitor:
        record = cluster.request(uuid, "migrate", target="node2")
        target = cluster.daemons["node2"]
        target.wait_log("pause point target:before-start reached")
        host = cluster.host("node2")
        host.stop_libvirtd(signal.SIGKILL)
        release.touch()
        target.wait_log(f"migration {record.id} of {uuid}: start on target node2 not confirmed")
        # the source's step deadline passes while the target's libvirtd is down: it waits for the claim
        cluster.daemons["node1"].wait_log(f"migration {record.id} of {uuid}: resolving from libvirt")
        assert json.loads(cluster.store.find_text(cluster.schema.domain_migration(uuid)))["starting_on"] == "node2"
        host.start_libvirtd()
        cluster.settle(uuid, timeout_s=180)
        final = cluster.history(uuid)[-1]
        assert final["id"] == record.id and final["result"] == "done", final
        assert read_vm(cluster.store, uuid).node == "node2"
        migrate_both_ways(cluster, uuid)
    cluster.check_invariants([uuid], monitor)
