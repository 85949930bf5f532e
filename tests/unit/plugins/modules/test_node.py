# -*- coding: utf-8 -*-
# Copyright: pvc.cluster developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""pvc.cluster.node: the domain state to write and the drain plan (no ZooKeeper)."""

from __future__ import annotations

import json
import uuid as uuidlib

import pytest

from ansible_collections.pvc.cluster.plugins.module_utils._module import ModuleFailure
from ansible_collections.pvc.cluster.plugins.module_utils._report import ClusterSnapshot
from ansible_collections.pvc.cluster.plugins.modules import node as module

from ansible_collections.pvc.cluster.tests.unit.plugins.modules.cluster_builders import FakeStore, make_node, make_vm


@pytest.mark.parametrize(
    "current, state, written, changed",
    [
        ("ready", "flushed", "flush", True),
        ("unflush", "flushed", "flush", True),  # a new request stops the running ready
        ("flush", "flushed", "flush", False),  # on its way: wait for it
        ("flushed", "flushed", "flushed", False),
        ("flushed", "ready", "unflush", True),
        ("flush", "ready", "unflush", True),
        ("unflush", "ready", "unflush", False),
        ("ready", "ready", "ready", False),
    ],
)
def test_plan_state(current, state, written, changed):
    differences = module.plan_state(current, state)
    assert differences.changed is changed
    assert differences.diff() == {"before": {"domain_state": current}, "after": {"domain_state": written}}


def test_a_halted_flush_is_asked_again_and_its_verdict_deleted():
    """A flush its daemon halted under require_n1 stays `flush`: state=flushed writes `flush` again
    (the daemon checks again) and the diff shows the verdict going."""
    differences = module.plan_state("flush", "flushed", "flush of hv1 halted ...")
    assert differences.changed is True
    assert differences.diff() == {
        "before": {"domain_state": "flush", "flush_halted": "flush of hv1 halted ..."},
        "after": {"domain_state": "flush", "flush_halted": None},
    }
    # a verdict says nothing to the other requests
    assert module.plan_state("ready", "ready", None).changed is False
    assert module.plan_state("flushed", "flushed", "old verdict").changed is False


@pytest.mark.parametrize(
    "values, message",
    [
        ({"name": "", "wait_timeout": 10}, "name must not be empty"),
        (
            {"name": "n1", "wait_timeout": 0},
            "wait_timeout must be a number of seconds from 1 to 604800 (7 days), not 0",
        ),
        (
            {"name": "n1", "wait_timeout": 99999999999},
            "wait_timeout must be a number of seconds from 1 to 604800 (7 days), not 99999999999",
        ),
    ],
)
def test_bad_input(values, message):
    with pytest.raises(ModuleFailure) as failure:
        module.check_input(values)
    assert message in failure.value.msg


def u(name: str) -> str:
    """The UUID of the test VM called ``name`` (stored UUIDs are decoded: they must be UUIDs)."""
    return str(uuidlib.uuid5(uuidlib.NAMESPACE_DNS, name))


def raw_node(domain_state="ready", memtotal=8192, memprov=0, running=()):
    return {
        "daemon_state": "run",
        "domain_state": domain_state,
        "memtotal": str(memtotal),
        "memprov": str(memprov),
        "memfree": str(memtotal - memprov),
        "memreserve": "0",
        "runningdomains": json.dumps([u(x) for x in running]),
    }


def snapshot(vms, nodes):
    result = ClusterSnapshot()
    result.nodes = nodes
    result.reservations = {name: {} for name in nodes}
    result.vms = {vm.uuid: vm for vm in vms}
    return result


def test_flush_report_plans_every_running_vm_and_checks_n_minus_1():
    vms = [
        make_vm("big", u("u-big"), node="n1", memory_mib=3072),
        make_vm("small", u("u-small"), node="n1", memory_mib=1024),
        make_vm("off", u("u-off"), node="n1", state="stop", memory_mib=512),
        make_vm("elsewhere", u("u-else"), node="n2", memory_mib=1024),
    ]
    nodes = {
        "n1": raw_node(memprov=4608, running=["u-big", "u-small"]),
        "n2": raw_node(memprov=1024, running=["u-else"]),
        "n3": raw_node(memtotal=4096),
    }
    plan, check = module.flush_report(snapshot(vms, nodes), "n1")
    # largest first, each to the most headroom (n2 7168 MiB, then n2 4096 = n3 4096: the name breaks the tie)
    assert [(line["name"], line["target"]) for line in plan] == [("big", "n2"), ("small", "n2")]
    assert plan[0]["reason"] == "selector mem (4096 MiB headroom left)"
    # then n2 runs 3072 + 1024 + 1024 MiB; if it failed, n3 (4096 MiB) could not take all three
    assert not check["ok"]
    assert set(check["failures"]) == {"n2"}
    assert sorted(check["checked"]) == ["n2", "n3"]


def test_a_vm_that_fits_nowhere_is_planned_for_shutdown():
    vms = [make_vm("huge", u("u-huge"), node="n1", memory_mib=12288)]
    nodes = {"n1": raw_node(memtotal=16384, memprov=12288, running=["u-huge"]), "n2": raw_node()}
    plan, check = module.flush_report(snapshot(vms, nodes), "n1")
    assert plan[0]["target"] is None
    assert "it will be shut down and marked for autostart" in plan[0]["reason"]
    # n2 is the only ready node left: its failure would leave nowhere to restart anything
    assert not check["ok"]
    assert check["failures"] == {"n2": "it is the only ready node: none is left to restart VMs on"}


def published_store(running: dict[str, list[str]], vms: dict[str, tuple[str, str]], dead=()):
    values = {}
    for node, names in running.items():
        values[f"/pvc/nodes/{node}/runningdomains"] = json.dumps([u(name) for name in names])
        values[f"/pvc/nodes/{node}/daemon_state"] = "dead" if node in dead else "run"
    for name, (node, state) in vms.items():
        values[f"/pvc/domains/{u(name)}/node"] = node
        values[f"/pvc/domains/{u(name)}/state"] = state
    return FakeStore(values)


@pytest.mark.parametrize(
    "running, vms, dead, expected",
    [
        ({"n1": [], "n2": ["a"], "n3": ["b"]}, {"a": ("n2", "start"), "b": ("n3", "start")}, (), True),
        (
            {"n1": ["a"], "n2": ["a"], "n3": ["b"]},
            {"a": ("n2", "start"), "b": ("n3", "start")},
            (),
            False,
        ),  # n1 not updated yet
        (
            {"n1": [], "n2": [], "n3": ["b"]},
            {"a": ("n2", "start"), "b": ("n3", "start")},
            (),
            False,
        ),  # n2 not updated yet
        (
            {"n1": [], "n2": [], "n3": ["b"]},
            {"a": ("n2", "stop"), "b": ("n3", "start")},
            (),
            True,
        ),  # a is not meant to run
        (
            {"n1": ["a"], "n2": ["a"], "n3": ["b"]},
            {"a": ("n2", "start"), "b": ("n3", "start")},
            ("n1",),
            True,
        ),  # n1's list is stale
    ],
)
def test_published_running_domains(running, vms, dead, expected):
    store = published_store(running, vms, dead)
    assert module.published(store, sorted(running), [u("a"), u("b")]) is expected


@pytest.mark.parametrize(
    "others, refused",
    [
        ({"n2": make_node("n2")}, False),
        ({"n2": make_node("n2", domain_state="flushed"), "n3": make_node("n3")}, False),
        ({}, True),  # a one-node cluster
        ({"n2": make_node("n2", domain_state="flushed")}, True),
        ({"n2": make_node("n2", daemon_state="dead")}, True),  # ready, but its daemon is dead
        ({"n2": make_node("n2", domain_state="unflush")}, True),  # not ready yet
    ],
)
def test_the_last_ready_node_is_not_flushed_without_force(others, refused):
    views = dict(others, n1=make_node("n1"))
    refusal = module.last_ready_refusal(views, "n1", 3)
    assert (refusal is not None) is refused
    if refused:
        assert refusal.startswith("node n1 is the last ready node of the cluster (other nodes: ")
        assert refusal.endswith(
            "flushing it would shut down its 3 running VM(s) with nowhere to move them; set force to "
            "true to flush it anyway"
        )
    if "n2" in others and refused:
        view = others["n2"]
        assert f"n2: daemon {view.daemon_state}, domain {view.domain_state}" in refusal


def test_require_n1_refuses_a_flush_whose_plan_fails_the_n1_check_naming_the_node_and_the_shortfall():
    vms = [
        make_vm("big", u("u-big"), node="n1", memory_mib=3072),
        make_vm("small", u("u-small"), node="n1", memory_mib=1024),
        make_vm("elsewhere", u("u-else"), node="n2", memory_mib=1024),
    ]
    nodes = {
        "n1": raw_node(memprov=4096, running=["u-big", "u-small"]),
        "n2": raw_node(memprov=1024, running=["u-else"]),
        "n3": raw_node(memtotal=4096),
    }
    _plan, check = module.flush_report(snapshot(vms, nodes), "n1")
    assert not check["ok"] and check["shortfalls"] == {"n2": 1024}
    refusal = module.flush_n1_refusal("n1", check)
    assert refusal.startswith(
        "the flush of node n1 would leave the cluster unable to restart every running VM after "
        "the loss of any one node (require_n1): the cluster would not survive the failure of n2:"
    )
    assert refusal.endswith("short by 1024 MiB")
    # a plan that passes is never refused
    nodes["n3"] = raw_node(memtotal=16384)
    _plan, check = module.flush_report(snapshot(vms, nodes), "n1")
    assert check["ok"] and module.flush_n1_refusal("n1", check) is None


def test_require_n1_defaults_to_the_cluster_setting():
    from ansible_collections.pvc.cluster.plugins.module_utils._report import n1_policy

    cluster = ClusterSnapshot()
    assert n1_policy(None, cluster) is False
    cluster.require_n1 = True
    assert n1_policy(None, cluster) is True
    assert n1_policy(False, cluster) is False


# ---- state=fenced (the operator's confirmation that a dead node is off) ------------------------------


def test_state_fenced_needs_confirm_down():
    with pytest.raises(ModuleFailure) as failure:
        module.check_input({"name": "n1", "wait_timeout": 10, "state": "fenced", "confirm_down": False})
    assert "confirm_down=true" in failure.value.msg


@pytest.mark.parametrize(
    "daemon_state, changed", [("fence-failed", True), ("dead", True), ("stop", True), ("fenced", False)]
)
def test_plan_fenced_writes_fenced_for_a_node_that_is_down(daemon_state, changed):
    differences = module.plan_fenced("n2", daemon_state)
    assert differences.changed is changed
    assert differences.diff() == {"before": {"daemon_state": daemon_state}, "after": {"daemon_state": "fenced"}}


@pytest.mark.parametrize("daemon_state", ["run", "init", "fencing", "shutdown"])
def test_plan_fenced_refuses_a_node_that_may_run(daemon_state):
    with pytest.raises(ModuleFailure) as failure:
        module.plan_fenced("n2", daemon_state)
    assert f"is {daemon_state}" in failure.value.msg


def test_a_refused_flush_carries_its_plan_and_n1_verdict():
    result = {"flush_plan": [{"vm": "web1", "target": None}], "survives_node_failure": {"ok": False}, "changed": True}
    failure = module.flush_refused("refused", result, require_n1=True)
    assert failure.msg == "refused"
    assert failure.result == {
        "changed": False,
        "flush_plan": [{"vm": "web1", "target": None}],
        "survives_node_failure": {"ok": False},
        "require_n1": True,
    }
