"""bench/hail.py: the IAllocator requests bench p sends Ganeti's hail, and how its answers are read.

The builder and the parsers are checked on their own; the last tests run the real hail (package
ganeti-htools, which ``scripts/setup-host.sh`` installs for the tests and ``make bench``) on 2- and
3-node snapshots.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import hail
from bench.placement import Snapshot
from pvc_cluster_common._selector import NodeView

GIB = 1024


def view(name: str, total_gib: int, vms_gib: list[int], domain: str = "ready") -> NodeView:
    used = sum(vms_gib) * GIB
    return NodeView(
        name=name,
        daemon_state="run",
        domain_state=domain,
        memtotal=total_gib * GIB,
        memused=used,
        memfree=total_gib * GIB - used,
        memprov=used,
        domaincount=len(vms_gib),
    )


def snapshot(spec: dict[str, tuple[int, list[int]]]) -> Snapshot:
    return Snapshot(
        nodes={name: view(name, total, vms) for name, (total, vms) in spec.items()},
        running={name: [size * GIB for size in vms] for name, (_total, vms) in spec.items()},
    )


def test_message_describes_memory_as_the_selectors_see_it():
    snap = snapshot({"a": (128, [64, 32]), "b": (256, [8])})
    request = hail.allocate_request("new0", 4 * GIB)
    body = hail.message(snap.nodes, snap.running, request, merged=False, slack_mib=0)
    assert body["version"] == 2
    a, b = body["nodes"]["a"], body["nodes"]["b"]
    assert (a["total_memory"], a["free_memory"], a["reserved_memory"]) == (128 * GIB, 32 * GIB, 0)
    assert (b["total_memory"], b["free_memory"]) == (256 * GIB, 248 * GIB)
    # by default every node has 1 MiB of slack, total and free (hail refuses exact fits)
    slack = hail.message(snap.nodes, snap.running, request, merged=False)["nodes"]["a"]
    assert (slack["total_memory"], slack["free_memory"]) == (128 * GIB + 1, 32 * GIB + 1)
    assert a["group"] == b["group"] and a["group"] in body["nodegroups"]
    assert not a["drained"] and not a["offline"]
    # every VM an instance on its node, only the memory differing
    assert sorted(body["instances"]) == ["a/0", "a/1", "b/0"]
    assert body["instances"]["a/1"]["memory"] == 32 * GIB
    assert body["instances"]["a/1"]["nodes"] == ["a"]
    shapes = {
        (i["vcpus"], i["disk_template"], i["disk_space_total"], i["spindle_use"], len(i["nics"]))
        for i in body["instances"].values()
    }
    assert shapes == {(1, "diskless", 0, 0, 0)}
    request = body["request"]
    assert (request["type"], request["name"], request["required_nodes"], request["memory"]) == (
        "allocate",
        "new0",
        1,
        4 * GIB,
    )
    assert request["disk_template"] in body["nodegroups"][a["group"]]["ipolicy"]["disk-templates"]


def test_merged_message_has_one_instance_per_node_of_its_total_memory():
    snap = snapshot({"a": (128, [64, 32]), "b": (256, [8]), "c": (128, [])})
    body = hail.message(snap.nodes, snap.running, hail.allocate_request("x", GIB))
    assert {name: i["memory"] for name, i in body["instances"].items()} == {"a/all": 96 * GIB, "b/all": 8 * GIB}
    # a drained node keeps its VMs separate: they are what a node-evacuate names
    body = hail.message(snap.nodes, snap.running, hail.evacuate_request(["a/0", "a/1"]), drained=("a",))
    assert sorted(body["instances"]) == ["a/0", "a/1", "b/all"]
    assert body["nodes"]["a"]["drained"] and not body["nodes"]["b"]["drained"]
    assert body["request"] == {"type": "node-evacuate", "instances": ["a/0", "a/1"], "evac_mode": "primary-only"}


def test_parse_allocate_applies_only_answers_that_fit():
    nodes = snapshot({"a": (128, [120]), "b": (128, [64]), "f": (128, [0])}).nodes
    nodes["f"] = view("f", 128, [], domain="flushed")
    ok = {"success": True, "info": "", "result": ["b"]}
    assert hail.parse_allocate(ok, nodes, 16 * GIB) == ("b", False)
    assert hail.parse_allocate(ok, nodes, 64 * GIB) == ("b", False)  # exactly full is a fit
    assert hail.parse_allocate(ok, nodes, 65 * GIB) == (None, True)
    assert hail.parse_allocate({"success": True, "result": ["a"]}, nodes, 16 * GIB) == (None, True)
    assert hail.parse_allocate({"success": True, "result": ["f"]}, nodes, GIB) == (None, True)  # not eligible
    assert hail.parse_allocate({"success": True, "result": ["zz"]}, nodes, GIB) == (None, True)
    assert hail.parse_allocate({"success": True, "result": ["a", "b"]}, nodes, GIB) == (None, True)
    assert hail.parse_allocate({"success": True, "nodes": ["b"]}, nodes, GIB) == ("b", False)  # older key
    failed = {"success": False, "info": "No valid allocation solutions", "result": []}
    assert hail.parse_allocate(failed, nodes, GIB) == (None, False)


def test_parse_evacuate_reads_moved_and_failed():
    answer = {
        "success": True,
        "info": "Request successful: 1 instances failed to move and 2 were moved successfully",
        "result": [
            [["n/0", "default", ["b"]], ["n/1", "default", ["c"]]],
            [["n/2", "Can't find a suitable node"]],
            [[{"OP_ID": "OP_INSTANCE_MIGRATE"}]],
        ],
    }
    assert hail.parse_evacuate(answer) == ({"n/0": "b", "n/1": "c"}, {"n/2": "Can't find a suitable node"})
    assert hail.parse_evacuate({"success": False, "info": "no", "result": []}) == ({}, {})
    assert hail.parse_evacuate({"success": True, "result": {"moved": []}}) == ({}, {})


@pytest.mark.parametrize("merged", [True, False])
def test_real_hail_places_only_where_the_vm_fits(tmp_path: Path, merged: bool):
    found = hail.find_hail()
    assert found is not None
    # 48 GiB fits only on c (a has 16 free, b 40, c 64)
    snap = snapshot({"a": (128, [64, 32, 16]), "b": (128, [64, 16, 8]), "c": (256, [128, 64])})
    body = hail.message(snap.nodes, snap.running, hail.allocate_request("new0", 48 * GIB), merged=merged)
    answer = hail.run_hail(found, body, tmp_path)
    assert answer["success"] is True, answer
    assert hail.parse_allocate(answer, snap.nodes, 48 * GIB) == ("c", False)
    # larger than any node's free memory: hail finds nothing, nothing is placed
    body = hail.message(snap.nodes, snap.running, hail.allocate_request("new1", 65 * GIB), merged=merged)
    answer = hail.run_hail(found, body, tmp_path)
    assert answer["success"] is False
    assert hail.parse_allocate(answer, snap.nodes, 65 * GIB) == (None, False)


def test_real_hail_takes_an_exact_fit_only_with_the_slack(tmp_path: Path):
    """hail never leaves a node with 0 MiB free; 1 MiB of slack makes an exact fit a fit."""
    found = hail.find_hail()
    assert found is not None
    snap = snapshot({"a": (128, [64, 32, 16]), "c": (128, [32, 32])})  # c: exactly 64 GiB free
    strict = hail.message(snap.nodes, snap.running, hail.allocate_request("x", 64 * GIB), slack_mib=0)
    assert hail.run_hail(found, strict, tmp_path)["success"] is False
    loose = hail.message(snap.nodes, snap.running, hail.allocate_request("x", 64 * GIB))
    answer = hail.run_hail(found, loose, tmp_path)
    assert hail.parse_allocate(answer, snap.nodes, 64 * GIB) == ("c", False)
    # the slack is 1 MiB, no more: 1 MiB over the headroom is still refused by hail
    over = hail.message(snap.nodes, snap.running, hail.allocate_request("x", 64 * GIB + 1))
    assert hail.run_hail(found, over, tmp_path)["success"] is False


def test_real_hail_one_at_a_time_and_flush_never_overcommit(tmp_path: Path):
    found = hail.find_hail()
    assert found is not None
    snap = snapshot({"a": (128, [64, 32, 16]), "b": (128, [64, 16, 8]), "c": (128, [32, 32])})
    # a: 16 GiB free, b: 40, c: 64; 120 GiB free in all, 124 asked: not everything can fit
    sizes = [g * GIB for g in (32, 32, 16, 16, 8, 8, 8, 4)]
    result = hail.one_at_a_time(found, snap, sizes, tmp_path)
    assert result["overcommitted_nodes"] == 0 and result["refused_answers"] == 0
    assert result["unplaced_vms"] >= 1
    assert 0 < result["placed_pct"] <= 100.0
    # the fullest node (a, 112 GiB) cannot go anywhere whole (b and c have 104 free); largest
    # first, every choice is forced: 64 on c (the only fit), 32 on b, and 16 fits nowhere
    result = hail.flush(found, snap, tmp_path)
    assert result["overcommitted_nodes"] == 0 and result["refused_answers"] == 0
    assert result["unplaced_vms"] == 1
    assert result["placed_pct"] == round(100.0 * 96 / 112, 2)
