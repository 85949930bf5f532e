# -*- coding: utf-8 -*-
# Copyright: pvc.cluster developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""pvc.cluster.vm_migrate: input validation, idempotency and the planned target (no ZooKeeper)."""

from __future__ import annotations

import json

import pytest

from ansible_collections.pvc.cluster.plugins.module_utils._module import ModuleFailure
from ansible_collections.pvc.cluster.plugins.modules import vm_migrate as module

from ansible_collections.pvc.cluster.tests.unit.plugins.modules.cluster_builders import FakeStore, make_vm


def params(**values):
    base = {
        "name": "web1",
        "state": "migrated",
        "target_node": None,
        "force_live": False,
        "wait": True,
        "wait_timeout": 300,
    }
    base.update(values)
    return base


@pytest.mark.parametrize(
    "values, message",
    [
        ({"state": "moved"}, "state=moved needs target_node"),
        ({"state": "unmigrated", "target_node": "n2"}, "target_node cannot be used with state=unmigrated"),
        ({"target_node": " "}, "target_node must not be empty"),
        ({"wait_timeout": -1}, "wait_timeout must be a number of seconds from 1 to 604800 (7 days), not -1"),
    ],
)
def test_bad_input_is_refused_before_connecting(values, message):
    with pytest.raises(ModuleFailure) as failure:
        module.check_input(params(**values))
    assert message in failure.value.msg


# (vm fields, task parameters) -> (changed, target, lastnode, migrates)
CASES = [
    # migrated, to a named node
    ({}, {"target_node": "n2"}, (True, "n2", "n1", True)),
    ({}, {"target_node": "n1"}, (False, "n1", "", False)),  # already there
    ({"node": "n2", "lastnode": "n1"}, {"target_node": "n2"}, (False, "n2", "n1", False)),
    ({"node": "n2", "lastnode": "n1"}, {"target_node": "n1"}, (True, "n1", "", True)),  # back home ends the stay
    ({"node": "n2", "lastnode": "n1"}, {"target_node": "n4"}, None),  # n4 is full: refused
    (
        {"state": "stop"},
        {"target_node": "n3"},
        (True, "n3", "n1", False),
    ),  # not running: re-homed, even to a flushed node
    # migrated, the selector chooses
    ({}, {}, (True, "n2", "n1", True)),
    ({"node": "n2", "lastnode": "n1"}, {}, (False, "n2", "n1", False)),  # already migrated away: documented as ok
    # moved
    ({}, {"state": "moved", "target_node": "n2"}, (True, "n2", "", True)),
    (
        {"node": "n2", "lastnode": "n1"},
        {"state": "moved", "target_node": "n2"},
        (True, "n2", "", False),
    ),  # stays, new home
    ({"node": "n2"}, {"state": "moved", "target_node": "n2"}, (False, "n2", "", False)),
    # unmigrated
    ({}, {"state": "unmigrated"}, (False, "n1", "", False)),  # home already
    ({"node": "n2", "lastnode": "n1"}, {"state": "unmigrated"}, (True, "n1", "", True)),
]


@pytest.mark.parametrize("vm_fields, values, expected", CASES)
def test_plan(nodes, vm_fields, values, expected):
    vm = make_vm(**vm_fields)
    p = params(**values)
    if expected is None:
        with pytest.raises(ModuleFailure):
            module.make_plan(vm, p, nodes, None)
        return
    plan = module.make_plan(vm, p, nodes, None)
    if plan is None:
        changed, target, lastnode, migrates = False, vm.node, vm.lastnode, False
    else:
        differences = module.plan_differences(vm, plan)
        changed, target, lastnode, migrates = differences.changed, plan.target, plan.lastnode, plan.migrates
        assert differences.diff() == {
            "before": {"node": vm.node, "lastnode": vm.lastnode},
            "after": {"node": plan.target, "lastnode": plan.lastnode},
        }
    assert (changed, target, lastnode, migrates) == expected


@pytest.mark.parametrize(
    "vm_fields, values, message",
    [
        ({}, {"target_node": "n3"}, "cannot migrate VM web1 to n3: domain state is flushed, not ready"),
        ({}, {"target_node": "n4"}, "cannot migrate VM web1 to n4: needs 1024 MiB, has 384 MiB headroom"),
        (
            {"meta": {"node_limit": '["n1", "n4"]'}},
            {"target_node": "n2"},
            "target node n2 is not in the node_limit of VM web1 (n1, n4)",
        ),
        ({"meta": {"node_limit": '["n1", "n4"]'}}, {}, "no node can take VM web1"),
        ({"state": "restart"}, {"target_node": "n2"}, "VM web1 is in state restart; retry when it settles"),
        (
            {"migration": {"source": "n1", "target": "n4", "step": "prepared", "kind": "migrate"}},
            {"target_node": "n2"},
            "a migration of VM web1 from n1 to n4 is in flight",
        ),
        (
            {"migration_error": "/pvc/domains/u/migration: '42' is not valid; expected a JSON object"},
            {"target_node": "n2"},
            "VM web1 has a migration record that is not valid (/pvc/domains/u/migration: '42' is not valid; expected a JSON "
            "object); no daemon acts on it, and nothing else moves the VM until it is cleared (pvc.cluster.vm_migrate with "
            "state=cleared)",
        ),
        (
            {"xml_error": "/pvc/domains/u/xml: '' is not valid; expected a libvirt domain XML document"},
            {"target_node": "n2"},
            "VM web1 is neither started nor migrated: its domain XML is not valid",
        ),
    ],
)
def test_refusals_say_why(nodes, vm_fields, values, message):
    with pytest.raises(ModuleFailure) as failure:
        module.make_plan(make_vm(**vm_fields), params(**values), nodes, None)
    assert message in failure.value.msg


@pytest.mark.parametrize(
    "record, values, matches",
    [
        ({"kind": "migrate", "target": "n2"}, {"target_node": "n2"}, True),
        ({"kind": "migrate", "target": "n2"}, {}, True),
        ({"kind": "migrate", "target": "n2"}, {"target_node": "n3"}, False),
        ({"kind": "unmigrate", "target": "n1"}, {"state": "unmigrated"}, True),
        ({"kind": "move", "target": "n2"}, {"target_node": "n2"}, False),
    ],
)
def test_a_rerun_during_the_same_migration_matches_it(record, values, matches):
    assert module.in_flight_matches(make_vm(migration=record), params(**values)) is matches


def test_the_plan_reports_the_target_memory_before_and_after(nodes):
    plan = module.make_plan(make_vm(), params(target_node="n2"), nodes, None)
    described = module.describe_plan(plan)
    before = {"total": 16384, "reserve": 0, "provisioned": 1024, "reserved": 0, "headroom": 15360}
    assert described["target_memory_before"] == before
    assert described["target_memory_after"] == dict(before, provisioned=2048, headroom=14336)
    assert described["message"] == "VM web1 migrates from n1 to n2"


def test_no_memory_figures_when_nothing_moves(nodes):
    plan = module.make_plan(make_vm(), params(target_node="n1"), nodes, None)
    assert "target_memory_before" not in module.describe_plan(plan)


VM = "6695eb01-f6a4-8304-79aa-97f2502e193f"


@pytest.mark.parametrize(
    "target_runs, source_runs, source_daemon, expected",
    [
        ([VM], [], "run", True),
        ([VM], [VM], "run", False),  # the source has not published since the VM left
        ([], [], "run", False),  # the target has not published since the VM arrived
        ([VM], [VM], "dead", True),  # a dead source's list is stale: not asked
    ],
)
def test_runs_only_on(target_runs, source_runs, source_daemon, expected):
    store = FakeStore(
        {
            "/pvc/nodes/n2/runningdomains": json.dumps(target_runs),
            "/pvc/nodes/n1/runningdomains": json.dumps(source_runs),
            "/pvc/nodes/n1/daemon_state": source_daemon,
        }
    )
    assert module.runs_only_on(store, VM, "n2", "n1") is expected


def test_a_garbage_list_of_running_domains_reads_as_none():
    store = FakeStore({"/pvc/nodes/n2/runningdomains": json.dumps(VM), "/pvc/nodes/n1/daemon_state": "dead"})
    assert module.runs_only_on(store, VM, "n2", "n1") is False  # a string holds the UUID, but is no list


# ---- state=cleared -------------------------------------------------------------------------------


class ClearingStore(FakeStore):
    """FakeStore that lists nodes, reads many keys and records commits."""

    def __init__(self, values, nodes):
        super().__init__(values)
        self.nodes = nodes
        self.commits = []

    def list_children(self, path, missing_ok=False):
        return list(self.nodes) if path == self.schema.nodes() else []

    def commit(self, values, expect_versions=None, delete=()):
        self.commits.append((values, expect_versions, list(delete)))
        return {}


def clear(vm, store, check_mode=False):
    from types import SimpleNamespace

    session = SimpleNamespace(store=store, schema=store.schema)
    return module.clear_record(SimpleNamespace(check_mode=check_mode, _diff=True), session, vm)


UUID = "6695eb01-f6a4-8304-79aa-97f2502e193f"
BAD = f"/pvc/domains/{UUID}/runtime/migration: '42' is not valid; expected a JSON object"


@pytest.mark.parametrize("check_mode", [False, True])
def test_cleared_removes_an_invalid_record_and_the_vms_reservations(check_mode):
    store = ClearingStore({f"/pvc/nodes/n2/reservations/{UUID}": "1e999"}, ["n1", "n2"])
    vm = make_vm(migration_error=BAD)
    result = clear(vm, store, check_mode)
    assert result["changed"] and result["cleared"] == {"migration_error": BAD, "reservations": ["n2"]}
    assert result["diff"] == {
        "before": {"migration": BAD, "reservations": ["n2"]},
        "after": {"migration": None, "reservations": []},
    }
    expected = [
        (
            {},
            {f"/pvc/domains/{UUID}/runtime/migration": 0},
            [f"/pvc/domains/{UUID}/runtime/migration", f"/pvc/nodes/n2/reservations/{UUID}"],
        )
    ]
    assert store.commits == ([] if check_mode else expected)


@pytest.mark.parametrize("check_mode", [False, True])
def test_cleared_keeps_the_reservation_on_the_vms_own_node(check_mode):
    """The reservation on the VM's own node covers it there until that node's keepalive counts it in
    memprov: deleting it would leave the node's figures short of the VM."""
    store = ClearingStore(
        {f"/pvc/nodes/n1/reservations/{UUID}": "1024", f"/pvc/nodes/n2/reservations/{UUID}": "1024"}, ["n1", "n2", "n3"]
    )
    vm = make_vm(node="n1", migration_error=BAD)
    result = clear(vm, store, check_mode)
    assert result["changed"] and result["cleared"]["reservations"] == ["n2"]
    assert result["diff"]["before"]["reservations"] == ["n2"]
    expected = [
        (
            {},
            {f"/pvc/domains/{UUID}/runtime/migration": 0},
            [f"/pvc/domains/{UUID}/runtime/migration", f"/pvc/nodes/n2/reservations/{UUID}"],
        )
    ]
    assert store.commits == ([] if check_mode else expected)


def test_cleared_takes_no_require_n1():
    with pytest.raises(ModuleFailure, match="require_n1 cannot be used with state=cleared"):
        module.check_input(params(state="cleared", require_n1=True))


def test_cleared_never_removes_a_valid_record():
    store = ClearingStore({}, ["n1", "n2"])
    with pytest.raises(ModuleFailure, match="is valid: its migration from n1 to n2 is in flight"):
        clear(make_vm(migration={}), store)
    assert store.commits == []


def test_cleared_without_a_record_changes_nothing():
    store = ClearingStore({}, ["n1"])
    result = clear(make_vm(), store)
    assert not result["changed"] and result["message"] == "VM web1 has no migration record" and store.commits == []


def test_cleared_takes_no_target_node():
    with pytest.raises(ModuleFailure, match="target_node cannot be used with state=cleared"):
        module.check_input(params(state="cleared", target_node="n2"))
