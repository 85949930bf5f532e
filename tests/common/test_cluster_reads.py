"""Typed reads of the cluster (_cluster, _report) stay usable when a stored value is garbage."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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


# ---- a node's state: the peers' verdicts are read only when one may decide, and none is missed ----

NODES = ("n1", "n2", "n3")


def _full_states(store) -> dict:
    """Every node's state from one read of everything, every peer's verdict included (the
    reading before verdicts_may_decide): what read_node_states must answer."""
    from pvc_cluster_common._cluster import node_state_paths, state_from, verdict_paths

    schema = store.schema
    paths, lists = [], []
    for name in NODES:
        keys, containers = node_state_paths(schema, name)
        paths += keys + verdict_paths(schema, name, NODES)
        lists += containers
    found, listed = store.get_round(paths, lists)
    return {
        name: state_from(schema, name, found, listed, NODES)
        for name in NODES
        if found[schema.node_key(name, S.NODE_DAEMON_STATE)] is not None
    }


def _verdict(store, by: str, node: str, result: str) -> bool:
    """``by``'s verdict ``result`` about ``node``'s current state, written as node_daemon/ha.py
    writes one (its record and the note in the node's claims container, checked against the
    version judged; fencing, fenced and fence-failed claim the version unless it is claimed)."""
    from pvc_cluster_common._store import ConflictError

    schema = store.schema
    state_path = schema.node_key(node, S.NODE_DAEMON_STATE)
    found = store.find(state_path)
    if found is None:
        return False
    record = {"by": by, "method": "none", "result": result, "started": 1.0, "version": found.version}
    values = {
        schema.node_fence_record(by, node): json.dumps(record),
        schema.node_claims(node): json.dumps({"by": by, "result": result, "version": found.version}),
    }
    create = []
    claim = schema.node_claim(node, found.version)
    if result != "dead" and not store.exists(claim):
        values[claim] = by
        create.append(claim)
    try:
        store.commit(values, expect_versions={state_path: found.version}, create=create)
    except ConflictError:
        return False
    return True


def _own(store, node: str, state: str, claim: bool = False) -> None:
    """``node`` writes its own daemon state (its keepalive answering a verdict claims the version
    it answers, as its daemon does)."""
    schema = store.schema
    state_path = schema.node_key(node, S.NODE_DAEMON_STATE)
    found = store.find(state_path)
    values: dict = {state_path: state}
    create = []
    if claim and found is not None and not store.exists(schema.node_claim(node, found.version)):
        values[schema.node_claim(node, found.version)] = node
        create.append(schema.node_claim(node, found.version))
    store.commit(values, create=create)


@pytest.fixture
def three_nodes(store):
    schema = store.schema
    values = {}
    for node in NODES:
        values.update(
            {
                schema.node(node): "",
                schema.node_key(node, S.NODE_DAEMON_STATE): "run",
                schema.node_key(node, S.NODE_DOMAIN_STATE): "ready",
                schema.node_claims(node): "",
                schema.node_fences(node): "",
            }
        )
    store.commit(values)
    return store


def test_verdicts_are_read_only_for_a_node_whose_claims_changed_since_its_state(three_nodes):
    from pvc_cluster_common._cluster import node_state_paths, read_node_states, verdicts_may_decide

    store, schema = three_nodes, three_nodes.schema

    def may_decide(node: str) -> bool:
        keys, lists = node_state_paths(schema, node)
        found, _listed, zxids = store.get_round_zxids(keys, lists)
        return verdicts_may_decide(schema, node, found, zxids)

    assert not any(may_decide(node) for node in NODES)  # the claims container was made with the state
    assert _verdict(store, "n2", "n1", "dead")
    assert may_decide("n1") and not may_decide("n2")
    assert read_node_states(store)["n1"].daemon_state == "dead"
    _own(store, "n1", "run", claim=True)  # its keepalive answers the verdict
    assert not may_decide("n1")
    assert read_node_states(store)["n1"].daemon_state == "run"
    # a note written alone (by any node) only makes the verdicts read again
    store.commit({schema.node_claims("n1"): "forged"})
    assert may_decide("n1") and read_node_states(store)["n1"].daemon_state == "run"
    assert read_node_states(store) == _full_states(store)


def test_a_node_without_a_claims_container_has_its_verdicts_read(three_nodes):
    from pvc_cluster_common._cluster import node_state_paths, read_node_states, verdicts_may_decide

    store, schema = three_nodes, three_nodes.schema
    store.delete([schema.node_claims("n3")])
    keys, lists = node_state_paths(schema, "n3")
    found, _listed, zxids = store.get_round_zxids(keys, lists)
    assert verdicts_may_decide(schema, "n3", found, zxids)
    assert _verdict(store, "n1", "n3", "dead")
    assert read_node_states(store)["n3"].daemon_state == "dead"


OPS = st.lists(
    st.tuples(
        st.sampled_from(("own", "own-claim", "verdict", "domain", "note")),
        st.sampled_from(NODES),
        st.sampled_from(NODES),
        st.sampled_from(("dead", "fencing", "fenced", "fence-failed")),
    ),
    min_size=1,
    max_size=12,
)


# kazoo's threads draw from the global random module (retry jitter) while hypothesis draws
@pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisDeprecationWarning")
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=OPS)
def test_no_verdict_is_missed_whatever_the_order_of_writes(three_nodes, ops):
    """After any sequence of the writes the protocol makes (a node's own state, with or without
    claiming the version it answers; a peer's verdict about the current version; a domain state;
    a note alone), read_node_states, the node views and the reports answer what a read of every
    peer's verdict answers."""
    from pvc_cluster_common._cluster import read_node_states, read_node_views, read_nodes_raw

    store, schema = three_nodes, three_nodes.schema
    # every example starts from the same three nodes
    store.commit(
        {schema.node_key(node, key): value for node in NODES for key, value in ((S.NODE_DAEMON_STATE, "run"),)}
        | {schema.node_key(node, S.NODE_DOMAIN_STATE): "ready" for node in NODES}
        | {schema.node_claims(node): "" for node in NODES},
        delete=[schema.node_fence_record(by, node) for by in NODES for node in NODES if by != node]
        + [
            schema.node_claims(node) + "/" + claim
            for node in NODES
            for claim in store.list_children(schema.node_claims(node))
        ],
    )
    for op, node, by, result in ops:
        if op == "own":
            _own(store, node, "run")
        elif op == "own-claim":
            _own(store, node, "run", claim=True)
        elif op == "verdict" and by != node:
            _verdict(store, by, node, result)
        elif op == "domain":
            store.commit({schema.node_key(node, S.NODE_DOMAIN_STATE): "flush"})
        elif op == "note":
            store.commit({schema.node_claims(node): "note"})
        expected = _full_states(store)
        assert read_node_states(store) == expected
        assert read_node_states(store, [node], everyone=list(NODES)) == {node: expected[node]}
        views = read_node_views(store)
        assert {name: (view.daemon_state, view.domain_state) for name, view in views.items()} == {
            name: (state.daemon_state, state.domain_state) for name, state in expected.items()
        }
        raw = read_nodes_raw(store, NODES)
        assert {name: raw[name][0][S.NODE_DAEMON_STATE] for name in NODES} == {
            name: state.daemon_state for name, state in expected.items()
        }


# ---- the one watch-and-read-again loop (_cluster.watch_until) and the node-state wait on it ----


def test_watch_until_answers_at_once_when_the_condition_already_holds(store):
    from pvc_cluster_common._cluster import watch_until

    key = store.schema.config("wait-now")
    store.commit({key: "yes"})
    assert watch_until(store, [key], lambda: store.find_text(key) == "yes" and "held", 60) == "held"


def test_watch_until_reads_again_after_each_change_of_a_watched_key(store):
    import threading

    from pvc_cluster_common._cluster import watch_until

    key, other = store.schema.config("wait-a"), store.schema.config("wait-b")
    store.commit({key: "0", other: "0"})
    seen: list[str | None] = []
    asked = threading.Event()

    def condition():
        seen.append(store.find_text(key))
        asked.set()
        return seen[-1] if seen[-1] == "2" else None

    def writer() -> None:
        for value in ("1", "2"):
            asked.wait(60)  # the loop has read the key since the last write
            asked.clear()
            store.commit({key: value})

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        assert watch_until(store, [other, key], condition, 60) == "2"
    finally:
        thread.join(60)
    assert seen[0] == "0" and seen[-1] == "2" and "1" in seen


def test_watch_until_gives_none_when_the_deadline_passes(store):
    from pvc_cluster_common._cluster import watch_until

    key = store.schema.config("wait-never")
    calls = []
    assert watch_until(store, [key], lambda: calls.append(1), 0.2) is None
    assert calls  # evaluated at least once before the deadline


def test_wait_for_node_state_wakes_on_a_verdict_about_the_node(three_nodes):
    import threading

    from pvc_cluster_common._cluster import wait_for_node_state

    asked = threading.Event()

    def dead(state) -> bool:
        asked.set()
        return state is not None and state.daemon_state == "dead"

    thread = threading.Thread(target=lambda: asked.wait(60) and _verdict(three_nodes, "n3", "n2", "dead"))
    thread.start()
    try:
        state = wait_for_node_state(three_nodes, "n2", dead, 60)
    finally:
        thread.join(60)
    assert state is not None and state.daemon_state == "dead" and state.verdict["by"] == "n3"
    assert wait_for_node_state(three_nodes, "n1", lambda state: state is None, 0.2) is None  # n1 runs


def test_a_recovery_that_lost_n1_shows_its_verdict_in_the_node_report_and_an_invalid_one_is_named(cluster):
    schema = cluster.schema
    key = schema.node_key("n1", S.NODE_RECOVERY_N1)
    assert node_report(read_cluster(cluster), "n1")["recovery_n1"] is None  # no verdict: null
    verdict = "recovery of fenced node n3 (2 VM(s) restarted elsewhere) left the cluster failing n-1: ..."
    cluster.commit({key: verdict})
    snapshot = read_cluster(cluster)
    assert node_report(snapshot, "n1")["recovery_n1"] == verdict and node_report(snapshot, "n1")["invalid"] == []
    assert node_report(snapshot, "n2")["recovery_n1"] is None
    cluster.commit({key: "x" * (MAX_REASON_BYTES + 1)})
    n1 = node_report(read_cluster(cluster), "n1")
    assert n1["recovery_n1"].startswith("(its verdict is not valid: nodes/n1/recovery_n1")
    assert [text.split(":")[0] for text in n1["invalid"]] == ["nodes/n1/recovery_n1"]
