#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: pvc.cluster developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: node
short_description: Flush a pvc.cluster node of its VMs, or make it ready again
version_added: 0.1.0
description:
  - Sets the domain state of a hypervisor node. The node's daemon does the work.
  - V(flushed) writes the domain state C(flush). The daemon migrates every VM that runs there to other
    nodes (each remembers the node as its home), shuts down the VMs that fit nowhere (marking them for
    autostart), then writes C(flushed).
  - V(ready) writes C(unflush). The daemon brings back the VMs whose home is the node, starts its
    autostart VMs, then writes C(ready). New nodes start C(flushed).
  - A node already in the requested state, or already on its way there (C(flush) or C(unflush)), is not
    changed; with O(wait=true) the module then waits for the daemon to finish.
  - Under the n-1 policy (O(require_n1)) the daemon checks its flush plan again before each wave of
    migrations. A flush that would now break n-1 (the cluster changed since it was asked) stops; the node
    stays C(flush), the VMs moved so far stay where they went, and the node's C(flush_halted) key holds
    the verdict (the node whose loss could not be absorbed and by how much). With O(wait=true) the task
    then fails with that verdict (RV(flush_halted)). V(flushed) on a halted flush asks for it again.
  - V(fenced) with O(confirm_down=true) is the operator's confirmation that a dead node is powered off, for a
    node whose fence failed (daemon state C(fence-failed)), or that is C(dead) or C(stop). It writes daemon
    state C(fenced) and domain state C(flushed), and the node daemons then start its VMs on other nodes
    (docs/high-availability.md). Its VMs must not be running, or a wrong confirmation runs a VM twice.
author:
  - pvc.cluster developers (!UNKNOWN)
options:
  name:
    description: The node's name (not empty).
    type: str
    required: true
  state:
    description: The domain state the node should reach (V(ready), V(flushed)), or V(fenced) (see above).
    type: str
    choices: [ready, flushed, fenced]
    default: ready
  confirm_down:
    description:
      - Required as V(true) with O(state=fenced). It says that the node is powered off (checked by a person), so
        its VMs may start elsewhere. Not used with the other states.
    type: bool
    default: false
  force:
    description:
      - Flush the node even when it is the last ready node of the cluster (no other node has daemon state
        C(run) and domain state C(ready)). Its VMs have nowhere to go then, so the flush shuts every one of them down.
      - Without it, flushing the last ready node fails before anything is written, in check mode too.
      - Not used with O(state=ready).
    type: bool
    default: false
  require_n1:
    description:
      - Refuse a flush whose plan would leave the cluster unable to restart every running VM after the
        loss of any one more node (the n-1 check of RV(survives_node_failure)); the message names each node
        whose loss could not be absorbed and by how much. Nothing is written, in check mode the task fails too.
      - When not given, the cluster setting C(/config/require_n1) decides (C(true)/C(false); false when unset).
      - Not used with O(state=ready).
    type: bool
  wait:
    description:
      - Wait until the daemon has finished (domain state C(flushed) or C(ready)), then until the daemons report
        each VM that moved running on its new node only (they publish their running VMs with every
        keepalive; a slow report is a warning).
      - The daemon must be running (daemon state C(run)) for anything to happen; with O(wait=true) a
        request to a node whose daemon is not running fails before anything is written, in check mode too.
    type: bool
    default: true
  wait_timeout:
    description:
      - Seconds to wait when O(wait=true). When they pass the task fails; the daemon carries on.
      - From V(1) to V(604800) (7 days).
    type: int
    default: 600
extends_documentation_fragment:
  - pvc.cluster._zk
  - pvc.cluster._attributes
  - pvc.cluster._attributes.actiongroup_all
attributes:
  check_mode:
    support: full
    details:
      - For V(flushed), returns the drain plan (each VM with its target node, or shutdown when it fits
        nowhere) and whether the other nodes could still take every VM if one more node failed.
  diff_mode:
    support: full
    details:
      - The diff shows the domain state written (C(flush) or C(unflush)), or for O(state=fenced) the daemon state
        (C(fenced)); for a halted flush asked again, also the verdict deleted (C(flush_halted)).
  idempotent:
    support: full
seealso:
  - module: pvc.cluster.node_info
  - module: pvc.cluster.vm_migrate
"""

EXAMPLES = r"""
# The ZooKeeper options are set once per play with module_defaults (group/pvc.cluster.all), or
# given to each task as below.
- name: Plan the flush of hv2 (check mode writes nothing)
  pvc.cluster.node:
    zk_hosts: zk1.example.net:2181
    name: hv2
    state: flushed
  check_mode: true
  register: drain

- name: Stop here unless every VM has a place and the cluster stays n-1 safe
  ansible.builtin.assert:
    that:
      - drain.flush_plan | selectattr('target', 'none') | list | length == 0
      - drain.survives_node_failure.ok
    fail_msg: "{{ drain.survives_node_failure.message }}"

- name: Flush hv2 and wait until its VMs run elsewhere
  pvc.cluster.node:
    zk_hosts: zk1.example.net:2181
    name: hv2
    state: flushed
    wait_timeout: 1800

- name: Make hv2 ready again (its VMs come back)
  pvc.cluster.node:
    zk_hosts: zk1.example.net:2181
    name: hv2
    state: ready

# hv3 died and its BMC did not answer (daemon state fence-failed): nothing of it was started
# elsewhere. Once someone has checked that it is powered off:
- name: Confirm that hv3 is down, so that its VMs start on other nodes
  pvc.cluster.node:
    zk_hosts: zk1.example.net:2181
    name: hv3
    state: fenced
    confirm_down: true
"""

RETURN = r"""
name:
  description: The node's name.
  returned: always
  type: str
  sample: hv2
domain_state:
  description: The node's domain state after the task (after the wait, C(flushed) or C(ready); C(flushed) after
    O(state=fenced)).
  returned: always
  type: str
  sample: flushed
daemon_state:
  description: The node's daemon state (C(init), C(run), C(shutdown), C(stop), C(dead), C(fencing), C(fenced),
    C(fence-failed)).
  returned: always
  type: str
  sample: run
flush_plan:
  description:
    - For O(state=flushed) when the node is not flushed yet, where each VM running there would go, in the
      order the daemon moves them (largest first). C(target) is null for a VM that fits nowhere; the flush
      shuts it down and marks it for autostart.
    - The daemon plans again when it starts, from the cluster as it is then.
  returned: when O(state=flushed)
  type: list
  elements: dict
  sample: [{"name": "db1", "uuid": "6695eb01-f6a4-8304-79aa-97f2502e193f", "memory_mib": 4096, "target": "hv1",
            "reason": "selector mem (20480 MiB headroom left)"}]
survives_node_failure:
  description:
    - For O(state=flushed), whether the nodes left ready after the flush could still hold every running VM
      if one more node failed (memory only; node limits are not considered).
    - C(shortfalls) maps each node in C(failures) to the MiB missing for the first of its VMs that fits nowhere.
  returned: when O(state=flushed)
  type: dict
  sample: {"ok": true, "message": "the cluster survives the failure of any one of 2 ready node(s)", "failures": {},
           "shortfalls": {}}
require_n1:
  description: For O(state=flushed), whether the n-1 policy applied (O(require_n1), else the cluster setting).
  returned: when O(state=flushed)
  type: bool
  sample: true
flush_halted:
  description: The daemon's verdict when it halted the flush under the n-1 policy (see above); the task fails.
  returned: when the daemon halted the flush while the task waited
  type: str
  sample: "flush of hv2 halted before moving 3 more VM(s): once done, the cluster would not survive the failure
    of hv1: ... short by 2048 MiB (require_n1 is set; ...)"
returning_vms:
  description: For O(state=ready), the VMs whose home is this node and that come back to it.
  returned: when O(state=ready)
  type: list
  elements: str
  sample: [db1, web1]
"""

import json
import time

from ansible_collections.pvc.cluster.plugins.module_utils import _records as R
from ansible_collections.pvc.cluster.plugins.module_utils import _schema as S
from ansible_collections.pvc.cluster.plugins.module_utils._cluster import (
    read_node_state,
    read_node_states,
    read_running,
    read_vm_state,
    watch_until,
)
from ansible_collections.pvc.cluster.plugins.module_utils._decode import Invalid
from ansible_collections.pvc.cluster.plugins.module_utils._module import (
    Differences,
    ModuleFailure,
    build_module,
    check_before_connecting,
    check_names,
    check_wait_timeout,
    exit_from_session,
)
from ansible_collections.pvc.cluster.plugins.module_utils._report import n1_policy, n1_refusal, read_cluster
from ansible_collections.pvc.cluster.plugins.module_utils._selector import (
    FailureCheck,
    FlushVM,
    PlannedMove,
    apply_plan,
    plan_flush,
    resolve_selector,
    survives_node_failure,
)

# requested state -> (domain state written, the domain state the daemon ends in)
TRANSITIONS = {"ready": ("unflush", "ready"), "flushed": ("flush", "flushed")}

# After the daemon has finished, how long to wait at most for the nodes to publish where VMs run
# (every keepalive); the work is done, so a slow publication is a warning, not a failure.
PUBLISH_WAIT_S = 60

ARGUMENT_SPEC = dict(
    name=dict(type="str", required=True),
    state=dict(type="str", default="ready", choices=list(TRANSITIONS) + ["fenced"]),
    force=dict(type="bool", default=False),
    require_n1=dict(type="bool"),
    confirm_down=dict(type="bool", default=False),
    wait=dict(type="bool", default=True),
    wait_timeout=dict(type="int", default=600),
)


# ---- pure logic (unit-tested) ------------------------------------------------------------------


def check_input(params: dict) -> None:
    check_wait_timeout(params)
    check_names(params, ("name",))
    if params.get("state") == "fenced" and not params.get("confirm_down"):
        raise ModuleFailure(
            "state=fenced needs confirm_down=true: it tells the cluster that the node is powered off, "
            "and its VMs are then started on other nodes"
        )


# daemon states an operator may confirm as powered off
CONFIRMABLE = ("dead", "fence-failed", "stop")


def plan_fenced(name: str, daemon_state: str) -> Differences:
    """The daemon state written by state=fenced; raises ModuleFailure for a node that may be running."""
    if daemon_state != "fenced" and daemon_state not in CONFIRMABLE:
        raise ModuleFailure(
            f"the daemon of node {name} is {daemon_state}: only a node whose daemon is "
            f"{', '.join(CONFIRMABLE)} can be confirmed down (a running node, or one a peer is "
            "fencing right now, is not)"
        )
    differences = Differences()
    differences.add("daemon_state", daemon_state, "fenced")
    return differences


def confirm_fenced(module, session, name: str, daemon_state: str, domain_state: str) -> dict:
    store, schema = session.store, session.schema
    differences = plan_fenced(name, daemon_state)
    result = {
        "changed": differences.changed,
        "name": name,
        "daemon_state": "fenced",
        "domain_state": "flushed" if differences.changed else domain_state,
    }
    if module._diff:
        result["diff"] = differences.diff()
    if module.check_mode or not differences.changed:
        return result
    path = schema.node_key(name, S.NODE_DAEMON_STATE)
    # its state as the daemons read it: its own combined with its peers' verdicts; the write checks
    # the version of its own (a node whose daemon registers again changes it)
    state = read_node_state(store, name)
    if state is None or state.daemon_state != daemon_state:
        raise ModuleFailure(
            f"the daemon state of node {name} changed meanwhile (now {state.daemon_state if state else None})"
        )
    record = {
        "by": "operator",
        "method": "operator",
        "result": "fenced",
        "started": round(time.time(), 3),
        "finished": round(time.time(), 3),
        "detail": "confirmed powered off by an operator (confirm_down)",
    }
    session.commit(
        {
            path: "fenced",
            schema.node_key(name, S.NODE_DOMAIN_STATE): "flushed",
            schema.node_key(name, S.NODE_FENCE): json.dumps(record),
        },
        expect_versions={path: state.version},
        what=f"daemon state fenced of node {name}",
    )
    return result


def plan_state(current: str, state: str, halted: str | None = None) -> Differences:
    """The domain state to write: unchanged when the node is there or on its way there, except
    a flush that its daemon halted (``halted``: the node's ``flush_halted`` verdict), which is
    asked again (the verdict is deleted with the write)."""
    request, final = TRANSITIONS[state]
    differences = Differences()
    differences.add("domain_state", current, current if current in (request, final) else request)
    if halted is not None and request == "flush" and current == "flush":
        differences.add("flush_halted", halted, None)
    return differences


def read_flush_halted(store, path: str) -> str | None:
    """The verdict of a flush its daemon halted (the node's ``flush_halted``), or None."""
    value = store.find_text(path)
    if not value:
        return None
    try:
        return R.flush_halted(value, path)
    except Invalid as exc:
        return f"(its verdict is not valid: {exc})"


def last_ready_refusal(views, node: str, running: int) -> str | None:
    """Why flushing ``node`` needs force (no other node would be ready to take VMs), or None."""
    others = [view for name, view in views.items() if name != node]
    if any(view.is_eligible for view in others):
        return None
    states = "; ".join(
        f"{view.name}: daemon {view.daemon_state}, domain {view.domain_state}"
        for view in sorted(others, key=lambda v: v.name)
    )
    return (
        f"node {node} is the last ready node of the cluster (other nodes: {states or 'none'}): flushing it would shut "
        f"down its {running} running VM(s) with nowhere to move them; set force to true to flush it anyway"
    )


def flush_n1_refusal(node: str, verdict: dict) -> str | None:
    """Why require_n1 refuses the flush of ``node`` (``verdict``: flush_report's n-1 check), or None."""
    if verdict["ok"]:
        return None
    return n1_refusal(FailureCheck(False, verdict["failures"], tuple(verdict["checked"])), f"the flush of node {node}")


def flush_report(snapshot, node: str) -> tuple[list[dict], dict]:
    """The drain plan of ``node`` and the n-1 check of the cluster after it (from one snapshot)."""
    vms = [vm for vm in snapshot.vms.values() if vm.node == node and vm.state == "start" and not vm.migration]
    # as the daemon's flush does: a VM whose XML is not valid is never migrated (it is shut down),
    # and a VM whose migration record is not valid waits until an operator clears the record
    held = [
        PlannedMove(
            vm.uuid,
            None,
            f"its migration record is not valid ({vm.migration_error}): it stays until "
            "the record is cleared (pvc.cluster.vm_migrate with state=cleared)",
        )
        for vm in vms
        if vm.migration_error
    ]
    refused = [
        PlannedMove(vm.uuid, None, f"its domain XML is not valid ({vm.xml_error}): it is shut down")
        for vm in vms
        if vm.xml_error and not vm.migration_error
    ]
    movable = [vm for vm in vms if not vm.xml_error and not vm.migration_error]
    flush_vms = [
        FlushVM(vm.uuid, vm.memory_mib, vm.meta.node_limit, vm.meta.node_selector, vm.home, vm.vcpus) for vm in movable
    ]
    views = snapshot.views()
    default_selector = resolve_selector("default", snapshot.default_selector)
    running = snapshot.running_memory_by_node()
    # the VMs to flush count as running on the node even if its daemon has not reported them yet
    running[node] = [vm.memory_mib for vm in vms]
    # as the daemon plans it: a balanced fit plan that would lose n-1 gives way to best fit if that keeps it
    plan = (
        held + refused + plan_flush(node, flush_vms, views, default_selector=default_selector, running_by_node=running)
    )
    by_uuid = {vm.uuid: vm for vm in vms}
    # the refused VMs leave the node (shut down), the held ones stay
    shut_down = [
        FlushVM(vm.uuid, vm.memory_mib, (), None, None) for vm in vms if vm.xml_error and not vm.migration_error
    ]
    after_views, after_running = apply_plan(
        node, flush_vms + shut_down, refused + plan[len(held) + len(refused) :], views, running
    )
    check = survives_node_failure(after_views, after_running)
    lines = [
        {
            "name": by_uuid[move.uuid].name,
            "uuid": move.uuid,
            "memory_mib": by_uuid[move.uuid].memory_mib,
            "target": move.target,
            "reason": move.reason,
        }
        for move in plan
    ]
    return lines, check.to_dict()


# ---- cluster I/O -------------------------------------------------------------------------------


def flush_refused(message: str, result: dict, **more) -> ModuleFailure:
    """A flush refused before anything is written: the plan and the n-1 verdict of ``result``
    go with the refusal."""
    return ModuleFailure(
        message,
        changed=False,
        flush_plan=result["flush_plan"],
        survives_node_failure=result["survives_node_failure"],
        **more,
    )


def run(module, session) -> dict:
    params = module.params
    store, schema = session.store, session.schema
    name, state = params["name"], params["state"]
    snapshot = read_cluster(store)
    if name not in snapshot.nodes:
        raise ModuleFailure(
            f"node {name!r} is not a node of this cluster (nodes: {', '.join(sorted(snapshot.nodes)) or 'none registered'})"
        )
    path = schema.node_key(name, S.NODE_DOMAIN_STATE)
    versioned = store.find(path)
    current = versioned.value if versioned else S.NODE_DEFAULTS[S.NODE_DOMAIN_STATE]
    daemon_state = snapshot.nodes[name].get(S.NODE_DAEMON_STATE) or S.NODE_DEFAULTS[S.NODE_DAEMON_STATE]
    if state == "fenced":
        return confirm_fenced(
            module,
            session,
            name,
            daemon_state,
            snapshot.nodes[name].get(S.NODE_DOMAIN_STATE) or S.NODE_DEFAULTS[S.NODE_DOMAIN_STATE],
        )
    request, final = TRANSITIONS[state]
    halted_path = schema.node_key(name, S.NODE_FLUSH_HALTED)
    halted = read_flush_halted(store, halted_path) if request == "flush" else None
    differences = plan_state(current, state, halted)
    result = {
        "changed": differences.changed,
        "name": name,
        "daemon_state": daemon_state,
        "domain_state": differences.after()["domain_state"],
    }
    if module._diff:
        result["diff"] = differences.diff()
    if state == "flushed":
        if current != final:
            result["flush_plan"], result["survives_node_failure"] = flush_report(snapshot, name)
        else:
            check = survives_node_failure(snapshot.views(), snapshot.running_memory_by_node())
            result["flush_plan"] = []
            result["survives_node_failure"] = check.to_dict()
    else:
        result["returning_vms"] = sorted(
            vm.name for vm in snapshot.vms.values() if vm.lastnode == name and vm.node != name
        )
    if state == "flushed" and differences.changed and not params["force"]:
        running = sum(1 for vm in snapshot.vms.values() if vm.node == name and vm.state == "start")
        refusal = last_ready_refusal(snapshot.views(), name, running)
        if refusal:
            raise flush_refused(refusal, result)
    if state == "flushed":
        result["require_n1"] = n1_policy(params["require_n1"], snapshot)
        refusal = (
            flush_n1_refusal(name, result["survives_node_failure"])
            if differences.changed and result["require_n1"]
            else None
        )
        if refusal:
            raise flush_refused(refusal, result, require_n1=True)
    needs_daemon = params["wait"] and current != final
    if needs_daemon and daemon_state != "run":
        # in check mode too: check mode must not promise what the real run refuses
        raise ModuleFailure(
            f"the daemon of node {name} is {daemon_state}, not run: nothing would act on the request, so it "
            "was not written; start the daemon, or use wait=false to record the request anyway"
        )
    if module.check_mode:
        return result
    if differences.changed:
        expect = {path: versioned.version} if versioned else {}
        session.commit(
            {path: request},
            expect_versions=expect,
            # a flush asked again starts with no halt verdict: one seen while waiting is new
            delete=[halted_path] if request == "flush" else [],
            what=f"domain state {request} of node {name}",
        )
    if params["wait"] and current != final:
        deadline = time.monotonic() + params["wait_timeout"]

        def settled():
            value = store.find_text(path)
            if value not in (request, None):
                return value
            if request == "flush":
                verdict = read_flush_halted(store, halted_path)
                return ("halted", verdict) if verdict else None
            return None

        outcome = watch_until(
            store, [path, halted_path] if request == "flush" else [path], settled, params["wait_timeout"]
        )
        if isinstance(outcome, tuple):
            raise ModuleFailure(
                f"node {name} is still flush: its daemon halted the flush: {outcome[1]}",
                **{**result, "flush_halted": outcome[1]},
            )
        if outcome is None:
            raise ModuleFailure(
                f"node {name} is still {store.find_text(path)} after {params['wait_timeout']} s; its daemon carries on",
                **result,
            )
        if outcome != final:
            raise ModuleFailure(
                f"node {name} went to domain state {outcome} instead of {final} (another request?)",
                changed=result["changed"],
            )
        result["domain_state"] = outcome
        if state == "flushed":
            moving = [vm.uuid for vm in snapshot.vms.values() if vm.node == name and vm.state == "start"]
        else:
            moving = [vm.uuid for vm in snapshot.vms.values() if vm.lastnode == name and vm.node != name]
        paths = [schema.node_key(node, S.NODE_RUNNINGDOMAINS) for node in sorted(snapshot.nodes)]
        if not watch_until(
            store,
            paths,
            lambda: published(store, sorted(snapshot.nodes), moving),
            min(max(deadline - time.monotonic(), 0.1), PUBLISH_WAIT_S),
        ):
            module.warn(
                f"node {name} is {final}, but the nodes' published running domains do not show it yet "
                "(each daemon publishes them with every keepalive)"
            )
    return result


def published(store, nodes: list[str], moving: list[str]) -> bool:
    """Whether the daemons' published running domains show each VM that moved (and is meant to run)
    on its node only. Nodes whose daemon is not running publish nothing new and are not asked."""
    schema = store.schema
    states = read_node_states(store, nodes)
    running = {
        node: read_running(store, node) for node in nodes if node in states and states[node].daemon_state == "run"
    }
    for uuid in moving:
        node = store.find_text(schema.domain_key(uuid, S.DOMAIN_NODE))
        if not node or read_vm_state(store, uuid) != "start":
            continue
        if [where for where, uuids in running.items() if uuid in uuids] != [node]:
            return False
    return True


def main():
    module = build_module(ARGUMENT_SPEC)
    check_before_connecting(module, check_input)
    exit_from_session(module, run)


if __name__ == "__main__":
    main()
