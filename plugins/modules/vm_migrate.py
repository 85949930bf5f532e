#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: pvc.cluster developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: vm_migrate
short_description: Migrate, move or return a pvc.cluster VM
version_added: 0.1.0
description:
  - Places a VM on another node. The module records the request in ZooKeeper (target node, a memory
    reservation on the target and the migration record); the node daemons of the source and the target
    then perform the migration in lockstep (see the collection's C(docs/migration-protocol.md)).
  - A running VM is migrated (live, or by shutdown and restart, per its C(migration_method)); a VM that
    is not running is only re-homed (its node changes, nothing moves).
  - With O(wait=true) the module waits until the migration has ended and returns its audit record; an
    aborted migration fails the task with the reason recorded by the daemons.
author:
  - pvc.cluster developers (!UNKNOWN)
options:
  name:
    description: The VM's name or UUID (not empty).
    type: str
    required: true
  state:
    description:
      - V(migrated) moves the VM temporarily; it remembers its home node (C(lastnode)) so that
        V(unmigrated) (or making its home node ready again) brings it back.
        Without O(target_node), a VM that is already migrated away (it has a home node to return to)
        is left where it is (not changed); otherwise its O(pvc.cluster.vm#module:node_selector) chooses.
      - V(moved) moves the VM permanently (it forgets its home node). Needs O(target_node), so that
        running the task again finds the VM there and changes nothing.
      - V(unmigrated) returns a migrated VM to its home node; a VM that is home is not changed.
      - V(cleared) removes the VM's migration record when it is not valid (garbage written to ZooKeeper,
        shown by M(pvc.cluster.vm_info) as C(migration_error)), and the memory reservations made for the VM on
        other nodes than its own (the one on its own node covers it there until that node counts it).
        No daemon acts on such a record, and nothing moves the VM (nor a flush of its node) until it is
        cleared; the daemons then reconcile the VM from where libvirt runs it. A valid record (a migration in
        flight) is never cleared; a VM without a record is not changed.
    type: str
    choices: [migrated, moved, unmigrated, cleared]
    default: migrated
  target_node:
    description:
      - The node to migrate or move the VM to. It must be a node of the cluster, inside the VM's
        C(node_limit), ready (daemon C(run), domain state C(ready), its daemon's connection to libvirt C(ok)),
        and have the memory headroom for
        the VM (memory total - reserve - provisioned - reservations).
      - A VM already on O(target_node) is not changed.
      - Not used with O(state=unmigrated) or O(state=cleared).
    type: str
  require_n1:
    description:
      - For a running VM that would migrate (O(state=migrated), O(state=moved) or O(state=unmigrated)),
        refuse the request when, with the VM running on the target instead of its node, the cluster could
        no longer restart every running VM after the loss of any one node (memory only); the message names
        each node whose loss could not be absorbed and by how much. Nothing is written; in check mode the
        task fails too. A VM that is not running (only re-homed) is not checked.
      - When not given, the cluster setting C(/config/require_n1) decides (C(true)/C(false); false when unset).
      - Not used with O(state=cleared).
    type: bool
  force_live:
    description:
      - Migrate live only for this request, whatever the VM's C(migration_method); if the live
        migration fails it is aborted and the VM keeps running on its node.
    type: bool
    default: false
  wait:
    description:
      - Wait until the migration has finished (or aborted), then until the daemons report the VM running on
        the target only (they publish their running VMs with every keepalive; a slow report is a warning).
        A re-homed VM that is not running needs no wait.
      - Without a wait the task returns once the request is recorded; the daemons carry it out.
    type: bool
    default: true
  wait_timeout:
    description:
      - Seconds to wait when O(wait=true). When they pass the task fails; the daemons still finish or
        abort the migration.
      - From V(1) to V(604800) (7 days).
    type: int
    default: 300
extends_documentation_fragment:
  - pvc.cluster._zk
  - pvc.cluster._attributes
  - pvc.cluster._attributes.actiongroup_all
attributes:
  check_mode:
    support: full
    details:
      - Returns the planned target and its memory before and after the migration.
  diff_mode:
    support: full
    details:
      - The diff shows the VM's node and home node (C(lastnode)); with O(state=cleared), the invalid record and
        the reservations that go.
  idempotent:
    support: full
    details:
      - A re-run while the same migration is still in flight reports no change and waits for it.
seealso:
  - module: pvc.cluster.node
  - module: pvc.cluster.vm_info
"""

EXAMPLES = r"""
- name: Migrate web1 to hv2 for maintenance of its node, and wait for it
  pvc.cluster.vm_migrate:
    zk_hosts: zk1.example.net:2181
    name: web1
    target_node: hv2

- name: Migrate db1 wherever its node selector says, live only
  pvc.cluster.vm_migrate:
    zk_hosts: zk1.example.net:2181
    name: db1
    force_live: true

- name: Show where db1 would go, without doing it
  pvc.cluster.vm_migrate:
    zk_hosts: zk1.example.net:2181
    name: db1
  check_mode: true
  register: planned

- name: Make hv3 the permanent home of web1
  pvc.cluster.vm_migrate:
    zk_hosts: zk1.example.net:2181
    name: web1
    state: moved
    target_node: hv3

- name: Bring web1 back home
  pvc.cluster.vm_migrate:
    zk_hosts: zk1.example.net:2181
    name: web1
    state: unmigrated

- name: Remove the invalid migration record that vm_info reports for mail
  pvc.cluster.vm_migrate:
    zk_hosts: zk1.example.net:2181
    name: mail
    state: cleared
"""

RETURN = r"""
name:
  description: The VM's name.
  returned: always
  type: str
  sample: web1
uuid:
  description: The VM's UUID.
  returned: always
  type: str
  sample: 6695eb01-f6a4-8304-79aa-97f2502e193f
source:
  description: The node the VM was on.
  returned: always
  type: str
  sample: hv1
target:
  description: The node the VM is (or would be) on after the request.
  returned: always
  type: str
  sample: hv2
lastnode:
  description: The VM's home node after the request (empty when the VM is home or was moved).
  returned: always
  type: str
  sample: hv1
migrates:
  description: Whether a running VM moves (true) or the request only re-homes a VM that is not running (false).
  returned: always
  type: bool
  sample: true
message:
  description: What the request does, in words.
  returned: always
  type: str
  sample: VM web1 migrates from hv1 to hv2
target_memory_before:
  description: The target node's memory accounting (MiB) before the request.
  returned: when the VM changes node
  type: dict
  sample: {"total": 65536, "reserve": 1024, "provisioned": 8192, "reserved": 0, "headroom": 56320}
target_memory_after:
  description:
    - The target node's memory accounting (MiB) once the VM is there (its memory counted in C(provisioned)).
  returned: when the VM changes node
  type: dict
  sample: {"total": 65536, "reserve": 1024, "provisioned": 9216, "reserved": 0, "headroom": 55296}
migration:
  description: The migration record as requested (see C(docs/migration-protocol.md)).
  returned: when a running VM was asked to move
  type: dict
cleared:
  description: What O(state=cleared) removed (or would remove, in check mode).
  returned: when O(state=cleared) and the VM has an invalid migration record
  type: dict
  contains:
    migration_error:
      description: Why the record was not valid.
      type: str
    reservations:
      description: The nodes (other than the VM's own) whose memory reservation for the VM was removed.
      type: list
      elements: str
  sample: {"migration_error": "/pvc/domains/6695eb01-f6a4-8304-79aa-97f2502e193f/migration: '42' is not valid; expected a
           JSON object", "reservations": []}
record:
  description:
    - The audit record of the finished migration (C(result) V(done) or V(aborted), C(method_used),
      C(fallback_reason), C(reason), C(steps) with their times, C(duration_s)).
  returned: when O(wait=true) and a migration ran
  type: dict
  sample: {"id": "6f1c2a9b0d3e", "result": "done", "method_used": "live", "source": "hv1", "target": "hv2",
           "duration_s": 2.4}
"""

import socket
import time

from ansible_collections.pvc.cluster.plugins.module_utils import _schema as S
from ansible_collections.pvc.cluster.plugins.module_utils._cluster import (
    find_vm,
    node_names,
    read_history,
    read_node_state,
    read_node_views,
    read_running,
    read_vm,
    watch_until,
)
from ansible_collections.pvc.cluster.plugins.module_utils._module import (
    Differences,
    ModuleFailure,
    build_module,
    check_before_connecting,
    check_names,
    check_wait_timeout,
    exit_from_session,
)
from ansible_collections.pvc.cluster.plugins.module_utils._report import (
    read_cluster,
    read_require_n1,
    request_n1_check,
    request_n1_refusal,
)
from ansible_collections.pvc.cluster.plugins.module_utils._requests import RequestError, plan_request, submit_request
from ansible_collections.pvc.cluster.plugins.module_utils._store import Attempts, ConflictError

# After ``done``, how long to wait at most for the target to publish the VM among its running
# domains (every keepalive); the migration is over, so a slow publication is a warning.
PUBLISH_WAIT_S = 60

KIND = {"migrated": "migrate", "moved": "move", "unmigrated": "unmigrate"}
CLEARED = "cleared"

ARGUMENT_SPEC = dict(
    name=dict(type="str", required=True),
    state=dict(type="str", default="migrated", choices=list(KIND) + [CLEARED]),
    target_node=dict(type="str"),
    force_live=dict(type="bool", default=False),
    wait=dict(type="bool", default=True),
    wait_timeout=dict(type="int", default=300),
    require_n1=dict(type="bool"),
)


# ---- pure logic (unit-tested) ------------------------------------------------------------------


def check_input(params: dict) -> None:
    check_wait_timeout(params)
    check_names(params, ("name", "target_node"))
    if params["state"] == "moved" and not params.get("target_node"):
        raise ModuleFailure(
            "state=moved needs target_node: a move chosen by the selector would move the VM again on every run"
        )
    if params["state"] == "unmigrated" and params.get("target_node"):
        raise ModuleFailure("target_node cannot be used with state=unmigrated: the VM returns to its home node")
    if params["state"] == CLEARED and params.get("target_node"):
        raise ModuleFailure(
            "target_node cannot be used with state=cleared: it only removes an invalid migration record"
        )
    if params["state"] == CLEARED and params.get("require_n1") is not None:
        raise ModuleFailure("require_n1 cannot be used with state=cleared: it only removes an invalid migration record")


def in_flight_matches(vm, params: dict) -> bool:
    """Whether the migration in flight is what this task asks for (a re-run: not changed, wait for it)."""
    record = vm.migration
    if record is None or record.kind != KIND.get(params["state"]):
        return False
    target = params.get("target_node")
    return target is None or record.target == target


def memory_figures(view, extra_mib: int = 0) -> dict:
    """The accounting placement uses for a node (MiB), with ``extra_mib`` more provisioned."""
    return {
        "total": view.memtotal,
        "reserve": view.memreserve,
        "provisioned": view.memprov + extra_mib,
        "reserved": view.reserved,
        "headroom": view.headroom - extra_mib,
    }


def describe_plan(plan) -> dict:
    result = {
        "name": plan.name,
        "uuid": plan.uuid,
        "source": plan.source,
        "target": plan.target,
        "lastnode": plan.lastnode,
        "migrates": plan.migrates,
        "message": plan.message,
    }
    if plan.changed and plan.target != plan.source and plan.target_before is not None:
        result["target_memory_before"] = memory_figures(plan.target_before)
        result["target_memory_after"] = memory_figures(plan.target_before, plan.memory_mib)
    return result


def stays(vm) -> dict:
    """What a request that leaves VM ``vm`` where it is returns about it (describe_plan's keys
    but the message)."""
    return {
        "name": vm.name,
        "uuid": vm.uuid,
        "source": vm.node,
        "target": vm.node,
        "lastnode": vm.lastnode,
        "migrates": False,
    }


def plan_differences(vm, plan) -> Differences:
    differences = Differences()
    differences.add("node", vm.node, plan.target)
    differences.add("lastnode", vm.lastnode, plan.lastnode)
    return differences


def make_plan(vm, params: dict, nodes: dict, default_selector):
    """The request this task makes, or None when nothing is to be done. Raises ModuleFailure."""
    kind = KIND[params["state"]]
    target = params.get("target_node")
    if kind == "migrate" and target is None and vm.lastnode and not vm.migration:
        return None  # already migrated away: documented as ok
    try:
        return plan_request(
            vm, kind, nodes, target=target, force_live=params["force_live"], default_selector=default_selector
        )
    except RequestError as exc:
        raise ModuleFailure(str(exc)) from None


def n1_verdict(snapshot, plan):
    """The n-1 check of the cluster (``snapshot``, from read_cluster) once ``plan`` has moved its
    running VM (_report.request_n1_check, shared with the daemon's ready)."""
    return request_n1_check(snapshot, plan)


def n1_failure(check, plan) -> ModuleFailure:
    """The refusal of ``plan`` under require_n1 (the same message as the other modules')."""
    return ModuleFailure(
        request_n1_refusal(check, plan),
        changed=False,
        require_n1=True,
        survives_node_failure=check.to_dict(),
    )


# ---- cluster I/O -------------------------------------------------------------------------------


def runs_only_on(store, uuid: str, target: str, source: str) -> bool:
    """Whether the target publishes the VM among its running domains and the source (if its daemon
    runs, so that its list is current) no longer does."""
    if uuid not in read_running(store, target):
        return False
    source_state = read_node_state(store, source)
    if source_state is None or source_state.daemon_state != "run":
        return True
    return uuid not in read_running(store, source)


def wait_for_record(session, vm, record_id: str, timeout_s: int) -> dict:
    """Wait for the migration to end; return its audit record, or raise ModuleFailure.

    After ``done``, also wait (within the same timeout, at most PUBLISH_WAIT_S) until the daemons
    publish the VM running on the target only, so that a read right after the task sees it there.
    """
    store, schema = session.store, session.schema
    path = schema.domain_migration(vm.uuid)
    deadline = time.monotonic() + timeout_s

    def gone():
        return True if store.find(path) is None else None

    if watch_until(store, [path], gone, timeout_s) is None:
        current = read_vm(store, vm.uuid)
        if current is not None and current.migration is not None:
            raise ModuleFailure(
                f"the migration of VM {vm.name} to {current.migration.target} is still in flight after "
                f"{timeout_s} s (step {current.migration.step}); the daemons still finish or abort it",
                migration=current.migration.to_dict(),
            )
        raise ModuleFailure(
            f"the migration of VM {vm.name} did not end within {timeout_s} s"
            + (f"; its record is not valid: {current.migration_error}" if current else "")
        )
    for entry in reversed(read_history(store, vm.uuid, last=S.HISTORY_KEEP)):
        if entry.get("id") == record_id:
            if entry.get("result") != "done":
                raise ModuleFailure(
                    f"the migration of VM {vm.name} from {entry.get('source')} to {entry.get('target')} "
                    f"was aborted: {entry.get('reason') or 'no reason recorded'}",
                    record=entry,
                )
            if not watch_until(
                store,
                [
                    schema.node_key(entry["target"], S.NODE_RUNNINGDOMAINS),
                    schema.node_key(entry["source"], S.NODE_RUNNINGDOMAINS),
                ],
                lambda: runs_only_on(store, vm.uuid, entry["target"], entry["source"]),  # noqa: B023 (called at once)
                min(max(deadline - time.monotonic(), 0.1), PUBLISH_WAIT_S),
            ):
                session.module.warn(
                    f"the migration of VM {vm.name} is done, but the daemons do not publish it running on "
                    f"{entry['target']} only yet (they publish their running domains with every keepalive)"
                )
            return entry
    raise ModuleFailure(f"the migration of VM {vm.name} ended but its audit record {record_id} was not found")


def clear_record(module, session, vm) -> dict:
    """state=cleared: remove the VM's invalid migration record and its reservations, in one
    transaction that checks the record is still the one read (a valid record written meanwhile is
    never removed). Raises ConflictError when it changed."""
    store, schema = session.store, session.schema
    result = stays(vm)
    if vm.migration is not None:
        raise ModuleFailure(
            f"the migration record of VM {vm.name} is valid: its migration from {vm.migration.source} to "
            f"{vm.migration.target} is in flight (step {vm.migration.step}); the daemons finish or abort "
            "it (only a record that is not valid can be cleared)"
        )
    if not vm.migration_error:
        return dict(result, changed=False, message=f"VM {vm.name} has no migration record")
    # The reservation on the VM's own node stays: it covers the VM there until that node's keepalive
    # counts the VM in memprov (and folds it), so deleting it would understate the node's use.
    nodes = [node for node in node_names(store) if node != vm.node]
    found = store.get_many([schema.node_reservation(node, vm.uuid) for node in nodes])
    reservations = [node for node in nodes if found[schema.node_reservation(node, vm.uuid)] is not None]
    result.update(
        changed=True,
        cleared={"migration_error": vm.migration_error, "reservations": reservations},
        message=f"the invalid migration record of VM {vm.name} is removed"
        + (f", and its reservations on {', '.join(reservations)}" if reservations else ""),
    )
    if module._diff:
        result["diff"] = {
            "before": {"migration": vm.migration_error, "reservations": reservations},
            "after": {"migration": None, "reservations": []},
        }
    if not module.check_mode:
        path = schema.domain_migration(vm.uuid)
        store.commit(
            {},
            expect_versions={path: vm.migration_version},
            delete=[path] + [schema.node_reservation(node, vm.uuid) for node in reservations],
        )
    return result


def run(module, session) -> dict:
    params = module.params
    store, schema = session.store, session.schema
    uuid = find_vm(store, params["name"])
    if uuid is None:
        raise ModuleFailure(f"VM {params['name']} does not exist (give its name or UUID)")
    # a task reads and plans once more after a conflict (the VM or a target's reservations changed), then fails
    budget = Attempts(2)
    while True:
        vm = read_vm(store, uuid)
        nodes = read_node_views(store)
        default_selector = store.find_text(schema.default_selector())
        if vm is None:
            raise ModuleFailure(f"VM {params['name']} was removed while this task ran")
        target = params.get("target_node")
        if target is not None and target not in nodes:
            raise ModuleFailure(
                f"target node {target!r} is not a node of this cluster "
                f"(nodes: {', '.join(sorted(nodes)) or 'none registered'})"
            )

        if params["state"] == CLEARED:
            try:
                return clear_record(module, session, vm)
            except ConflictError:
                if not budget.again():
                    raise
                continue  # the record changed meanwhile: read it once more
        if vm.migration and in_flight_matches(vm, params):
            result = {
                "changed": False,
                "name": vm.name,
                "uuid": vm.uuid,
                "source": vm.migration.source,
                "target": vm.migration.target,
                "lastnode": vm.lastnode,
                "migrates": True,
                "message": f"the migration of VM {vm.name} to {vm.migration.target} is already in flight",
                "migration": vm.migration.to_dict(),
            }
            if params["wait"] and not module.check_mode:
                result["record"] = wait_for_record(session, vm, vm.migration.id, params["wait_timeout"])
            return result

        plan = make_plan(vm, params, nodes, default_selector)
        if plan is None:
            return dict(
                stays(vm),
                changed=False,
                message=f"VM {vm.name} is already migrated away from its home node {vm.lastnode}",
            )
        differences = plan_differences(vm, plan)
        policy = params.get("require_n1")
        if plan.migrates and (read_require_n1(store, []) if policy is None else policy):
            check = n1_verdict(read_cluster(store), plan)
            if not check.ok:
                raise n1_failure(check, plan)
        result = {"changed": differences.changed}
        result.update(describe_plan(plan))
        if module._diff:
            result["diff"] = differences.diff()
        if not differences.changed or module.check_mode:
            return result
        try:
            record = submit_request(store, plan, vm, requester=f"pvc.cluster.vm_migrate on {socket.gethostname()}")
            session.wrote(f"the request to move VM {vm.name} to {plan.target}")
        except RequestError as exc:  # the target's fit is checked again, atomically with the request
            raise ModuleFailure(str(exc)) from None
        except ConflictError:
            if not budget.again():
                raise
            continue  # the VM or the target's reservations changed meanwhile: read and plan once more
        if record is not None:
            result["migration"] = record.to_dict()
            if params["wait"]:
                try:
                    result["record"] = wait_for_record(session, vm, record.id, params["wait_timeout"])
                except ModuleFailure as exc:
                    exc.result.setdefault("changed", True)
                    raise
        return result


def main():
    module = build_module(ARGUMENT_SPEC)
    check_before_connecting(module, check_input)
    exit_from_session(module, run)


if __name__ == "__main__":
    main()
