"""Crash safety of the migration protocol with real daemons, real libvirtds and real QEMU guests
(issue item 5; hazards 1-5 of docs/migration-protocol.md). The guests are real (tests/lab/guests.py):
a shutdown migration shuts its guest down cleanly, which each shutdown case waits to be possible
(the guest booted) before it requests the migration.

Each test migrates one VM from node1 (source) to node2 (target) and SIGKILLs the source daemon,
the target daemon or both at one step, using the daemon's fault injection
(PVC_NODE_DAEMON_CRASH_AT: the daemon kills itself at a named point; PVC_NODE_DAEMON_PAUSE_AT: it
blocks at a named point so that the test can kill it there) or the test's own SIGKILL once
ZooKeeper shows a given step. The killed daemons are restarted at once ("now"), or only after the
surviving peer has ended the migration on its own ("late"). Then, once the cluster settles:

* I1 the VM never ran on two hosts (libvirt on every host, sampled throughout, and at the end);
* I2 its state is start and it runs on exactly one host, the one ZooKeeper names;
* I3 no migration record, reservation or lock is left;
* I4 the migration has an audit record, with the result the protocol document predicts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import pytest

from pvc_cluster_common import _schema as S
from pvc_cluster_common._cluster import read_vm

from .daemons import CRASH_ENV, PAUSE_ENV, PAUSE_RELEASE_ENV, RunningMonitor, lab_cluster  # noqa: F401  (fixture)

pytestmark = pytest.mark.lab

# Shorter step timeout than the lab default so that the "late" cases (a peer timing out) take
# seconds; still far above what any step takes here.
CRASH_CONFIG = {"migration": {"step_timeout_s": 8, "live_timeout_base_s": 5}}

# How a side dies. A crash point name: the daemon SIGKILLs itself there. "held": the source is held
# at the pause point before it acts on `prepared` and killed there (hazard 1: the transfer has not
# started). "killed-at-transferring": the test kills the target when the record reaches
# `transferring` (the transfer is under way). "killed-after-source": the test kills the daemon as
# soon as the other one has crashed (both down).
HELD = "held"
AT_TRANSFERRING = "killed-at-transferring"
AFTER_SOURCE = "killed-after-source"


@dataclass(frozen=True)
class Crash:
    method: str  # the VM's migration_method: live | shutdown
    source: str | None = None  # how the source daemon dies (see above)
    target: str | None = None  # how the target daemon dies
    restart: str = "now"  # now | late (after the peer ended the migration)
    result: str = "done"  # the audit record's result
    ends_on: str = "node2"
    same_qemu: bool = False  # the VM was never stopped: same libvirt domain ID on node1
    overrides: dict = field(default_factory=dict, hash=False, compare=False)

    @property
    def id(self) -> str:
        parts = [self.method]
        if self.source:
            parts.append(f"src={self.source.removeprefix('source:')}")
        if self.target:
            parts.append(f"tgt={self.target.removeprefix('target:')}")
        parts.append(self.restart)
        return "-".join(parts)


# For cases whose outcome needs a restarted daemon back within the step timeout: a slow restart on
# a loaded machine must not turn them into the "late" case. (The timeout never fires there.)
PATIENT = {"migration": {"step_timeout_s": 30}}

CASES = [
    # hazard 1: source killed before the transfer starts; back within the step timeout it goes on
    Crash("live", source=HELD, overrides=PATIENT),
    Crash("shutdown", source=HELD, overrides=PATIENT),
    # ... and when it stays away, the target finds the VM still on the source and aborts
    Crash("live", source=HELD, restart="late", result="aborted", ends_on="node1", same_qemu=True),
    # killed right after writing `transferring`: nothing moved, the restarted source aborts
    Crash("live", source="source:transferring", result="aborted", ends_on="node1", same_qemu=True),
    Crash("shutdown", source="source:transferring", result="aborted", ends_on="node1", same_qemu=True),
    # hazard 2: killed during the live transfer (libvirtd goes on peer-to-peer), and after it
    Crash("live", source="source:live-running"),
    Crash("live", source="source:live-done"),
    # hazard 3: killed after the VM stopped for a shutdown migration; the restarted source hands it
    # on, and a source that stays away leaves the target to start it on its own timeout
    Crash("shutdown", source="source:shutdown-done"),
    Crash("shutdown", source="source:shutdown-done", restart="late"),
    # hazard 4: the target killed once prepared, during the transfer, and after the VM runs there
    Crash("live", target="target:prepared"),
    Crash("shutdown", target="target:prepared"),
    Crash("live", target=AT_TRANSFERRING),
    Crash("shutdown", target=AT_TRANSFERRING),
    Crash("live", target="target:before-done"),
    Crash("shutdown", target="target:started"),
    # ... and a target that stays away: the source settles it from libvirt's view on its timeout
    Crash("live", target="target:prepared", restart="late"),
    Crash("shutdown", target="target:prepared", restart="late", result="aborted", ends_on="node1"),
    # hazard 5: both daemons killed mid-migration and restarted together
    Crash("live", source="source:transferring", target=AFTER_SOURCE, result="aborted", ends_on="node1", same_qemu=True),
    Crash("live", source="source:live-done", target=AFTER_SOURCE),
    Crash("shutdown", source="source:shutdown-done", target=AFTER_SOURCE),
]


def config(overrides: dict) -> dict:
    return {
        section: {**CRASH_CONFIG.get(section, {}), **overrides.get(section, {})}
        for section in {*CRASH_CONFIG, *overrides}
    }


def _env(how: str | None, release) -> dict:
    if how == HELD:
        return {PAUSE_ENV: "source:before-transfer", PAUSE_RELEASE_ENV: str(release)}
    if how and ":" in how:
        return {CRASH_ENV: how}
    return {}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_daemon_killed_mid_migration(lab_cluster, lab, tmp_path, case):
    cluster = lab_cluster(**config(case.overrides))
    release = tmp_path / "never-released"  # a held source is killed, never released
    source, target = cluster.daemons["node1"], cluster.daemons["node2"]
    cluster.start(env={"node1": _env(case.source, release), "node2": _env(case.target, release)})
    booted = time.time()
    uuid = cluster.define_vm(f"crash-{case.method}", "node1", meta={S.META_MIGRATION_METHOD: case.method})
    cluster.wait_running_on("node1", uuid)
    if case.method == "shutdown":
        cluster.wait_guest_up(uuid, "node1", since=booted)  # so that it shuts down cleanly
    domid = cluster.domain_id("node1", uuid)

    with RunningMonitor(lab.hosts) as monitor:
        record = cluster.request(uuid, "migrate", target="node2")
        assert record.method == case.method

        # ---- the crash(es)
        killed = []
        if case.source == HELD:
            cluster.wait_step(uuid, "prepared")
            source.kill()  # it cannot have gone past the pause point
            killed.append("node1")
        elif case.source:
            assert source.wait_exit(timeout_s=120) == -9, source.log()[-3000:]
            killed.append("node1")
        if case.target == AT_TRANSFERRING:
            cluster.wait_step(uuid, "transferring")
            target.kill()
            killed.append("node2")
        elif case.target == AFTER_SOURCE:
            target.kill()
            killed.append("node2")
        elif case.target:
            assert target.wait_exit(timeout_s=120) == -9, target.log()[-3000:]
            killed.append("node2")

        # ---- the restart(s)
        if case.restart == "late":
            # the surviving peer ends the migration on its own, from libvirt's view
            cluster.wait_no_migration(uuid, timeout_s=180)
        for node in killed:
            cluster.daemons[node].start()  # without fault injection
        for node in killed:
            cluster.wait_daemon_state(node, "run")
        cluster.settle(uuid, timeout_s=180)

    # ---- the invariants and the predicted outcome
    cluster.check_invariants([uuid], monitor)
    final = cluster.history(uuid)[-1]
    assert final["id"] == record.id and final["result"] == case.result, final
    vm = read_vm(cluster.store, uuid)
    assert vm.state == "start" and vm.node == case.ends_on
    assert vm.lastnode == ("node1" if case.ends_on == "node2" else "")
    assert cluster.running_nodes(cluster.libvirt_states(uuid)) == [case.ends_on]
    if case.same_qemu:
        assert cluster.domain_id("node1", uuid) == domid  # never stopped
        assert monitor.ever_running_on(uuid) == {"node1"}


def test_target_restarting_while_the_source_gives_up_never_starts_a_second_copy(lab_cluster, lab, tmp_path):
    """A shutdown migration whose target was killed once prepared: the source stops the VM, writes
    `transferred` and waits. The target comes back but is held just before it starts the VM, while
    the source's step timeout passes. The source must not take the VM back and start it (the
    target is alive and about to start it), or the VM would run on both hosts."""
    # a step timeout long enough that the restarted target is surely back before the source's passes
    cluster = lab_cluster(**config({"migration": {"step_timeout_s": 12}}))
    release = tmp_path / "release"
    cluster.start(env={"node2": {CRASH_ENV: "target:prepared"}})
    booted = time.time()
    uuid = cluster.define_vm("contested-start", "node1", meta={S.META_MIGRATION_METHOD: "shutdown"})
    cluster.wait_running_on("node1", uuid)
    cluster.wait_guest_up(uuid, "node1", since=booted)
    with RunningMonitor(lab.hosts) as monitor:
        record = cluster.request(uuid, "migrate", target="node2")
        assert cluster.daemons["node2"].wait_exit(timeout_s=120) == -9
        cluster.wait_step(uuid, "transferred")
        cluster.daemons["node2"].start(**{PAUSE_ENV: "target:before-start", PAUSE_RELEASE_ENV: str(release)})
        cluster.daemons["node2"].wait_log("pause point target:before-start reached")
        # the source's step timeout passes while the target is held
        cluster.daemons["node1"].wait_log(f"migration {record.id} of {uuid}: resolving from libvirt")
        release.touch()
        cluster.settle(uuid, timeout_s=180)
    cluster.check_invariants([uuid], monitor)
    final = cluster.history(uuid)[-1]
    assert final["id"] == record.id and final["result"] == "done", final
    assert read_vm(cluster.store, uuid).node == "node2"
