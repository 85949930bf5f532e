"""Target selection, flush plans and the n-1 check."""

from __future__ import annotations

import dataclasses
import random
import statistics
from fractions import Fraction

import pytest

from pvc_cluster_common._selector import (
    FIT_TIGHT_SHARE,
    FailureCheck,
    FlushVM,
    NodeView,
    NoTargetError,
    PlannedMove,
    apply_plan,
    plan_flush,
    rejection_reasons,
    resolve_selector,
    select_target,
    survives_node_failure,
)


def node(
    name,
    *,
    daemon="run",
    domain="ready",
    total=16384,
    used=0,
    free=None,
    prov=0,
    reserve=0,
    reserved=0,
    load=0.0,
    vcpus=0,
    vms=0,
):
    return NodeView(
        name=name,
        daemon_state=daemon,
        domain_state=domain,
        memtotal=total,
        memused=used,
        memfree=total - used if free is None else free,
        memprov=prov,
        memreserve=reserve,
        reserved=reserved,
        cpuload=load,
        vcpualloc=vcpus,
        domaincount=vms,
    )


# ---- NodeView -----------------------------------------------------------------------------------


def test_headroom_counts_reserve_provisioned_and_reservations():
    assert node("n", total=16384, prov=4096, reserve=1024, reserved=2048).headroom == 16384 - 4096 - 1024 - 2048
    assert node("n", total=1024, prov=2048).headroom == -1024


def test_from_store_parses_and_tolerates_garbage():
    raw = {
        "daemon_state": "run",
        "domain_state": "ready",
        "memtotal": "16384",
        "memused": "2048",
        "memfree": "14336",
        "memprov": "4096",
        "memreserve": "512",
        "cpuload": "1.25",
        "vcpualloc": "6",
        "domaincount": "3",
    }
    view = NodeView.from_store("node1", raw, reservations_mib=1024)
    assert view == NodeView("node1", "run", "ready", 16384, 2048, 14336, 4096, 512, 1024, 1.25, 6, 3)
    assert view.headroom == 16384 - 512 - 4096 - 1024
    assert view.is_eligible
    garbage = NodeView.from_store(
        "node2", {"memtotal": "lots", "cpuload": "nan", "memprov": "1024.0", "vcpualloc": None}
    )
    assert (garbage.daemon_state, garbage.domain_state) == ("init", "flushed")
    assert (garbage.memtotal, garbage.cpuload, garbage.memprov, garbage.vcpualloc) == (0, 0.0, 1024, 0)
    assert garbage.headroom < 0 and not garbage.is_eligible


# ---- selectors ----------------------------------------------------------------------------------

# Four ready nodes, each best for one selector. headroom: a 12288, b 8192, c 4096, d 2048 (all 16 GiB).
CLUSTER = [
    node("a", prov=4096, free=1000, load=3.0, vcpus=10, vms=5),
    node("b", prov=8192, free=9000, load=2.0, vcpus=12, vms=6),
    node("c", prov=12288, free=5000, load=0.5, vcpus=8, vms=7),
    node("d", prov=14336, free=3000, load=4.0, vcpus=2, vms=1),
]


@pytest.mark.parametrize(
    "selector,expected",
    [("mem", "a"), ("memfree", "b"), ("load", "c"), ("vcpus", "d"), ("vms", "d"), ("memprov", "a")],
)
def test_each_selector(selector, expected):
    assert select_target(1024, None, None, selector, CLUSTER) == expected


@pytest.mark.parametrize(
    "default_selector,expected",
    [("mem", "a"), ("load", "c"), ("vms", "d"), (None, "a"), ("default", "a"), ("junk", "a")],
)
@pytest.mark.parametrize("selector", ["default", None, "none"])
def test_default_selector_resolves_to_cluster_default(selector, default_selector, expected):
    assert select_target(1024, None, None, selector, CLUSTER, default_selector=default_selector) == expected


def test_unknown_selector_is_a_value_error():
    with pytest.raises(ValueError, match="fastest"):
        select_target(1024, None, None, "fastest", CLUSTER)


def test_resolve_selector():
    assert resolve_selector("default", "vms") == "vms"
    assert resolve_selector("load", "vms") == "load"
    assert resolve_selector(None, None) == "mem"


def test_selector_only_among_nodes_the_vm_fits():
    # load prefers c (0.5) but c has 4096 MiB headroom; a 6000 MiB VM goes to the next best that fits: b (2.0)
    assert select_target(6000, None, None, "load", CLUSTER) == "b"
    # vcpus prefers d, which has 2048 MiB headroom; a 4096 MiB VM fits on c exactly (boundary: <=)
    assert select_target(4096, None, None, "vcpus", CLUSTER) == "c"
    assert select_target(4097, None, None, "vcpus", CLUSTER) == "a"


@pytest.mark.parametrize("selector", ["mem", "memfree", "load", "vcpus", "vms"])
def test_ties_break_by_headroom_then_name_whatever_the_order(selector):
    # All equal on every primary key; y and z have more headroom than x; y < z by name.
    nodes = [
        node("x", prov=8192, free=5000, load=1.0, vcpus=4, vms=2),
        node("z", prov=4096, free=5000, load=1.0, vcpus=4, vms=2),
        node("y", prov=4096, free=5000, load=1.0, vcpus=4, vms=2),
    ]
    rng = random.Random(7)
    for _ in range(6):
        rng.shuffle(nodes)
        assert select_target(1024, None, None, selector, nodes) == "y"


def test_tie_on_name_uses_plain_string_order():
    nodes = [node("node2"), node("node10")]
    assert select_target(1024, None, None, "mem", nodes) == "node10"


def test_fit_counts_host_reserve_and_reservations():
    # 16384 total - 2048 reserve - 8192 provisioned - 4096 reserved = 2048 headroom
    nodes = [node("a", prov=8192, reserve=2048, reserved=4096)]
    assert select_target(2048, None, None, "mem", nodes) == "a"
    with pytest.raises(NoTargetError) as excinfo:
        select_target(2049, None, None, "mem", nodes)
    assert excinfo.value.reasons == {"a": "needs 2049 MiB, has 2048 MiB headroom"}


def test_node_limit():
    assert select_target(1024, None, ["c", "d"], "mem", CLUSTER) == "c"
    assert select_target(1024, None, ("d",), "load", CLUSTER) == "d"
    assert select_target(1024, None, [], "mem", CLUSTER) == "a"  # empty = any
    assert select_target(1024, None, "c,d", "mem", CLUSTER) == "c"  # the stored/legacy string form
    assert select_target(1024, None, '["d"]', "mem", CLUSTER) == "d"


def test_current_node_and_exclude_are_never_chosen():
    assert select_target(1024, "a", None, "mem", CLUSTER) == "b"
    assert select_target(1024, "a", None, "mem", CLUSTER, exclude=["b"]) == "c"


def test_accepts_a_mapping_of_nodes():
    assert select_target(1024, None, None, "vms", {n.name: n for n in CLUSTER}) == "d"


def test_every_rejection_reason_and_the_message():
    nodes = [
        node("node1"),
        node("node2", daemon="dead"),
        node("node3"),
        node("node4", prov=16384 - 1024),
        node("node5", domain="flushed"),
        node("node6"),
        node("node7", daemon="init", domain="flushed"),
    ]
    limit = ["node1", "node2", "node4", "node5", "node6", "node7", "node9"]
    with pytest.raises(NoTargetError) as excinfo:
        select_target(2048, "node1", limit, "mem", nodes, exclude=["node6"])
    error = excinfo.value
    assert error.reasons == {
        "node1": "is the VM's current node",
        "node2": "daemon state is dead, not run",
        "node3": "not in node_limit [node1, node2, node4, node5, node6, node7, node9]",
        "node4": "needs 2048 MiB, has 1024 MiB headroom",
        "node5": "domain state is flushed, not ready",
        "node6": "is excluded",
        "node7": "daemon state is init, not run",
        "node9": "in node_limit but not a cluster node",
    }
    assert str(error) == (
        "no target node for a VM of 2048 MiB (selector mem): "
        "node1: is the VM's current node; node2: daemon state is dead, not run; "
        "node3: not in node_limit [node1, node2, node4, node5, node6, node7, node9]; "
        "node4: needs 2048 MiB, has 1024 MiB headroom; node5: domain state is flushed, not ready; "
        "node6: is excluded; node7: daemon state is init, not run; node9: in node_limit but not a cluster node"
    )
    # rejection_reasons gives the same answers (None = candidate) for diagnostics
    reasons = rejection_reasons(2048, "node1", limit, nodes, exclude=["node6"])
    assert {k: v for k, v in reasons.items() if v} == error.reasons
    assert rejection_reasons(1024, None, None, nodes)["node3"] is None


def test_no_nodes_at_all():
    with pytest.raises(NoTargetError, match="the cluster has no nodes"):
        select_target(1024, None, None, "mem", [])


def test_example_reasons_from_the_brief():
    nodes = [node("node1"), node("node2", daemon="dead"), node("node3"), node("node4", prov=16384 - 1024)]
    with pytest.raises(NoTargetError) as excinfo:
        select_target(2048, "node1", ["node1", "node2", "node4"], "mem", nodes)
    message = str(excinfo.value)
    for text in (
        "node2: daemon state is dead, not run",
        "node3: not in node_limit [node1, node2, node4]",
        "node4: needs 2048 MiB, has 1024 MiB headroom",
        "node1: is the VM's current node",
    ):
        assert text in message


# ---- flush plans --------------------------------------------------------------------------------


def random_cluster(rng, count, source="node0"):
    nodes = []
    for i in range(count):
        total = rng.choice([8192, 16384, 32768, 65536])
        daemon = rng.choice(["run"] * 8 + ["dead", "init"])
        domain = rng.choice(["ready"] * 8 + ["flushed", "flush"])
        if f"node{i}" == source:
            domain = "flush"
        nodes.append(
            node(
                f"node{i}",
                daemon=daemon,
                domain=domain,
                total=total,
                free=rng.randint(0, total),
                prov=rng.randint(0, total),
                reserve=rng.choice([0, 512, 1024]),
                reserved=rng.choice([0, 0, 1024, 2048]),
                load=round(rng.random() * 8, 2),
                vcpus=rng.randint(0, 32),
                vms=rng.randint(0, 20),
            )
        )
    return nodes


def random_vms(rng, count, node_names, source="node0"):
    vms = []
    for i in range(count):
        limit = rng.sample(node_names, rng.randint(1, min(4, len(node_names)))) if rng.random() < 0.3 else []
        home = rng.choice(node_names) if rng.random() < 0.2 else source
        vms.append(
            FlushVM(
                f"vm{i}",
                rng.choice([512, 1024, 2048, 4096, 8192, 16384]),
                limit,
                rng.choice(["mem", "memfree", "load", "vcpus", "vms", "default"]),
                home,
                rng.randint(1, 8),
            )
        )
    return vms


def reference_plan(source, vms, nodes, default_selector="mem"):
    """The plan rules spelt out with select_target and NodeView copies (slow, obviously right)."""
    views = {n.name: n for n in nodes}
    order = sorted(range(len(vms)), key=lambda i: (-vms[i].memory_mib, i))
    result = []
    for i in order:
        vm = vms[i]
        home = views.get(vm.home_node)
        target = None
        if (
            home is not None
            and vm.home_node != source
            and not rejection_reasons(vm.memory_mib, source, vm.node_limit, views)[vm.home_node]
        ):
            target = vm.home_node
        else:
            try:
                target = select_target(
                    vm.memory_mib, source, vm.node_limit, vm.selector, views, default_selector=default_selector
                )
            except NoTargetError:
                target = None
        if target is not None:
            t = views[target]
            views[target] = dataclasses.replace(
                t,
                reserved=t.reserved + vm.memory_mib,
                memfree=t.memfree - vm.memory_mib,
                domaincount=t.domaincount + 1,
                vcpualloc=t.vcpualloc + vm.vcpus,
            )
        result.append((vm.uuid, target))
    return result


@pytest.mark.parametrize("seed", range(40))
def test_plan_never_overcommits_and_matches_the_rules(seed):
    rng = random.Random(seed)
    count = rng.choice([2, 3, 5, 8, 20, 60])
    nodes = random_cluster(rng, count)
    names = [n.name for n in nodes]
    vms = random_vms(rng, rng.randint(0, 80), names)
    default_selector = rng.choice(["mem", "load", "vms"])
    plan = plan_flush("node0", vms, nodes, default_selector=default_selector)
    by_name = {n.name: n for n in nodes}
    by_uuid = {vm.uuid: vm for vm in vms}

    # every VM exactly once, largest first (ties: input order)
    assert sorted(move.uuid for move in plan) == sorted(by_uuid)
    assert [by_uuid[m.uuid].memory_mib for m in plan] == sorted((vm.memory_mib for vm in vms), reverse=True)
    assert all(isinstance(move, PlannedMove) for move in plan)

    planned: dict[str, int] = {}
    for move in plan:
        vm = by_uuid[move.uuid]
        if move.target is None:
            assert "shut down and marked for autostart" in move.reason
            continue
        target = by_name[move.target]
        assert move.target != "node0"
        assert target.is_eligible
        assert not vm.node_limit or move.target in vm.node_limit
        planned[move.target] = planned.get(move.target, 0) + vm.memory_mib
    for name, total in planned.items():
        assert total <= by_name[name].headroom, f"{name} overcommitted: {total} > {by_name[name].headroom}"

    assert [(m.uuid, m.target) for m in plan] == reference_plan("node0", vms, nodes, default_selector)


def test_plan_none_fits():
    nodes = [node("src", domain="flush", prov=8192), node("a", prov=15360), node("b", daemon="dead")]
    plan = plan_flush("src", [("big", 4096, [], "mem", "src"), ("small", 512, [], "mem", "src")], nodes)
    assert plan[0].uuid == "big" and plan[0].target is None
    assert plan[0].reason == (
        "fits on no node: needs 4096 MiB, the most headroom left is 1024 MiB on a "
        "(1 candidate node(s), 2 not run/ready); it will be shut down and marked for autostart"
    )
    assert plan[1] == PlannedMove("small", "a", "selector mem (512 MiB headroom left)")


def test_plan_no_candidates_at_all():
    nodes = [node("src", domain="flush"), node("a", daemon="dead")]
    (move,) = plan_flush("src", [("v", 512, None, "mem", "src")], nodes)
    assert move.target is None
    assert move.reason == (
        "no node is a candidate: a: daemon state is dead, not run; src: is the VM's current node;"
        " it will be shut down and marked for autostart"
    )


def test_plan_limited_vm_reasons():
    nodes = [node("src", domain="flush"), node("a", prov=14336), node("b", domain="flushed")]
    plan = plan_flush("src", [("first", 2048, ["a"], "mem", "src"), ("v", 2048, ["a", "b", "zz"], "mem", "src")], nodes)
    assert plan[0] == PlannedMove("first", "a", "selector mem (0 MiB headroom left)")
    assert plan[1].target is None
    assert plan[1].reason == (
        "no node in node_limit [a, b, zz] can take it: a: needs 2048 MiB, has 0 MiB headroom (after earlier placements);"
        " b: domain state is flushed, not ready; zz: in node_limit but not a cluster node;"
        " it will be shut down and marked for autostart"
    )


def test_plan_books_each_placement():
    # Two nodes with 4096 MiB headroom each; three 2048 MiB VMs with the mem selector:
    # a, b, then a again (ties go by name), a 4th does not fit.
    nodes = [node("src", domain="flush"), node("a", prov=12288), node("b", prov=12288)]
    vms = [(f"v{i}", 2048, None, "mem", "src") for i in range(5)]
    assert [m.target for m in plan_flush("src", vms, nodes)] == ["a", "b", "a", "b", None]


def test_plan_vms_selector_spreads():
    nodes = [node("src", domain="flush"), node("a", vms=0), node("b", vms=1), node("c", vms=1)]
    vms = [(f"v{i}", 512, None, "vms", "src") for i in range(5)]
    # a (0 VMs); then a, b, c all have 1 VM and b, c more headroom -> b, then c; then all have 2
    # with equal headroom -> by name: a, then b.
    assert [m.target for m in plan_flush("src", vms, nodes)] == ["a", "b", "c", "a", "b"]


def test_plan_returns_vm_to_its_home_node_when_it_can():
    nodes = [node("src", domain="flush"), node("home", prov=12288, load=9.0), node("other", load=0.1)]
    plan = plan_flush("src", [FlushVM("v", 2048, None, "load", "home")], nodes)
    assert plan == [PlannedMove("v", "home", "returns to its home node home (2048 MiB headroom left)")]
    # home not ready -> normal selection
    nodes[1] = dataclasses.replace(nodes[1], domain_state="flushed")
    assert plan_flush("src", [FlushVM("v", 2048, None, "load", "home")], nodes)[0].target == "other"
    # home outside the node_limit -> normal selection within the limit
    nodes[1] = dataclasses.replace(nodes[1], domain_state="ready")
    assert plan_flush("src", [FlushVM("v", 2048, ["other"], "load", "home")], nodes)[0].target == "other"


def test_plan_accepts_plain_tuples_and_mapping_and_empty():
    nodes = {"src": node("src", domain="flush"), "a": node("a")}
    assert plan_flush("src", [], nodes) == []
    assert plan_flush("src", [("v", 1024, "", "default", "src")], nodes)[0].target == "a"


# ---- n-1 ------------------------------------------------------------------------------------------


def test_survives_node_failure_ok_and_not():
    nodes = [node("a", prov=8192), node("b", prov=8192), node("c", prov=8192)]  # 8192 headroom each
    ok = survives_node_failure(nodes, {"a": [4096, 4096], "b": [8192], "c": [2048] * 4})
    assert ok and ok.ok and ok.failures == {} and ok.checked == ("a", "b", "c")
    assert ok.message == "the cluster survives the failure of any one of 3 ready node(s)"

    bad = survives_node_failure(nodes, {"a": [8192, 8192, 4096]})
    assert not bad
    assert set(bad.failures) == {"a"}
    assert bad.failures["a"] == (
        "its 3 VM(s) (20480 MiB) cannot be restarted elsewhere: a 4096 MiB VM does not fit,"
        " the most headroom left is 0 MiB (b), short by 4096 MiB"
    )
    assert bad.shortfalls == {"a": 4096}
    assert bad.message.startswith("the cluster would not survive the failure of a: its 3 VM(s)")


def test_survives_node_failure_ignores_nodes_that_are_not_ready():
    nodes = [node("a", prov=8192), node("b", prov=8192), node("dead", daemon="dead"), node("flushed", domain="flushed")]
    # the dead/flushed nodes neither receive nor are checked
    result = survives_node_failure(nodes, {"a": [8192], "b": [8192], "dead": [99999]})
    assert result.ok and result.checked == ("a", "b")
    assert not survives_node_failure(nodes, {"a": [8193]})
    assert not survives_node_failure([node("alone")], {"alone": [1]})
    assert isinstance(survives_node_failure([], {}), FailureCheck)


@pytest.mark.parametrize("names", [(), ("alone",)])
def test_fewer_than_two_ready_nodes_never_survive(names):
    # even with nothing running: the failure of the only ready node leaves nowhere to restart anything
    nodes = [node(name) for name in names] + [node("flushed", domain="flushed"), node("dead", daemon="dead")]
    check = survives_node_failure(nodes, {})
    assert not check.ok and check.checked == names
    if names:
        assert check.failures == {"alone": "it is the only ready node: none is left to restart VMs on"}
        assert check.message == (
            "the cluster would not survive the failure of alone: it is the only ready node: "
            "none is left to restart VMs on"
        )
    else:
        assert check.failures == {}
        assert check.message == "no node is ready: no VM could be restarted after a node failure"


def test_survives_node_failure_worst_fit_decreasing():
    # a's VMs [6000, 5000, 3000] onto b (8000) and c (7000): 6000->b (2000 left), 5000->c (2000), 3000 fits nowhere.
    # An exact packing exists only if 6000 and ... no: 14000 total vs 15000 needed, so it truly fails.
    nodes = [node("a", total=20000), node("b", total=8000), node("c", total=7000)]
    assert not survives_node_failure(nodes, {"a": [3000, 6000, 5000]})
    assert survives_node_failure(nodes, {"a": [3000, 6000, 4000]})


@pytest.mark.parametrize("seed", range(15))
def test_survives_node_failure_matches_brute_force_worst_fit(seed):
    rng = random.Random(1000 + seed)
    nodes = random_cluster(rng, rng.randint(2, 12), source="none")
    running = {n.name: [rng.choice([512, 1024, 2048, 4096]) for _ in range(rng.randint(0, 6))] for n in nodes}
    result = survives_node_failure(nodes, running)
    eligible = [n for n in nodes if n.is_eligible]
    expected = set() if len(eligible) >= 2 else {n.name for n in eligible}
    for failed in eligible if len(eligible) >= 2 else ():
        room = {n.name: n.headroom for n in eligible if n.name != failed.name}
        for memory in sorted(running[failed.name], reverse=True):
            best = min(room, key=lambda name: (-room[name], name)) if room else None
            if best is None or room[best] < memory:
                expected.add(failed.name)
                break
            room[best] -= memory
    assert set(result.failures) == expected


def test_apply_plan_then_n_minus_1():
    nodes = [node("src", domain="flush", prov=6144), node("a", prov=8192), node("b", prov=12288)]
    vms = [
        FlushVM("v1", 4096, None, "mem", "src", 2),
        FlushVM("v2", 2048, None, "mem", "src", 1),
        FlushVM("v3", 9000, None, "mem", "src"),
    ]
    plan = plan_flush("src", vms, nodes)
    assert [(m.uuid, m.target) for m in plan] == [("v3", None), ("v1", "a"), ("v2", "a")]
    after, running = apply_plan("src", vms, plan, nodes, {"src": [4096, 2048, 9000], "a": [1024], "b": [4096]})
    views = {n.name: n for n in after}
    assert views["src"].domain_state == "flushed"
    assert views["a"].reserved == 6144 and views["a"].headroom == 16384 - 8192 - 6144
    assert views["a"].domaincount == 2 and views["a"].vcpualloc == 3
    assert running == {"src": [], "a": [1024, 4096, 2048], "b": [4096]}
    check = survives_node_failure(after, running)
    # a fails: 4096+2048+1024 onto b (4096 headroom) does not fit; b fails: 4096 onto a (2048) does not fit
    assert not check and set(check.failures) == {"a", "b"}


# ---- the fit selector ---------------------------------------------------------------------------


def test_fit_takes_an_exact_fit_first():
    # n2 would be left with 512 MiB: a gap no VM might fill, closed now; mem takes the emptiest
    nodes = [node("n1", total=65536), node("n2", total=65536, prov=65536 - 4608), node("n3", total=65536, prov=32768)]
    assert select_target(4096, None, (), "fit", nodes) == "n2"
    assert select_target(4096, None, (), "mem", nodes) == "n1"


def test_fit_balances_by_free_share_while_the_cluster_has_room():
    # no exact fit, plenty of room: the largest share free wins (n2: 50 % of 32 GiB), not the most MiB
    nodes = [
        node("n1", total=131072, prov=81920),
        node("n2", total=32768, prov=16384),
        node("n3", total=65536, prov=49152),
    ]
    assert select_target(2048, None, (), "fit", nodes) == "n2"
    assert select_target(2048, None, (), "mem", nodes) == "n1"


def test_fit_packs_tightly_when_the_cluster_is_nearly_full():
    # 10 % of the capacity left: the tightest fit, keeping n1's large gap for a large VM
    nodes = [
        node("n1", total=65536, prov=65536 - 8192),
        node("n2", total=65536, prov=65536 - 3072),
        node("n3", total=65536, prov=65536 - 2048),
    ]
    assert select_target(2048 - 512, None, (), "fit", nodes) == "n3"  # exact (512 MiB left)
    assert select_target(2560, None, (), "fit", nodes) == "n2"  # tight: smallest leftover
    assert select_target(2560, None, (), "mem", nodes) == "n1"


def test_fit_is_deterministic_and_independent_of_node_order():
    rng = random.Random(11)
    nodes = [
        node(f"n{i:02d}", total=rng.choice((65536, 131072)), prov=rng.randrange(0, 60000, 1024)) for i in range(40)
    ]
    for size in (1024, 3072, 8192, 30000):
        first = select_target(size, None, (), "fit", nodes)
        for _ in range(5):
            rng.shuffle(nodes)
            assert select_target(size, None, (), "fit", nodes) == first


def _variance_after(views, target, memory):
    """The population variance of the nodes' free shares once ``memory`` is booked on ``target``,
    exactly (fractions): the spread rule's reference."""
    shares = [Fraction(v.headroom - (memory if v.name == target else 0), v.capacity) for v in views if v.capacity > 0]
    mean = sum(shares, Fraction(0)) / len(shares)
    return sum(((share - mean) ** 2 for share in shares), Fraction(0)) / len(shares)


@pytest.mark.parametrize("tight", [False, True], ids=["roomy", "tight"])
@pytest.mark.parametrize("seed", range(8))
def test_a_fit_flush_plan_follows_its_rules_and_agrees_with_select_target_while_the_cluster_has_room(seed, tight):
    """plan_flush's fit (sorted headroom lists, per capacity, running sums) books and chooses as
    its documented rules say, checked VM after VM (largest first) against a plain scan of every
    node: on a tight cluster (less than FIT_TIGHT_SHARE of the candidates' capacity free after the
    VM) the node after which the population variance of the free shares is least (computed
    exactly here; then headroom, then name), with room the largest free share after the VM (then
    headroom, then name). No exact-fit rule in a plan. While the cluster is not tight, that is also
    select_target's choice when select_target has no exact fit (it takes those first). Tight:
    every node nearly full; nodes of several sizes."""
    rng = random.Random(seed)
    sizes_mib = (16384, 65536, 131072, 196608)
    nodes = {}
    for i in range(rng.randint(3, 30)):
        total = rng.choice(sizes_mib)
        prov = total - rng.randrange(0, total // 5, 256) if tight else rng.randrange(0, min(total, 60000), 512)
        nodes[f"n{i:02d}"] = node(f"n{i:02d}", total=total, prov=prov)
    nodes["src"] = node("src", total=262144)
    sizes = [rng.choice((512, 1024, 2048, 4096, 8192, 16384, 32768)) for _ in range(rng.randint(5, 60))]
    vms = [FlushVM(f"vm{i}", size, (), "fit", "src") for i, size in enumerate(sizes)]
    plan = plan_flush("src", vms, nodes.values())
    assert plan_flush("src", vms, list(reversed(nodes.values()))) == plan  # whatever the node order
    views = dict(nodes)
    expected = {}
    agreed = by_spread = 0
    for i in sorted(range(len(vms)), key=lambda i: (-vms[i].memory_mib, i)):
        memory = vms[i].memory_mib
        others = [view for name, view in views.items() if name != "src"]
        fitting = [view for view in others if view.headroom >= memory]
        slack = sum(max(view.headroom, 0) for view in others)
        is_tight = slack - memory < FIT_TIGHT_SHARE * sum(view.capacity for view in others)
        target = None
        if fitting and is_tight:
            target = min(fitting, key=lambda v: (_variance_after(others, v.name, memory), -v.headroom, v.name)).name
            by_spread += 1
        elif fitting:
            target = min(fitting, key=lambda v: (-(v.headroom - memory) / v.capacity, -v.headroom, v.name)).name
            if min(v.headroom - memory for v in fitting) >= 1024:  # select_target: no exact fit
                assert select_target(memory, "src", (), "fit", views.values()) == target
                agreed += 1
        expected[vms[i].uuid] = target
        if target is not None:
            views[target] = dataclasses.replace(views[target], reserved=views[target].reserved + memory)
    assert {move.uuid: move.target for move in plan} == expected
    assert agreed > 0 or tight
    assert by_spread > 0 or not tight


def test_fit_block_rule_on_a_tight_cluster_keeps_large_blocks_and_balances_among_equals():
    gib = 1024
    # 48 of 1,280 GiB free: tight. A 4 GiB VM: on a (20 GiB free = 16 + 4 -> 16) it breaks only
    # the 4 GiB block, on b (28 = 16 + 8 + 4 -> 24 = 16 + 8) too. Equal blocks: the smaller
    # capacity wins, a (128 GiB) over b (384 GiB).
    nodes = [
        node("a", total=128 * gib, prov=108 * gib),
        node("b", total=384 * gib, prov=356 * gib),
        node("c", total=384 * gib, prov=384 * gib),
        node("d", total=384 * gib, prov=384 * gib),
    ]
    assert select_target(4 * gib, None, (), "fit", nodes) == "a"
    # a 6 GiB VM breaks a's 16 GiB block (20 -> 14) but only b's 8 GiB one (28 -> 22): b, though a
    # is emptier by share (best fit would take a too: 14 left against 22)
    assert select_target(6 * gib, None, (), "fit", nodes) == "b"
    # best fit would leave a's 40 GiB gap alone for ever (an 8 GiB VM fits b's 36 more tightly);
    # the block rule breaks b's 32 GiB block (36 -> 28) but only a's 8 GiB one (40 -> 32): a
    starving = [
        node("a", total=128 * gib, prov=88 * gib),
        node("b", total=384 * gib, prov=348 * gib),
        node("c", total=384 * gib, prov=384 * gib),
        node("d", total=384 * gib, prov=384 * gib),
    ]
    assert select_target(8 * gib, None, (), "fit", starving) == "a"
    # a flush plan balances instead: the larger share after the VM (a: 32 / 128 over b: 28 / 384)
    assert [move.target for move in plan_flush("d", [FlushVM("vm", 8 * gib, (), "fit", "d")], starving)] == ["a"]


def test_fit_block_rule_fills_the_smaller_node_first_among_equal_blocks():
    """Where the VM breaks the same block on two nodes, the smaller capacity wins even when the
    larger node would be left the fuller by share: a block kept for a large VM that never comes
    is what stays free at the end, and on the large node it is a smaller share of it. (The rule
    before took the largest free share after the VM: b here.)"""
    gib = 1024
    # 72 of 512 GiB free: tight. A 2 GiB VM breaks the 4 GiB block on a (12 = 8 + 4 -> 10) and
    # on b (60 = 32 + 16 + 8 + 4 -> 58). Share after: a 10 / 128 = 7.8 %, b 58 / 384 = 15.1 %.
    nodes = [node("a", total=128 * gib, prov=116 * gib), node("b", total=384 * gib, prov=324 * gib)]
    assert select_target(2 * gib, None, (), "fit", nodes) == "a"
    # nodes of one capacity are still balanced: the largest share after the VM (c over a)
    same = [*nodes, node("c", total=128 * gib, prov=108 * gib)]  # c: 20 = 16 + 4 -> 18, 4 GiB block
    assert select_target(2 * gib, None, (), "fit", same) == "c"


def test_fit_exact_fits_on_a_tight_cluster_go_to_the_smallest_node_first():
    """An 8 GiB VM fills both a (384 GiB, 8.5 GiB free) and b (128 GiB, 8.75 GiB free) to within
    1 GiB. On a tight cluster the smallest node takes it (b), and a keeps its gap, a smaller share
    of a if it stays free; with room the tightest fit (a) as before. A flush plan has no exact-fit
    rule: on this tight cluster its spread rule takes b too (a 2.2 % free, b 6.8 %: b evens them),
    where the plan's exact fit first took a."""
    gib = 1024
    a = node("a", total=384 * gib, prov=384 * gib - 8 * gib - 512)
    b = node("b", total=128 * gib, prov=128 * gib - 8 * gib - 768)
    assert select_target(8 * gib, None, (), "fit", [a, b]) == "b"
    roomy = [a, b, node("c", total=384 * gib, prov=0)]
    assert select_target(8 * gib, None, (), "fit", roomy) == "a"
    assert [move.target for move in plan_flush("c", [FlushVM("vm", 8 * gib, (), "fit", "c")], [a, b])] == ["b"]


def test_a_fit_flush_plan_leaves_the_receiving_nodes_balanced():
    """Largest first, each to the largest free share after it: a flush of 10 VMs (36 GiB) onto a
    tight cluster of four nodes of different sizes (135 of 1,152 GiB free) ends with their free
    shares within a few points. mem (most headroom) leaves the small node far emptier by share,
    and so did fit's earlier tight rule (best fit with a bonus for emptier nodes)."""
    gib = 1024
    nodes = [
        node("a", total=128 * gib, prov=108 * gib),
        node("b", total=256 * gib, prov=216 * gib),
        node("c", total=384 * gib, prov=339 * gib),
        node("d", total=384 * gib, prov=354 * gib),
        node("src", total=384 * gib),
    ]
    sizes = (8, 8, 4, 4, 4, 2, 2, 2, 1, 1)
    vms = [FlushVM(f"vm{i}", size * gib, (), None, "src") for i, size in enumerate(sizes)]

    def shares(selector):
        plan = plan_flush("src", [vm._replace(selector=selector) for vm in vms], nodes)
        views, _ = apply_plan("src", vms, plan, nodes)
        assert all(move.target is not None for move in plan)
        return [100.0 * v.headroom / v.capacity for v in views if v.name != "src"]

    fit, mem = shares("fit"), shares("mem")
    assert max(fit) - min(fit) < 3.0, fit
    assert max(mem) - min(mem) > 3.0, mem


def test_a_fit_flush_plan_on_a_tight_cluster_takes_the_node_that_leaves_the_least_spread():
    """84 of 896 GiB free (tight). A 16 GiB VM leaves a (128 GiB, 24 free: 18.75 %) and b (384
    GiB, 40 free: 10.4 %) at the same share, 6.25 %; the balancing rule then took b (more
    headroom), which leaves a the outlier (18.75, 6.25, 5.2: spread 6.1 points). The spread rule
    takes a (6.25, 10.4, 5.2: 2.2 points)."""
    gib = 1024
    nodes = [
        node("a", total=128 * gib, prov=104 * gib),
        node("b", total=384 * gib, prov=344 * gib),
        node("c", total=384 * gib, prov=364 * gib),
        node("src", total=384 * gib),
    ]
    vms = [FlushVM("vm", 16 * gib, (), "fit", "src")]
    plan = plan_flush("src", vms, nodes)
    assert [move.target for move in plan] == ["a"]
    views, _ = apply_plan("src", vms, plan, nodes)
    shares = [100.0 * v.headroom / v.capacity for v in views if v.name != "src"]
    assert statistics.pstdev(shares) < 2.3, shares
    # the same through a node_limit (the limited path's order)
    limited = [vm._replace(node_limit=("a", "b", "c")) for vm in vms]
    assert [move.target for move in plan_flush("src", limited, nodes)] == ["a"]


@pytest.mark.parametrize(
    "count, hail_spread, hail_n1_ok, placed",
    # hail's flush rows measured on bench p's own snapshots (docs/benchmarks.md, "Against hail,
    # measured", 2026-12-07 13:34 UTC): mean spread and n-1 ok of 9; placed is the same for every
    # selector and hail (86.11 % at 10 nodes, where some VMs fit nowhere)
    [(10, 2.992, 3, 86.11), (100, 4.703, 6, 100.0), (1000, 6.632, 9, 100.0)],
)
def test_fit_flush_plans_balance_bench_p_snapshots_at_least_as_well_as_hail(count, hail_spread, hail_n1_ok, placed):
    """bench p's flushes (the fullest node's VMs planned away, n-1 aware: the VMs each node runs
    given) with ``fit``: the same memory placed as hail, a mean free-memory spread no larger than
    hail's and the n-1 verdict after it ok on at least as many snapshots. With the balancing rule
    and exact fits first (before the spread rule), the spread was 1.703, 5.469 and 7.039: worse
    than hail at 100 and 1,000 nodes. At 10 nodes the spread rule must not lose to that either."""
    from bench.placement import flush, generate

    rows = [flush(generate(count, fill, seed * 1000 + count), "fit") for fill in (0.6, 0.8, 0.95) for seed in (1, 2, 3)]
    assert all(row["overcommitted_nodes"] == 0 for row in rows)
    assert round(sum(row["placed_pct"] for row in rows) / len(rows), 2) == placed
    mean_spread = sum(row["spread_pct"] for row in rows) / len(rows)
    assert mean_spread <= hail_spread, [row["spread_pct"] for row in rows]
    if count == 10:
        assert mean_spread <= 1.703, [row["spread_pct"] for row in rows]
    assert sum(1 for row in rows if row["n1_ok"]) >= hail_n1_ok


def _n1_flush_case():
    """Three 64 GiB nodes: a runs a 44 GiB VM (20 GiB headroom), b and c a 16 GiB VM each (48 GiB
    headroom); src's two 8 GiB VMs leave. Balanced, they go to b and c (40 GiB left on each), and
    a's 44 GiB VM then fits nowhere if a fails; best fit puts both on a (4 GiB left) and keeps
    b's and c's 48 GiB gaps."""
    gib = 1024
    nodes = [
        node("a", total=64 * gib, prov=44 * gib),
        node("b", total=64 * gib, prov=16 * gib),
        node("c", total=64 * gib, prov=16 * gib),
        node("src", domain="flush", total=64 * gib, prov=16 * gib),
    ]
    running = {"a": [44 * gib], "b": [16 * gib], "c": [16 * gib], "src": [8 * gib, 8 * gib]}
    vms = [FlushVM("v1", 8 * gib, (), "fit", "src"), FlushVM("v2", 8 * gib, (), "fit", "src")]
    return nodes, running, vms


def _n1_after(nodes, running, vms, plan):
    return survives_node_failure(*apply_plan("src", vms, plan, nodes, running))


def _free_spread(nodes, running, vms, plan):
    views, _running = apply_plan("src", vms, plan, nodes, running)
    shares = [100.0 * v.headroom / v.capacity for v in views if v.name != "src"]
    return max(shares) - min(shares)


def test_a_fit_flush_plan_that_would_lose_n1_balances_per_vm_as_far_as_n1_allows():
    nodes, running, vms = _n1_flush_case()
    balanced = plan_flush("src", vms, nodes)  # no running VMs given: the balancing rule, unchecked
    assert [m.target for m in balanced] == ["b", "c"]
    check = _n1_after(nodes, running, vms, balanced)
    assert not check and set(check.failures) == {"a"} and check.shortfalls == {"a": 4 * 1024}
    # Per VM: v1 takes b (the most balancing, n-1 kept: a's 44 GiB VM still fits on c's 48);
    # v2's most balancing target c would leave no 44 GiB gap, so it takes b, its next. Best fit
    # throughout (both on a, 4 GiB left there) keeps n-1 too, but leaves the nodes less even.
    plan = plan_flush("src", vms, nodes, running_by_node=running)
    assert [m.target for m in plan] == ["b", "b"]
    assert "n-1 kept" in plan[1].reason and "n-1" not in plan[0].reason
    assert _n1_after(nodes, running, vms, plan).ok
    packed = [PlannedMove(vm.uuid, "a", "best fit") for vm in vms]
    assert _n1_after(nodes, running, vms, packed).ok
    assert _free_spread(nodes, running, vms, plan) < _free_spread(nodes, running, vms, packed)
    # deterministic, and the same whatever the order in which nodes are listed
    assert plan_flush("src", vms, list(reversed(nodes)), running_by_node=running) == plan
    # the same through a node_limit (the limited path's order)
    limited = [vm._replace(node_limit=("a", "b", "c")) for vm in vms]
    assert [m.target for m in plan_flush("src", limited, nodes)] == ["b", "c"]
    assert [m.target for m in plan_flush("src", limited, nodes, running_by_node=running)] == ["b", "b"]


def _cluster_64(running):
    gib = 1024
    nodes = [node(name, total=64 * gib, prov=sum(memories)) for name, memories in running.items() if name != "src"]
    nodes.append(node("src", domain="flush", total=64 * gib, prov=sum(running["src"])))
    return nodes


def test_an_n1_aware_fit_plan_keeps_n1_where_neither_the_balanced_nor_the_best_fit_plan_does():
    gib = 1024
    running = {
        "a": [16 * gib, 12 * gib],
        "b": [20 * gib],
        "c": [32 * gib],
        "d": [24 * gib, 40 * gib],
        "src": [16 * gib, 16 * gib, 8 * gib],
    }
    nodes = _cluster_64(running)
    vms = [FlushVM(f"v{i}", memory, (), "fit", "src") for i, memory in enumerate(running["src"])]
    assert survives_node_failure(*apply_plan("src", vms, [], nodes, running)).ok  # n-1 holds before
    balanced = plan_flush("src", vms, nodes)
    assert not _n1_after(nodes, running, vms, balanced).ok
    most_headroom = plan_flush("src", [vm._replace(selector="mem") for vm in vms], nodes)
    tightest = []
    for vm in vms:
        views, _running = apply_plan("src", vms, tightest, nodes, running)
        fits = [v for v in views if v.is_eligible and v.headroom >= vm.memory_mib]
        tightest.append(PlannedMove(vm.uuid, min(fits, key=lambda v: (v.headroom, v.name)).name, "best fit"))
    assert not _n1_after(nodes, running, vms, tightest).ok  # best fit throughout loses it too
    assert not _n1_after(nodes, running, vms, most_headroom).ok  # and so does mem's
    plan = plan_flush("src", vms, nodes, running_by_node=running)
    assert [m.target for m in plan] == ["a", "a", "c"]
    assert _n1_after(nodes, running, vms, plan).ok
    assert all("n-1 kept" in m.reason for m in plan), plan


def test_an_n1_aware_fit_plan_falls_back_per_vm_and_loses_n1_on_fewer_nodes():
    """The last VM fits nowhere without a new n-1 failure: it alone falls back (to best fit);
    the VMs before it keep their balanced targets, and fewer nodes fail than after the balanced
    plan (or best fit throughout)."""
    gib = 1024
    running = {
        "a": [16 * gib],
        "b": [12 * gib, 16 * gib],
        "c": [12 * gib, 32 * gib],
        "src": [16 * gib, 12 * gib, 12 * gib],
    }
    nodes = _cluster_64(running)
    vms = [FlushVM(f"v{i}", memory, (), "fit", "src") for i, memory in enumerate(running["src"])]
    assert survives_node_failure(*apply_plan("src", vms, [], nodes, running)).ok
    balanced = plan_flush("src", vms, nodes)
    lost_balanced = set(_n1_after(nodes, running, vms, balanced).failures)
    plan = plan_flush("src", vms, nodes, running_by_node=running)
    assert [m.target for m in plan] == ["a", "b", "c"]
    assert [m.target for m in plan[:2]] == [m.target for m in balanced[:2]]
    assert "n-1" not in plan[0].reason and "n-1" not in plan[1].reason
    assert "n-1 lost by every target tried" in plan[2].reason and "best fit" in plan[2].reason
    lost = set(_n1_after(nodes, running, vms, plan).failures)
    assert lost == {"a", "b"} and len(lost) < len(lost_balanced), (lost, lost_balanced)


def test_only_fit_vms_are_n1_aware_in_a_flush_plan_and_every_selector_in_a_recovery_plan():
    nodes, running, vms = _n1_flush_case()
    mem_vms = [vm._replace(selector="mem") for vm in vms]
    # mem: most headroom, b then c; a flush plan leaves mem's choices alone
    assert [m.target for m in plan_flush("src", mem_vms, nodes, running_by_node=running)] == ["b", "c"]
    # n1_every_selector (HA recovery): mem's next choice where its first would lose n-1
    plan = plan_flush("src", mem_vms, nodes, running_by_node=running, n1_every_selector=True)
    assert [m.target for m in plan] == ["b", "b"] and _n1_after(nodes, running, mem_vms, plan).ok


def test_the_n1_tracker_agrees_with_the_full_check_at_every_booking():
    """_N1Tracker's verdicts (which nodes fail, which a booking would make fail) against
    survives_node_failure on apply_plan's result, on random clusters, plans and bookings."""
    from pvc_cluster_common._selector import _plan_once

    gib = 1024
    checked = 0
    for seed in range(300):
        rng = random.Random(seed)
        running, nodes = {}, []
        for i in range(rng.randint(2, 9)):
            name = f"n{i}"
            memories = [rng.choice((1, 2, 4, 8, 12, 16, 24, 32, 40)) * gib for _ in range(rng.randint(0, 6))]
            running[name] = memories
            state = rng.choice(("ready",) * 8 + ("flushed",))
            total = rng.choice((64, 96, 128)) * gib
            nodes.append(
                node(name, domain=state, total=total, prov=sum(memories), reserved=rng.choice((0, 0, 4 * gib)))
            )
        leaving = [rng.choice((1, 2, 4, 8, 16)) * gib for _ in range(rng.randint(1, 8))]
        running["src"] = leaving
        nodes.append(node("src", domain="flush", total=128 * gib, prov=sum(leaving)))
        vms = [FlushVM(f"v{j}", memory, (), rng.choice(("fit", "mem")), "src") for j, memory in enumerate(leaving)]
        plan, _balanced, tracker = _plan_once("src", vms, nodes, None, pack=False, n1_running=running)
        assert tracker is not None
        assert tracker.failing == set(_n1_after(nodes, running, vms, plan).failures), seed
        # a further booking on any candidate, of any size: the predicted new failures are exact
        views, after = apply_plan("src", vms, plan, nodes, running)
        before = set(survives_node_failure(views, after).failures)
        for target in sorted(tracker.slots):
            memory = rng.choice((1, 4, 16, 32)) * gib
            moved = [v if v.name != target else dataclasses.replace(v, reserved=v.reserved + memory) for v in views]
            grown = dict(after, **{target: list(after.get(target, ())) + [memory]})
            expected = set(survives_node_failure(moved, grown).failures) - before
            assert tracker.new_failures(target, memory) == expected, (seed, target, memory)
            assert bool(tracker.new_failures(target, memory, first_only=True)) == bool(expected)
            checked += 1
    assert checked > 500


def test_a_balanced_fit_flush_plan_is_kept_when_it_keeps_n1_or_when_best_fit_loses_it_too():
    nodes, running, vms = _n1_flush_case()
    gib = 1024
    # a's VM is 40 GiB: b's 40 GiB left after the balanced plan takes it, so balancing stays
    roomy = [dataclasses.replace(n, memprov=40 * gib) if n.name == "a" else n for n in nodes]
    roomy_running = dict(running, a=[40 * gib])
    plan = plan_flush("src", vms, roomy, running_by_node=roomy_running)
    assert [m.target for m in plan] == ["b", "c"] and _n1_after(roomy, roomy_running, vms, plan).ok
    # b and c run 40 GiB VMs too: no plan keeps n-1 (a's 44 GiB VM needs a 44 GiB gap, b's and
    # c's 40 GiB VMs each a 40 GiB one), and the balanced plan is returned
    full = [dataclasses.replace(n, memprov=40 * gib) if n.name in ("b", "c") else n for n in nodes]
    full_running = dict(running, b=[40 * gib], c=[40 * gib])
    plan = plan_flush("src", vms, full, running_by_node=full_running)
    assert plan == plan_flush("src", vms, full)
    assert not _n1_after(full, full_running, vms, plan).ok


def test_fit_places_more_memory_than_mem_on_tight_snapshots_and_never_overcommits():
    from bench.placement import arrivals, generate, one_at_a_time

    placed = {"fit": [], "mem": []}
    for seed in (1, 2, 3):
        for fill in (0.6, 0.8, 0.95):
            snapshot = generate(10, fill, seed * 1000 + 10)
            sizes = arrivals(snapshot, seed)  # 106-160 % of the free memory asked
            for selector in placed:
                result = one_at_a_time(snapshot, sizes, selector)
                assert result["overcommitted_nodes"] == 0
                placed[selector].append(result["placed_pct"])
    mean = {selector: sum(values) / len(values) for selector, values in placed.items()}
    assert mean["fit"] >= 92.0 and mean["fit"] >= mean["mem"] + 5.0, mean


@pytest.mark.parametrize(
    "count, placed_min, spread_max",
    # the means over bench p's 9 snapshots of each size (for comparison, hail on its own
    # 10-node snapshots: about 97 % placed, spread 0.23-0.27)
    [(10, 97.0, 0.5), (100, 99.3, 0.2)],
)
def test_fit_places_and_balances_tight_clusters_one_vm_at_a_time(count, placed_min, spread_max):
    """bench p's snapshots, 106-160 % of the free memory asked one VM at a time. The fit score
    (best fit with a bonus for emptier nodes) placed 94.7 % at 10 nodes with a spread (population
    standard deviation of the nodes' free share) of 1.30 points, and 99.37 % / 0.216 at 100; a pure
    balancing rule 87.6 % / 0.71 at 10. The block rule, equal blocks by the largest share after
    the VM: 97.0 % / 0.65 and 99.37 % / 0.16; equal blocks by the smallest capacity first: 97.0 % /
    0.45 and 99.37 % / 0.16. At 10 nodes every VM that could fit anywhere was placed (97.0 % is
    all of it), so what is left to gain is only where the free memory ends."""
    from bench.placement import arrivals, generate, one_at_a_time

    spreads, placed = [], []
    for seed in (1, 2, 3):
        for fill in (0.6, 0.8, 0.95):
            snapshot = generate(count, fill, seed * 1000 + count)
            result = one_at_a_time(snapshot, arrivals(snapshot, seed), "fit")
            assert result["overcommitted_nodes"] == 0
            spreads.append(result["spread_pct"])
            placed.append(result["placed_pct"])
    assert sum(spreads) / len(spreads) <= spread_max, spreads
    assert sum(placed) / len(placed) >= placed_min, placed


# ---- n-1 as policy --------------------------------------------------------------------------------


def test_the_n1_check_says_which_node_fails_and_by_how_much():
    # headroom: n1 4096, n2 8192, n3 6144 MiB
    nodes = [
        node("n1", total=16384, prov=12288),
        node("n2", total=16384, prov=8192),
        node("n3", total=16384, prov=10240),
    ]
    check = survives_node_failure(nodes, {"n1": [8192, 4096], "n2": [8192], "n3": [10240]})
    # n1's VMs fit on n2 and n3; n2's 8192 MiB VM and n3's 10240 MiB VM fit nowhere
    assert not check.ok
    assert check.shortfalls == {"n2": 2048, "n3": 2048}
    assert check.failures["n3"].endswith(
        "a 10240 MiB VM does not fit, the most headroom left is 8192 MiB (n2), short by 2048 MiB"
    )
    assert "n2:" in check.message and "n3:" in check.message


def test_an_allocation_that_breaks_n1_is_refused_with_the_failing_node_and_by_how_much():
    from pvc_cluster_common._selector import allocation_check

    nodes = [node("n1", total=16384, prov=4096), node("n2", total=16384, prov=4096)]
    running = {"n1": [4096], "n2": [4096]}
    assert survives_node_failure(nodes, running).ok
    assert allocation_check(nodes, running, "n1", 8192).ok  # n2 could still take 8192 + 4096 MiB
    check = allocation_check(nodes, running, "n1", 10240)  # n1: 2048 MiB headroom left
    assert not check.ok
    assert check.shortfalls == {"n1": 2048, "n2": 2048}
    assert nodes[0].reserved == 0  # the views given are not changed


def test_a_migration_that_breaks_n1_is_refused_with_the_failing_node_and_by_how_much():
    from pvc_cluster_common._selector import migration_check

    nodes = [node("n1", prov=12288), node("n2", prov=10240), node("n3", prov=6144)]
    running = {"n1": [8192, 4096], "n2": [6144, 4096], "n3": [6144]}
    assert survives_node_failure(nodes, running).ok
    # n1's 4096 MiB VM to n2: n3 keeps 10240 MiB headroom, enough for n1's 8192 MiB VM
    assert migration_check(nodes, running, "n1", "n2", 4096).ok
    # to n3: n2 and n3 keep 6144 MiB each, and n1's 8192 MiB VM fits on neither
    check = migration_check(nodes, running, "n1", "n3", 4096)
    assert not check.ok
    assert check.shortfalls == {"n1": 2048}
    assert check.failures["n1"].endswith(
        "a 8192 MiB VM does not fit, the most headroom left is 6144 MiB (n2), short by 2048 MiB"
    )
    assert running == {"n1": [8192, 4096], "n2": [6144, 4096], "n3": [6144]}  # nothing given is changed
    assert nodes[2].reserved == 0 and nodes[0].memprov == 12288


def test_a_migration_gives_the_source_back_what_its_reservation_held():
    from pvc_cluster_common._selector import migration_check

    # n1's VM was just placed there: its reservation covers it, n1's memprov does not count it yet
    nodes = [node("n1", prov=0, reserved=8192), node("n2", prov=8192), node("n3", total=8192, prov=6144)]
    running = {"n1": [8192], "n2": [8192], "n3": [2048, 4096]}
    # after the VM goes to n2, n1 is empty: n2's two 8192 MiB VMs both fit there
    assert migration_check(nodes, running, "n1", "n2", 8192, source_reserved=True).ok
    # taken from memprov instead (which does not count it), n1 would keep the reservation's 8192 MiB
    check = migration_check(nodes, running, "n1", "n2", 8192)
    assert not check.ok and check.shortfalls == {"n2": 6144}


# ---- libvirt health ---------------------------------------------------------------------------


@pytest.mark.parametrize("health", ["down", "hung", "invalid"])
def test_a_node_whose_libvirt_is_not_ok_is_never_a_target(health):
    nodes = [dataclasses.replace(node("a", prov=0), libvirt=health), node("b", prov=8192)]
    assert select_target(1024, None, None, "mem", nodes) == "b"  # a has more headroom
    with pytest.raises(NoTargetError) as excinfo:
        select_target(1024, "b", None, "mem", nodes)
    assert excinfo.value.reasons == {
        "a": f"libvirt is {health} on the node, not ok (its daemon cannot reach its libvirtd)",
        "b": "is the VM's current node",
    }
    assert not nodes[0].is_eligible
    plan = plan_flush("b", [FlushVM("u1", 1024, None, "mem", "b")], nodes)
    assert plan[0].target is None and "libvirt is" in plan[0].reason
    assert survives_node_failure(nodes, {"b": [1024]}).checked == ("b",)


def test_libvirt_health_from_store():
    raw = {"daemon_state": "run", "domain_state": "ready", "memtotal": "16384"}
    assert NodeView.from_store("n", raw).libvirt == "ok"  # a daemon that does not publish it
    assert NodeView.from_store("n", {**raw, "libvirt": "hung"}).libvirt == "hung"
    garbage = NodeView.from_store("n", {**raw, "libvirt": "fine"})
    assert garbage.libvirt == "invalid" and not garbage.is_eligible
    assert [problem.path for problem in garbage.invalid] == ["nodes/n/libvirt"]


def test_a_failure_check_reads_as_the_modules_return_it():
    check = FailureCheck(False, failures={"n1": "too big"}, checked=("n1", "n2"), shortfalls={"n1": 512})
    assert check.to_dict() == {
        "ok": False,
        "message": check.message,
        "failures": {"n1": "too big"},
        "checked": ["n1", "n2"],
        "shortfalls": {"n1": 512},
    }
    assert FailureCheck(True, checked=("n1",)).to_dict()["message"] == (
        "the cluster survives the failure of any one of 1 ready node(s)"
    )
