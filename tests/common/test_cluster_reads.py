"""Typed reads of the cluster (_cluster, _report) stay usable when a stored value is garbage."""

from __future__ import annotations

import json

import pytest

from pvc_cluster_common import _schema as S
from pvc_cluster_common._cluster import (
    read_fence_record,
    read_history,
    read_node_views,
    read_nodes_raw,
    read_vm,
    record_guest_downtime,
    vm_definition,
)
from pvc_cluster_common._decode import Invalid
from pvc_cluster_common._records import MAX_REASON_BYTES, MigrationRecord
from pvc_cluster_common._requests import finish_values
from pvc_cluster_common._report import cluster_report, node_report, read_cluster

pytestmark = pytest.mark.zk

UUID = "6695eb01-f6a4-8304-79aa-97f2502e193f"
OTHER = "7795eb01-f6a4-8304-79aa-97f2502e193f"
XML = (
    f"<domain type='test'><name>web1</name><uuid>{UUID}</uuid><memory unit='MiB'>1024</memory>"
    "<vcpu>2</vcpu><os><type>hvm</type></os><devices/></domain>"
)


@pytest.fixture
def cluster(store):
    """Two ready nodes, VM web1 on n1, and a reservation on n2 of `1e999` MiB (before the
    bounded decoders it raised OverflowError in every flush, module and inventory read)."""
    schema = store.schema
    values = {}
    for node in ("n1", "n2"):
        values.update(
            {
                schema.node(node): "",
                schema.node_key(node, S.NODE_DAEMON_STATE): "run",
                schema.node_key(node, S.NODE_DOMAIN_STATE): "ready",
                schema.node_key(node, S.NODE_MEMTOTAL): 16384,
                schema.node_key(node, S.NODE_MEMPROV): 0,
                schema.node_key(node, S.NODE_MEMRESERVE): 0,
            }
        )
    values.update(vm_definition(schema, UUID, "web1", XML, "n1", "start"))
    values[schema.node_reservation("n2", OTHER)] = "1e999"
    values[schema.node_reservation("n2", UUID)] = "512"
    store.commit(values)
    return store


def test_an_overflowing_reservation_reads_as_zero_and_is_named(cluster):
    views = read_node_views(cluster)
    assert views["n2"].reserved == 512
    assert [problem.path for problem in views["n2"].invalid] == [cluster.schema.node_reservation("n2", OTHER)]
    problems = {}
    raw = read_nodes_raw(cluster, ["n1", "n2"], problems)
    assert raw["n2"][1] == {OTHER: 0, UUID: 512}
    assert [str(problem) for problem in problems["n2"]] == [
        f"{cluster.schema.node_reservation('n2', OTHER)}: '1e999' is not valid; expected an integer from 0 to {2**43}"
    ]


def test_reports_of_a_node_with_garbage_figures_name_them(cluster):
    schema = cluster.schema
    cluster.commit(
        {
            schema.node_key("n1", S.NODE_MEMTOTAL): "1e999",
            schema.node_key("n1", S.NODE_KEEPALIVE): "nan",
            schema.node_key("n1", S.NODE_MEMALLOC): "[[[[",
        }
    )
    snapshot = read_cluster(cluster)
    n1, n2 = node_report(snapshot, "n1"), node_report(snapshot, "n2")
    assert n1["memory"]["total"] == 0 and n1["keepalive"] == 0.0 and n1["memory"]["allocated"] == 0
    assert sorted(text.split(":")[0] for text in n1["invalid"]) == [
        "nodes/n1/keepalive",
        "nodes/n1/memalloc",
        "nodes/n1/memtotal",
    ]
    assert n2["memory"]["reserved"] == 512 and len(n2["invalid"]) == 1 and OTHER in n2["invalid"][0]
    assert cluster_report(snapshot)["nodes"] == 2


def test_a_halted_flush_shows_its_verdict_in_the_node_report_and_an_invalid_one_still_says_halted(cluster):
    schema = cluster.schema
    key = schema.node_key("n1", S.NODE_FLUSH_HALTED)
    snapshot = read_cluster(cluster)
    assert node_report(snapshot, "n1")["flush_halted"] is None  # no verdict: null
    verdict = "flush of n1 halted before moving 1 more VM(s): once done, the cluster would not survive ..."
    cluster.commit({schema.node_key("n1", S.NODE_DOMAIN_STATE): "flush", key: verdict})
    snapshot = read_cluster(cluster)
    assert snapshot.nodes["n1"][S.NODE_FLUSH_HALTED] == verdict
    n1 = node_report(snapshot, "n1")
    assert (n1["domain_state"], n1["flush_halted"], n1["invalid"]) == ("flush", verdict, [])
    assert node_report(snapshot, "n2")["flush_halted"] is None
    # a verdict that is not valid (longer than a reason may be) still says the flush halted, and is named
    cluster.commit({key: "x" * (MAX_REASON_BYTES + 1)})
    n1 = node_report(read_cluster(cluster), "n1")
    assert n1["flush_halted"].startswith("(its verdict is not valid: nodes/n1/flush_halted")
    assert [text.split(":")[0] for text in n1["invalid"]] == ["nodes/n1/flush_halted"]


@pytest.mark.parametrize("stored, expected", [(None, False), ("true", True), ("false", False), ("yes", False)])
def test_the_require_n1_setting_is_read_and_an_invalid_one_reads_as_false(store, stored, expected):
    if stored is not None:
        store.commit({store.schema.require_n1(): stored})
    assert read_cluster(store).require_n1 is expected


def _finished(store, migration_id: str, result: str, method_used: str | None) -> None:
    record = MigrationRecord(
        id=migration_id,
        vm=UUID,
        kind="migrate",
        source="n1",
        target="n2",
        method="default",
        memory_mib=1024,
        step="transferring",
        name="web1",
        method_used=method_used,
        steps={"requested": 1.0, "transferring": 2.0},
    )
    values, _delete, _final = finish_values(store.schema, UUID, record, result, None if result == "done" else "no")
    store.commit({k: v for k, v in values.items() if "/history/" in k})


def test_a_guest_seen_downtime_is_added_to_a_done_live_migration_once(cluster):
    _finished(cluster, "live1", "done", "live")
    _finished(cluster, "cold1", "done", "shutdown")
    _finished(cluster, "failed1", "aborted", "live")
    assert record_guest_downtime(cluster, UUID, "live1", 37.5, "lab tick collector")
    assert not record_guest_downtime(cluster, UUID, "live1", 99, "again")  # only once
    assert not record_guest_downtime(cluster, UUID, "cold1", 10, "probe")  # not a live switch-over
    assert not record_guest_downtime(cluster, UUID, "failed1", 10, "probe")  # no switch-over happened
    assert not record_guest_downtime(cluster, UUID, "unknown", 10, "probe")
    with pytest.raises(Invalid):
        record_guest_downtime(cluster, UUID, "live1", -5, "probe")
    by_id = {entry["id"]: entry for entry in read_history(cluster, UUID)}
    assert (by_id["live1"]["guest_downtime_ms"], by_id["live1"]["guest_downtime_by"]) == (37.5, "lab tick collector")
    assert "guest_downtime_ms" not in by_id["cold1"] and "guest_downtime_ms" not in by_id["failed1"]


def test_node_reports_show_maintenance_and_the_last_fence_and_name_garbage_in_them(cluster):
    schema = cluster.schema
    fence = {
        "by": "n2",
        "method": "ipmi",
        "device": "ipmi 10.0.0.1:623 (off)",
        "result": "fenced",
        "started": 100.0,
        "finished": 100.5,
        "duration_s": 0.5,
        "detail": "power off confirmed",
    }
    cluster.commit(
        {
            schema.node_key("n1", S.NODE_MAINTENANCE): "true",
            schema.node_key("n1", S.NODE_FENCE): json.dumps(fence),
            schema.node_key("n2", S.NODE_MAINTENANCE): "maybe",
            schema.node_key("n2", S.NODE_FENCE): json.dumps({**fence, "method": "ssh"}),
        }
    )
    snapshot = read_cluster(cluster)
    n1, n2 = node_report(snapshot, "n1"), node_report(snapshot, "n2")
    assert n1["maintenance"] is True and n1["fence"] == fence and not n1["invalid"]
    assert n2["maintenance"] is False and n2["fence"] == {}
    assert any(text.startswith("nodes/n2/maintenance") and "'maybe'" in text for text in n2["invalid"])
    assert any(f"{schema.node_key('n2', S.NODE_FENCE)}" in text and "'ssh'" in text for text in n2["invalid"]), n2[
        "invalid"
    ]


def test_a_nodes_fence_record_is_the_latest_of_its_own_and_its_peers(cluster):
    """A peer's record of its fence of n1 (under the peer's own keys) and an operator's confirm_down
    (n1's own ``fence``): node_info and the daemons show the one that started last."""
    schema = cluster.schema
    operator = {"by": "operator", "method": "operator", "result": "fenced", "started": 100.0, "finished": 100.0}
    by_n2 = {"by": "n2", "method": "ipmi", "result": "fence-failed", "started": 90.0, "detail": "no answer"}
    cluster.commit(
        {
            schema.node_key("n1", S.NODE_FENCE): json.dumps(operator),
            schema.node_fence_record("n2", "n1"): json.dumps(by_n2),
        }
    )
    assert node_report(read_cluster(cluster), "n1")["fence"] == operator
    assert read_fence_record(cluster, "n1") == operator
    later = {**by_n2, "started": 200.0}
    cluster.commit({schema.node_fence_record("n2", "n1"): json.dumps(later)})
    assert node_report(read_cluster(cluster), "n1")["fence"] == later == read_fence_record(cluster, "n1")
    cluster.commit({schema.node_fence_record("n2", "n1"): "[garbage"})
    problems: list = []
    assert read_fence_record(cluster, "n1", problems) == operator
    assert [problem.path for problem in problems] == [schema.node_fence_record("n2", "n1")]


def test_a_vm_read_at_once_derives_what_the_daemons_table_derives(cluster):
    # VMRecord is the one record of a VM for the modules and the daemon's table: what the daemon
    # asks of a table entry (migration source and target, XML ok, why it is left alone) is
    # derived from the fields a full read fills too
    store = cluster
    path = store.schema.domain_migration(UUID)
    vm = read_vm(store, UUID)
    assert (vm.migration_source, vm.migration_target, vm.xml_ok, vm.left_alone) == (None, None, True, "")
    assert vm.loaded == frozenset() and not vm.has(S.DOMAIN_STATE)  # only the daemon's table fills these
    record = MigrationRecord(
        id="m1", vm=UUID, kind="migrate", source="n1", target="n2", method="default", memory_mib=1024, step="requested"
    )
    store.commit({path: record.to_json()})
    vm = read_vm(store, UUID)
    assert (vm.migration_source, vm.migration_target, vm.left_alone) == ("n1", "n2", "")
    store.commit({path: "{not json"})
    vm = read_vm(store, UUID)
    assert vm.migration is None and vm.migration_source is None
    assert vm.migration_error and vm.left_alone == vm.migration_error
