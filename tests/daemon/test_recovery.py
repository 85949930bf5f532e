"""The high availability decisions (node_daemon/recovery.py): pure logic, no I/O."""

from __future__ import annotations

import pytest

from pvc_cluster_common._cluster import VMRecord
from pvc_cluster_common._meta import VMMeta
from pvc_cluster_common._records import MigrationRecord
from pvc_cluster_common._selector import NodeView
from pvc_node_daemon.recovery import (
    Act,
    LivenessTracker,
    RecoveryStart,
    fence_decision,
    plan_recovery,
)


def node(name, *, daemon="run", domain="ready", total=16384, prov=0):
    return NodeView(name=name, daemon_state=daemon, domain_state=domain, memtotal=total, memfree=total, memprov=prov)


def vm(
    uuid,
    *,
    node="dead",
    state="start",
    memory=1024,
    lastnode="",
    limit=(),
    selector="default",
    source=None,
    target=None,
    invalid="",
    xml_error="",
):
    """The record of a VM as a fresh read makes it; ``source``/``target``: its in-flight
    migration; ``invalid``: why its migration record is not valid."""
    migration = None
    if source or target:
        migration = MigrationRecord(
            id="m", vm=uuid, kind="migrate", source=source, target=target, method="live", memory_mib=memory, step="live"
        )
    return VMRecord(
        uuid=uuid,
        name=uuid,
        state=state,
        node=node,
        lastnode=lastnode,
        meta=VMMeta(node_limit=tuple(limit), node_selector=selector),
        memory_mib=memory,
        vcpus=1,
        migration=migration,
        migration_error=invalid,
        xml_error=xml_error,
    )


# ---- liveness -------------------------------------------------------------------------------------


def test_a_peer_is_stale_only_after_a_whole_window_without_a_new_keepalive():
    tracker = LivenessTracker(window_s=4.0)
    tracker.connected(now=0.0)
    tracker.observe("n2", "100.0", now=0.0)
    assert not tracker.stale("n2", now=3.9)
    tracker.observe("n2", "101.0", now=3.0)  # it wrote again: a new window
    assert not tracker.stale("n2", now=6.9)
    tracker.observe("n2", "101.0", now=6.9)  # the same value seen again changes nothing
    assert tracker.stale("n2", now=7.0)


def test_after_a_reconnect_every_peer_gets_a_whole_window_again():
    # after a lost quorum every keepalive is old: nobody may be declared dead for that
    tracker = LivenessTracker(window_s=4.0)
    tracker.connected(now=0.0)
    tracker.observe("n2", "1.0", now=0.0)
    tracker.disconnected()
    assert not tracker.stale("n2", now=100.0)  # no session, no decisions
    tracker.connected(now=100.0)
    tracker.observe("n2", "1.0", now=100.0)
    assert not tracker.stale("n2", now=103.9)
    assert tracker.stale("n2", now=104.0)


def test_a_peer_never_observed_is_not_stale():
    tracker = LivenessTracker(window_s=1.0)
    tracker.connected(now=0.0)
    assert not tracker.stale("n9", now=50.0)


# ---- decisions ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "daemon, domain, maintenance, stale, act",
    [
        ("run", "ready", False, False, Act.NOTHING),
        ("run", "ready", False, True, Act.MARK_DEAD),
        ("run", "ready", True, True, Act.MARK_DEAD),  # marked dead, but see below: never fenced
        ("dead", "ready", False, False, Act.FENCE),
        ("fencing", "ready", False, False, Act.FENCE),  # the actor died while fencing: fence again
        ("dead", "ready", True, False, Act.MAINTENANCE),  # the explicit flag
        ("dead", "flushed", False, False, Act.MAINTENANCE),  # nothing of it should run
        ("dead", "flush", False, False, Act.FENCE),  # a flush in progress still has VMs
        ("fenced", "flushed", False, False, Act.RECOVER),
        ("fence-failed", "ready", False, False, Act.WAIT_OPERATOR),
        ("stop", "ready", False, True, Act.NOTHING),  # an orderly stop: its VMs keep running
        ("init", "ready", False, True, Act.NOTHING),
    ],
)
def test_fence_decision(daemon, domain, maintenance, stale, act):
    assert fence_decision(daemon, domain, maintenance, stale).act is act


# ---- the recovery plan ----------------------------------------------------------------------------


def test_every_vm_that_should_run_is_placed_by_the_selector_with_the_dead_node_as_home():
    nodes = {"dead": node("dead", daemon="fenced", domain="flushed"), "a": node("a", prov=8192), "b": node("b")}
    plan = plan_recovery(
        "dead",
        [vm("v1", memory=4096), vm("v2", state="stop"), vm("v3", state="restart")],
        nodes,
        fenced={"dead"},
        default_selector="mem",
    )
    assert plan.starts == [RecoveryStart("v1", "b", "dead"), RecoveryStart("v3", "b", "dead")]
    assert not plan.unplaced and not plan.waiting and not plan.aborts


def test_node_limit_and_fit_are_respected_and_what_fits_nowhere_is_reported():
    nodes = {
        "dead": node("dead", daemon="fenced", domain="flushed"),
        "a": node("a", total=4096),
        "b": node("b", total=16384),
        "c": node("c", daemon="dead"),
    }
    plan = plan_recovery(
        "dead",
        [vm("big", memory=8192, limit=("a", "c")), vm("small", memory=2048, limit=("a",)), vm("huge", memory=65536)],
        nodes,
        fenced={"dead"},
        default_selector="mem",
    )
    assert plan.starts == [RecoveryStart("small", "a", "dead")]
    assert set(plan.unplaced) == {"big", "huge"}
    assert "fits on no other node" in plan.unplaced["big"]


def test_planned_vms_are_booked_so_a_node_is_never_overfilled():
    nodes = {"dead": node("dead", daemon="fenced"), "a": node("a", total=4096), "b": node("b", total=4096)}
    plan = plan_recovery("dead", [vm(f"v{i}", memory=2048) for i in range(5)], nodes, default_selector="mem")
    placed = [start.target for start in plan.starts]
    assert sorted(placed) == ["a", "a", "b", "b"] and len(plan.unplaced) == 1


def test_a_vm_whose_home_is_elsewhere_keeps_its_home_and_goes_there_when_it_can():
    nodes = {"dead": node("dead", daemon="fenced"), "home": node("home"), "big": node("big", total=65536)}
    plan = plan_recovery("dead", [vm("v1", lastnode="home")], nodes, default_selector="mem")
    assert plan.starts == [RecoveryStart("v1", "home", "")]  # back home: no lastnode left
    nodes["home"] = node("home", domain="flushed")
    plan = plan_recovery("dead", [vm("v1", lastnode="home")], nodes, default_selector="mem")
    assert plan.starts == [RecoveryStart("v1", "big", "home")]  # elsewhere: its home stays its home


def test_a_migration_with_a_live_node_waits_and_one_between_fenced_nodes_is_ended():
    nodes = {"dead": node("dead", daemon="fenced"), "a": node("a"), "other": node("other", daemon="fenced")}
    plan = plan_recovery(
        "dead",
        [
            vm("m1", source="dead", target="a"),
            vm("m2", node="a", source="a", target="dead"),
            vm("m3", source="dead", target="other"),
        ],
        nodes,
        fenced={"dead", "other"},
        default_selector="mem",
    )
    assert set(plan.waiting) == {"m1", "m2"} and plan.aborts == ["m3"] and not plan.starts
    assert not plan.done


def test_invalid_vms_stay_with_the_reason():
    nodes = {"dead": node("dead", daemon="fenced"), "a": node("a")}
    plan = plan_recovery(
        "dead",
        [vm("bad", invalid="migration: not JSON"), vm("badxml", xml_error="no memory")],
        nodes,
        default_selector="mem",
    )
    assert not plan.starts and set(plan.unplaced) == {"bad", "badxml"} and plan.done
