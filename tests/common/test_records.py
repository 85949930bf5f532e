"""One decoder per kind of stored key (_records): the migration record above all."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pvc_cluster_common import _records as R
from pvc_cluster_common._decode import Invalid
from pvc_cluster_common._requests import final_record

UUID = "6695eb01-f6a4-8304-79aa-97f2502e193f"
OTHER = "7795eb01-f6a4-8304-79aa-97f2502e193f"
PATH = f"/pvc/domains/{UUID}/migration"
RECORD = {
    "id": "6f1c2a9b0d3e",
    "vm": UUID,
    "name": "web1",
    "kind": "migrate",
    "source": "n1",
    "target": "n2",
    "method": "default",
    "force_live": False,
    "memory_mib": 1024,
    "prev_lastnode": "",
    "requester": "test",
    "step": "requested",
    "method_used": None,
    "fallback_reason": None,
    "reason": None,
    "steps": {"requested": 1764190000.12},
}


def decode(value, uuid=UUID):
    return R.MigrationRecord.from_json(value if isinstance(value, str) else json.dumps(value), PATH, uuid)


def test_a_record_round_trips():
    record = decode(RECORD)
    assert (record.id, record.vm, record.source, record.target, record.memory_mib) == (
        "6f1c2a9b0d3e",
        UUID,
        "n1",
        "n2",
        1024,
    )
    assert json.loads(record.to_json()) == RECORD
    assert decode(record.to_json()) == record


def test_a_record_of_an_older_daemon_without_name_and_requester_is_read():
    record = decode({key: value for key, value in RECORD.items() if key not in ("name", "requester", "prev_lastnode")})
    assert (record.name, record.requester, record.prev_lastnode) == ("", "", "")


def test_a_claimed_record_keeps_its_claim():
    record = decode(dict(RECORD, step="transferred", method_used="shutdown", starting_on="n2"))
    assert record.starting_on == "n2" and json.loads(record.to_json())["starting_on"] == "n2"


def test_at_step_adds_the_step_time():
    record = decode(RECORD).at_step("prepared", 1764190001.5, method_used="live")
    assert (record.step, record.method_used, record.steps) == (
        "prepared",
        "live",
        {"requested": 1764190000.12, "prepared": 1764190001.5},
    )


# Issue #13: every one of these crashed every daemon at start-up, or blocked a flush for ever.
@pytest.mark.parametrize(
    "stored, field, expected",
    [
        ("42", "", "a JSON object"),
        ("[1, 2]", "", "a JSON object"),
        ('"mail"', "", "a JSON object"),
        ('{"id": "6f1c", "vm": "', "", "JSON"),
        ("[" * 50_000, "", "nested deeper"),
        ("", "", "JSON"),
        ("null", "", "a JSON object"),
        (dict(RECORD, vm=OTHER), "vm", f"the UUID of its key ({UUID})"),
        (dict(RECORD, target="n1"), "target", "another node than the source n1"),
        (dict(RECORD, target=None), "target", "text"),
        (dict(RECORD, source="../n1"), "source", "a node name"),
        (dict(RECORD, memory_mib=0), "memory_mib", "an integer from 1"),
        (dict(RECORD, memory_mib=1e300), "memory_mib", "an integer from 1"),
        (dict(RECORD, memory_mib=True), "memory_mib", "an integer from 1"),
        (dict(RECORD, step="done"), "step", "one of requested"),
        (dict(RECORD, kind="steal"), "kind", "one of migrate"),
        (dict(RECORD, method_used="teleport"), "method_used", "one of live"),
        (dict(RECORD, force_live="yes"), "force_live", "true or false"),
        (dict(RECORD, steps=[1]), "steps", "an object of step names"),
        (dict(RECORD, steps={"prepared": -1}), "steps.prepared", "a unix time"),
        (dict(RECORD, steps={"hack": 1}), "steps", "a step name"),
        (dict(RECORD, reason="x" * 10_000), "reason", "at most"),
        (dict(RECORD, id="a/b"), "id", "a record id"),
        (dict(RECORD, starting_on="n1"), "starting_on", "the target n2"),
        (dict(RECORD, name="a/b"), "name", "a VM name"),
    ],
)
def test_an_invalid_record_names_the_field_and_what_is_accepted(stored, field, expected):
    with pytest.raises(Invalid) as caught:
        decode(stored)
    assert caught.value.path == PATH and caught.value.field == field and expected in caught.value.expected


@given(
    st.one_of(
        st.binary(max_size=300),
        st.text(max_size=300),
        st.dictionaries(
            st.sampled_from(sorted(RECORD) + ["x"]),
            st.one_of(
                st.none(),
                st.booleans(),
                st.integers(),
                st.floats(),
                st.text(max_size=10),
                st.lists(st.integers(), max_size=2),
            ),
            max_size=20,
        ).map(lambda changes: json.dumps(dict(RECORD, **changes))),
    )
)
def test_any_stored_value_decodes_or_is_invalid(stored):
    try:
        record = R.MigrationRecord.from_json(stored, PATH, UUID)
    except Invalid:
        return
    assert record.vm == UUID and record.source != record.target and record.memory_mib >= 1


def test_history_entries_are_checked_too():
    final = final_record(decode(RECORD), "aborted", "target n2 is not ready")
    entry = R.history_entry(json.dumps(final), PATH + "/1", UUID)
    assert (entry["result"], entry["reason"], "step" in entry) == ("aborted", "target n2 is not ready", False)
    assert entry["duration_s"] >= 0 and "aborted" in entry["steps"]
    for bad in ("42", json.dumps(dict(final, result="won")), json.dumps(dict(final, vm=OTHER))):
        with pytest.raises(Invalid):
            R.history_entry(bad, PATH + "/1", UUID)


def test_a_guest_seen_downtime_in_an_audit_record_is_checked():
    final = final_record(decode(RECORD), "done")
    with_downtime = dict(final, guest_downtime_ms=41.25, guest_downtime_by="lab tick collector")
    entry = R.history_entry(json.dumps(with_downtime), PATH + "/1", UUID)
    assert (entry["guest_downtime_ms"], entry["guest_downtime_by"]) == (41.2, "lab tick collector")
    assert "guest_downtime_ms" not in R.history_entry(json.dumps(final), PATH + "/1", UUID)
    for bad in (
        {"guest_downtime_ms": -1, "guest_downtime_by": "x"},
        {"guest_downtime_ms": float("inf"), "guest_downtime_by": "x"},
        {"guest_downtime_ms": 4e6, "guest_downtime_by": "x"},
        {"guest_downtime_ms": True, "guest_downtime_by": "x"},
        {"guest_downtime_ms": "12", "guest_downtime_by": "x"},
        {"guest_downtime_ms": 12},
        {"guest_downtime_by": "x"},
        {"guest_downtime_ms": 12, "guest_downtime_by": "x" * 300},
    ):
        with pytest.raises(Invalid):
            R.history_entry(json.dumps(dict(final, **bad)), PATH + "/1", UUID)


@pytest.mark.parametrize(
    "downtime, by",
    [(-0.1, "probe"), (float("nan"), "probe"), (12, ""), (12, "  "), (12, None), (12, "p" * 257), ("12", "probe")],
)
def test_guest_downtime_fields_refuse_what_the_decoder_would(downtime, by):
    with pytest.raises(Invalid):
        R.guest_downtime_fields(downtime, by)


# ---- the other kinds of keys --------------------------------------------------------------------


def test_running_domains():
    assert R.running_domains(json.dumps([UUID, OTHER]), "p") == (UUID, OTHER)
    for bad in (json.dumps(UUID), json.dumps([1]), json.dumps(["x"]), json.dumps({UUID: 1}), "[" * 50_000):
        with pytest.raises(Invalid):
            R.running_domains(bad, "p")


def test_vm_node_and_state():
    assert R.vm_node("", "p") == "" and R.vm_node("n1", "p") == "n1"
    assert R.vm_state("start", "p") == "start"
    for decoder, bad in ((R.vm_node, "../n1"), (R.vm_node, "n1\n"), (R.vm_state, "run"), (R.vm_state, "")):
        with pytest.raises(Invalid):
            decoder(bad, "p")


def test_domain_xml_refuses_empty_and_memoryless_documents():
    for bad, expected in (
        ("", "empty"),
        (f"<domain type='test'><name>x</name><uuid>{UUID}</uuid></domain>", "<memory>"),
    ):
        with pytest.raises(Invalid, match=expected):
            R.domain_xml(bad, "p")
    with pytest.raises(Invalid, match="at most"):
        R.domain_xml("<domain>" + " " * (2 * 1024 * 1024) + "</domain>", "p")


def test_reservation_and_stats():
    assert R.reservation("1024", "p") == 1024
    with pytest.raises(Invalid):
        R.reservation("1e999", "p")
    assert R.vm_stats("", "p") == {} and R.vm_stats('{"a": 1}', "p") == {"a": 1}
    with pytest.raises(Invalid):
        R.vm_stats("[]", "p")


# ---- the runstate record: what the daemons did with the operator's desired state -----------------


def test_the_state_is_the_runstate_record_only_for_the_desired_state_version_it_names():
    record = R.RunState("stop", desired_version=4, by="n1", at=1.0)
    assert R.effective_state("shutdown", 4, record) == "stop"
    assert R.effective_state("shutdown", 5, record) == "shutdown"  # the operator wrote state since
    assert R.effective_state("start", 3, record) == "start"
    assert R.effective_state("start", -1, record) == "start"  # no state key: nothing applies
    assert R.effective_state("start", 4, None) == "start"


def test_runstate_round_trips_and_carries_autostart_only_for_the_same_desired_version():
    flushed = R.runstate_after(None, "shutdown", 7, "n1", 10.0, autostart=True)
    assert R.runstate(flushed.to_json(), "p") == flushed
    stopped = R.runstate_after(flushed, "stop", 7, "n1", 11.0)
    assert (stopped.state, stopped.autostart, stopped.autostart_used) == ("stop", True, -1)
    used = R.runstate_after(stopped, "start", 7, "n2", 12.0, autostart=False, autostart_used=3)
    assert (used.autostart, used.autostart_used) == (False, 3)
    later = R.runstate_after(used, "fail", 8, "n2", 13.0)  # a newer desired state: no autostart, the use kept
    assert (later.autostart, later.autostart_used, later.desired_version) == (False, 3, 8)
    assert R.runstate_after(flushed, "fail", 8, "n1", 14.0).autostart is False


@pytest.mark.parametrize(
    "value, field",
    [
        ('{"state": "run", "desired_version": 1}', "state"),
        ('{"state": "stop"}', "desired_version"),
        ('{"state": "stop", "desired_version": -1}', "desired_version"),
        ('{"state": "stop", "desired_version": 2147483648}', "desired_version"),
        ('{"state": "stop", "desired_version": 1, "autostart": "yes"}', "autostart"),
        ('{"state": "stop", "desired_version": 1, "autostart_used": 1.5}', "autostart_used"),
        ('{"state": "stop", "desired_version": 1, "by": "../x"}', "by"),
        ('{"state": "stop", "desired_version": 1, "at": -5}', "at"),
    ],
)
def test_a_runstate_record_that_is_not_valid_names_its_field(value, field):
    with pytest.raises(Invalid) as failure:
        R.runstate(value, "/pvc/domains/u/runtime/runstate")
    assert failure.value.field == field, str(failure.value)


@given(st.binary(max_size=200))
def test_runstate_decodes_any_bytes_or_says_invalid(data):
    try:
        R.runstate(data.decode("utf-8", errors="replace"), "p")
    except Invalid:
        pass


# ---- a node's state: its own, combined with its peers' verdicts ---------------------------------


def _verdict(by, result, version, started=1.0):
    return {"by": by, "method": "none", "result": result, "started": started, "version": version}


def test_a_nodes_own_state_decides_until_a_peer_judges_its_current_version():
    state = R.node_state("run", 4, "ready", [], [])
    assert (state.daemon_state, state.domain_state, state.by_verdict, state.claimed) == ("run", "ready", False, False)
    # a verdict about an older version is stale: the node wrote its state since
    assert R.node_state("run", 4, "ready", ["3"], [_verdict("n2", "fenced", 3)]).daemon_state == "run"
    dead = R.node_state("run", 4, "ready", [], [_verdict("n2", "dead", 4)])
    assert (dead.daemon_state, dead.own_state, dead.verdict["by"]) == ("dead", "run", "n2")


def test_a_fence_verdict_needs_the_claim_of_its_version_and_the_strongest_decides():
    verdicts = [_verdict("n2", "dead", 4), _verdict("n3", "fencing", 4)]
    # no claim: a fencing record decides nothing (a record outliving the node's keys)
    assert R.node_state("run", 4, "ready", [], verdicts).daemon_state == "dead"
    state = R.node_state("run", 4, "ready", ["4"], verdicts)
    assert (state.daemon_state, state.claimed, state.verdict["by"]) == ("fencing", True, "n3")
    # a hand-over: a second actor's record about the same version; fenced is flushed
    state = R.node_state("run", 4, "ready", ["4"], verdicts + [_verdict("n2", "fenced", 4)])
    assert (state.daemon_state, state.domain_state) == ("fenced", "flushed")
    failed = R.node_state("run", 4, "ready", ["4"], verdicts + [_verdict("n1", "fence-failed", 4)])
    assert (failed.daemon_state, failed.domain_state) == ("fence-failed", "ready")


def test_an_operators_fenced_decides_and_an_older_daemons_verdict_is_one_more():
    assert R.node_state("fenced", 5, "flushed", [], [_verdict("n2", "dead", 5)]).daemon_state == "fenced"
    # an older daemon's peer wrote `dead` into the node's own key; a newer peer fences that version
    state = R.node_state("dead", 5, "ready", ["5"], [_verdict("n2", "fencing", 5)])
    assert (state.daemon_state, state.verdict["by"]) == ("fencing", "n2")
    assert R.node_state("dead", 5, "ready", [], []).daemon_state == "dead"


def test_a_fence_record_names_the_version_it_judged_and_a_dead_verdict_is_no_fence():
    path = "/pvc/nodes/n2/fences/n1"
    record = R.fence_record(json.dumps(_verdict("n2", "dead", 7)), path)
    assert record["version"] == 7 and record["result"] == "dead"
    for bad in (-1, 2**31, "7", True, 1.5):
        with pytest.raises(Invalid):
            R.fence_record(json.dumps(_verdict("n2", "dead", bad)), path)
    fenced = json.dumps(_verdict("n3", "fenced", 6, started=1.0))
    dead = json.dumps(_verdict("n2", "dead", 7, started=2.0))
    assert R.latest_fence_record([(path, dead), ("/pvc/nodes/n3/fences/n1", fenced)])["by"] == "n3"


def test_the_claims_note_is_read_only_for_the_version_it_names():
    note = json.dumps({"by": "n2", "result": "fencing", "version": 3})
    assert R.noted_verdict(note, 3) == "fencing"
    assert R.noted_verdict(note, 4) == ""
    for bad in ("", None, "[", "42", json.dumps({"result": "run", "version": 3}), "[" * 50_000):
        assert R.noted_verdict(bad, 3) == ""
