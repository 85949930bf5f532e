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
    cluster.wait(libvirt_health_path(cluster, node), lambda value: value == health, timeout_s,
                 f"{node} to publish libvirt {health}")


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
        assert cluster.store.read(cluster.schema.node_key(node, S.NODE_DAEMON_STATE)) == "run"


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
            time.sleep(0.005)   # no libvirt event says "memory is moving"
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
        assert cluster.domain_id("node1", uuid) == domid   # the guest never stopped
        migrate_both_ways(cluster, uuid)
    cluster.check_invariants([uuid], monitor)
    daemons_never_restarted(cluster, pids)


@pytest.mark.parametrize("victim", ["target", "source"])
def test_libvirtd_killed_during_a_live_transfer(lab_cluster, lab, victim):
    """SIGKILL of one side's libvirtd while it moves the VM's memory, restarted at once: the
    migration ends (done or aborted, as libvirt left it) with the VM running on exactly the node
    ZooKeeper names, without a restart of any daemon."""
    cluster = lab_cluster(**CONFIG)
    cluster.start("node1", "node2")
    pids = {node: cluster.daemons[node].pid for node in ("node1", "node2")}
    booted = time.time()
    # memory dirtied all the time makes the transfer last long enough to be caught in flight
    uuid = cluster.define_vm(f"live-kill-{victim}", "node1", dirty_mib_s=40)
    cluster.wait_running_on("node1", uuid)
    cluster.wait_guest_up(uuid, "node1", since=booted)
    with RunningMonitor(lab.hosts[:2]) as monitor:
        record = cluster.request(uuid, "migrate", target="node2")
        wait_transfer_running(cluster, uuid)
        host = cluster.host("node2" if victim == "target" else "node1")
        host.stop_libvirtd(signal.SIGKILL)
        host.start_libvirtd()
        cluster.settle(uuid, timeout_s=180)
        cluster.check_invariants([uuid], monitor)
        final = next(entry for entry in cluster.history(uuid) if entry["id"] == record.id)
        assert final["result"] in ("done", "aborted"), final
        assert final["method_used"] == "live" and not final.get("fallback_reason"), final   # never shut down
        migrate_both_ways(cluster, uuid)
    cluster.check_invariants([uuid], monitor)
    daemons_never_restarted(cluster, pids)


@pytest.mark.parametrize("victim", ["target", "source"])
def test_libvirtd_killed_during_a_shutdown_migration(lab_cluster, lab, victim):
    """SIGKILL of one side's libvirtd at `transferring` of a shutdown migration (the source is
    shutting the guest down), restarted at once: the VM ends running on exactly one node, one
    side starting it (the start claim decides), with record and reservation gone."""
    cluster = lab_cluster(**CONFIG)
    cluster.start("node1", "node2")
    pids = {node: cluster.daemons[node].pid for node in ("node1", "node2")}
    booted = time.time()
    uuid = cluster.define_vm(f"shutdown-kill-{victim}", "node1", meta={S.META_MIGRATION_METHOD: "shutdown"})
    cluster.wait_running_on("node1", uuid)
    cluster.wait_guest_up(uuid, "node1", since=booted)
    with RunningMonitor(lab.hosts[:2]) as monitor:
        record = cluster.request(uuid, "migrate", target="node2")
        cluster.wait_step(uuid, "transferring")
        host = cluster.host("node2" if victim == "target" else "node1")
        host.stop_libvirtd(signal.SIGKILL)
        host.start_libvirtd()
        cluster.settle(uuid, timeout_s=180)
        cluster.check_invariants([uuid], monitor)
        final = next(entry for entry in cluster.history(uuid) if entry["id"] == record.id)
        assert final["result"] in ("done", "aborted"), final
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
        first = float(cluster.store.read(keepalive))
        cluster.wait(keepalive, lambda value: float(value or 0) > first + 3, 60, "node2's keepalives going on")
        assert cluster.store.read(cluster.schema.node_key("node2", S.NODE_DAEMON_STATE)) == "run"
    finally:
        host.resume_libvirtd()
    wait_libvirt_health(cluster, "node2", "ok")
    cluster.daemons["node2"].wait_log("libvirt: reconnected", after=mark)
    with RunningMonitor(lab.hosts[:2]) as monitor:
        migrate_both_ways(cluster, uuid)
    cluster.check_invariants([uuid], monitor)
    daemons_never_restarted(cluster, pids)


def test_a_live_transfer_to_a_target_whose_libvirtd_died_at_prepared_aborts_without_a_shutdown(lab_cluster, lab,
                                                                                               tmp_path):
    """The target prepared, then its libvirtd died (SIGKILL) before the source started the
    transfer (held at source:before-transfer): the live transfer cannot reach the target's
    libvirtd, and the migration (method default) aborts with the guest never stopped, instead of
    a shutdown migration to a target that cannot start it."""
    cluster = lab_cluster(**CONFIG)
    release = tmp_path / "release"
    cluster.start("node1", "node2", env={"node1": {PAUSE_ENV: "source:before-transfer",
                                                   PAUSE_RELEASE_ENV: str(release)}})
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
        assert cluster.domain_id("node1", uuid) == domid   # the guest never stopped
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
    cluster.start("node1", "node2", env={"node2": {PAUSE_ENV: "target:before-start",
                                                   PAUSE_RELEASE_ENV: str(release)}})
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
        assert json.loads(cluster.store.read(cluster.schema.domain_migration(uuid)))["starting_on"] == "node2"
        host.start_libvirtd()
        cluster.settle(uuid, timeout_s=180)
        final = cluster.history(uuid)[-1]
        assert final["id"] == record.id and final["result"] == "done", final
        assert read_vm(cluster.store, uuid).node == "node2"
        migrate_both_ways(cluster, uuid)
    cluster.check_invariants([uuid], monitor)
