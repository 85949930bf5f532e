# -*- coding: utf-8 -*-
# Copyright: pvc.cluster developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
#
# PRIVATE: this module is internal to the pvc.cluster collection and its node daemon.
# It may change without notice; do not import it from other collections.
"""Migration requests (migrate, move, unmigrate) and the migration record, defined once.

Planning is pure (``plan_request``); writing is one versioned transaction (``submit_request``).
The Ansible modules and the daemon's flush/ready both go through here, so a check-mode plan is
exactly what a real run does. The protocol that follows a request is in docs/migration-protocol.md.
"""

from __future__ import annotations

import time
import uuid as uuidlib
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from . import _schema as S
from ._cluster import VMRecord, read_node_views, read_node_views_of, read_vm, reservation_mib
from ._records import KINDS, RESULT_ABORTED, STEP_REQUESTED, MigrationRecord
from ._selector import NoTargetError, NodeView, rejection_reasons, select_target

if TYPE_CHECKING:
    from ._store import ClusterStore

# A running VM is migrated; a VM in these states is only re-homed (no record, nothing moves).
REHOME_ONLY_STATES = ("stop", "disable", "fail")
# A VM in these states is in the middle of something; a request waits until it settles.
BUSY_STATES = ("restart", "shutdown")


class RequestError(ValueError):
    """A request that cannot be made; the message says why and what would be accepted."""


@dataclass(frozen=True)
class RequestPlan:
    uuid: str
    name: str
    kind: str
    source: str  # the VM's node now
    target: str  # its node after the request
    lastnode: str  # its lastnode after the request
    changed: bool  # False: nothing to do (already there / already home)
    migrates: bool  # True: a running VM moves (a record is written)
    memory_mib: int
    force_live: bool
    message: str
    target_before: NodeView | None = None

    @property
    def target_headroom_after(self) -> int | None:
        if self.target_before is None:
            return None
        return self.target_before.headroom - (self.memory_mib if self.migrates else 0)


def _check_target(vm: VMRecord, target: str, nodes: dict[str, NodeView], need_ready: bool) -> None:
    if target not in nodes:
        accepted = ", ".join(sorted(nodes)) or "none registered"
        raise RequestError(f"target node {target!r} is not a node of this cluster (nodes: {accepted})")
    limit = vm.meta.node_limit
    if limit and target not in limit:
        raise RequestError(f"target node {target} is not in the node_limit of VM {vm.name} ({', '.join(limit)})")
    if need_ready:
        reason = rejection_reasons(vm.memory_mib, vm.node, limit, {target: nodes[target]})[target]
        if reason:
            raise RequestError(f"cannot migrate VM {vm.name} to {target}: {reason}")


def plan_request(
    vm: VMRecord,
    kind: str,
    nodes: dict[str, NodeView],
    target: str | None = None,
    force_live: bool = False,
    default_selector: str | None = None,
) -> RequestPlan:
    """Decide what a migrate/move/unmigrate request of ``vm`` (a VMRecord) does. No I/O."""
    if kind not in KINDS:
        raise RequestError(f"unknown request {kind!r} (accepted: {', '.join(KINDS)})")
    if vm.migration:
        raise RequestError(
            f"a migration of VM {vm.name} from {vm.migration.source} to {vm.migration.target} is in flight "
            f"(step {vm.migration.step}); wait for it to finish"
        )
    if vm.migration_error:
        raise RequestError(
            f"VM {vm.name} has a migration record that is not valid ({vm.migration_error}); no daemon acts on it, and "
            f"nothing else moves the VM until it is cleared (pvc.cluster.vm_migrate with state=cleared)"
        )
    if vm.xml_error:
        raise RequestError(
            f"VM {vm.name} is neither started nor migrated: its domain XML is not valid ({vm.xml_error}); "
            "define it again with pvc.cluster.vm"
        )
    if vm.state in BUSY_STATES:
        raise RequestError(f"VM {vm.name} is in state {vm.state}; retry when it settles")
    migrates = vm.state not in REHOME_ONLY_STATES

    def plan(tgt: str, lastnode: str, changed: bool, message: str) -> RequestPlan:
        return RequestPlan(
            uuid=vm.uuid,
            name=vm.name,
            kind=kind,
            source=vm.node,
            target=tgt,
            lastnode=lastnode,
            changed=changed,
            migrates=migrates and changed and tgt != vm.node,
            memory_mib=vm.memory_mib,
            force_live=force_live,
            message=message,
            target_before=nodes.get(tgt),
        )

    if kind == "unmigrate":
        if not vm.lastnode:
            return plan(vm.node, "", False, f"VM {vm.name} is already on its home node {vm.node}")
        target = vm.lastnode
        if target == vm.node:
            return plan(vm.node, "", True, f"VM {vm.name} is on its home node {vm.node}: clearing its return record")
        _check_target(vm, target, nodes, need_ready=migrates)
        return plan(target, "", True, f"VM {vm.name} returns from {vm.node} to its home node {target}")

    if target is None:
        try:
            target = select_target(
                vm.memory_mib,
                vm.node,
                vm.meta.node_limit,
                vm.meta.node_selector,
                nodes,
                default_selector=default_selector,
            )
        except NoTargetError as exc:
            raise RequestError(f"no node can take VM {vm.name}: {exc}") from None
    elif target == vm.node:
        if kind == "move" and vm.lastnode:
            return plan(vm.node, "", True, f"VM {vm.name} stays on {vm.node}, which becomes its home node")
        return plan(vm.node, vm.lastnode, False, f"VM {vm.name} is already on {vm.node}")
    else:
        _check_target(vm, target, nodes, need_ready=migrates)

    if kind == "move" or target == vm.lastnode:
        lastnode = ""  # a move is permanent; a migrate back home ends the temporary stay
    else:
        lastnode = vm.lastnode or vm.node  # keep the original home across repeated migrations
    verb = "moves" if kind == "move" else "migrates"
    what = "" if migrates else " (not running: re-homed only)"
    return plan(target, lastnode, True, f"VM {vm.name} {verb} from {vm.node} to {target}{what}")


def new_record(plan: RequestPlan, vm: VMRecord, requester: str) -> MigrationRecord:
    return MigrationRecord(
        id=uuidlib.uuid4().hex[:12],
        vm=plan.uuid,
        name=plan.name,
        kind=plan.kind,
        source=plan.source,
        target=plan.target,
        method="live" if plan.force_live else vm.meta.migration_method,
        force_live=plan.force_live,
        memory_mib=plan.memory_mib,
        prev_lastnode=vm.lastnode,
        requester=requester,
        step=STEP_REQUESTED,
        steps={STEP_REQUESTED: round(time.time(), 3)},
    )


def placement_plan(
    vm: VMRecord, source: str, target: str, lastnode: str, *, migrates: bool, message: str
) -> RequestPlan:
    """The request a daemon makes to place VM ``vm`` on node ``target`` (kind ``move``, never a
    forced live migration), with ``lastnode`` as given. Two daemons' requests are made so:

    * the self-heal of a VM found running on ``source`` while ZooKeeper assigns it to another
      node with no migration record: a migration from ``source`` to its assigned node
      (``target=vm.node``) that keeps ``node`` and ``lastnode`` as they are (``migrates=True``);
    * an HA recovery: the VM of the fenced ``source``, not running, is assigned to the node that
      starts it (``migrates=False``: nothing moves, no record is written)."""
    return RequestPlan(
        uuid=vm.uuid,
        name=vm.name,
        kind="move",
        source=source,
        target=target,
        lastnode=lastnode,
        changed=True,
        migrates=migrates,
        memory_mib=vm.memory_mib,
        force_live=False,
        message=message,
    )


def submit_request(
    store: ClusterStore,
    plan: RequestPlan,
    vm: VMRecord,
    requester: str,
    target_unflushing_ok: bool = False,
    *,
    fit: bool | None = None,
    also_values: dict[str, object] | None = None,
    also_expect: dict[str, int] | None = None,
    also_create: list[str] | tuple[str, ...] = (),
    parent_value: str | None = None,
) -> MigrationRecord | None:
    """Write a planned request in one transaction. Returns the migration record (None when the
    request only re-homes a stopped VM, or changes nothing). Raises the store's ConflictError when
    the VM changed since it was read (re-read and re-plan), StoreError when ZooKeeper fails.
    ``target_unflushing_ok``: the target may be in domain state ``unflush`` (a node that is being
    made ready takes its VMs back before it is ``ready``).

    ``fit``: check in this transaction that the VM fits on the target (default: when the VM
    migrates; an HA recovery re-homes a VM that is to start there and asks for it). A VM that is
    already assigned to the target (a self-heal's ``placement_plan``) is counted there already, by the target's
    memprov or by its reservation, and is given back before the check. ``also_values``,
    ``also_expect`` and ``also_create`` are committed in the same transaction (an HA recovery's
    audit record and its check of the fenced node's state); ``parent_value`` is what the target's
    reservations znode is rewritten with when no migration record is written."""
    if not plan.changed:
        return None
    schema = store.schema
    node_path = schema.domain_key(plan.uuid, S.DOMAIN_NODE)
    values: dict[str, object] = {node_path: plan.target, **(also_values or {})}
    if plan.lastnode != vm.lastnode:
        # Written only when it changes: every daemon watches it. Unchanged is safe to leave out:
        # lastnode only ever changes together with node, whose version this commit checks.
        values[schema.domain_key(plan.uuid, S.DOMAIN_LASTNODE)] = plan.lastnode
    expect = {node_path: vm.node_version, **(also_expect or {})}
    create = list(also_create)
    delete = []
    record = None
    if plan.migrates or plan.target != plan.source:
        # The fit check and the reservation must be one atomic step, or two requesters could both
        # fit a VM into the same last gigabyte. Every request rewrites the target's reservations
        # znode with a version check, so concurrent requests to one target serialise: the loser
        # gets ConflictError and re-plans. Its version is read before the target's view, so any
        # reservation made after the view was read changes it. A stopped VM that is only
        # re-homed is not fit-checked (it runs nowhere), but it gets a reservation too: the
        # target's memprov counts it only from the target's next keepalive.
        parent = schema.node_reservations(plan.target)
        mine = schema.node_reservation(plan.target, plan.uuid)
        left = schema.node_reservation(plan.source, plan.uuid) if plan.source and plan.source != plan.target else None
        views, also = read_node_views_of(
            store, [plan.target], also=[parent, mine] + ([left] if left else []), keys=NodeView.FIT_KEYS
        )
        found, view = also[parent], views.get(plan.target)
        if view is None:
            raise RequestError(f"target node {plan.target} is not a node of this cluster")
        if target_unflushing_ok and view.domain_state == "unflush":
            view = replace(view, domain_state="ready")
        if plan.migrates if fit is None else fit:
            checked = view
            if vm.node == plan.target:
                # Already assigned there: its own reservation or the target's memprov holds it.
                if also[mine] is not None:
                    held = reservation_mib(also[mine][0], mine, [])
                    checked = replace(view, reserved=max(view.reserved - held, 0))
                else:
                    checked = replace(view, memprov=max(view.memprov - plan.memory_mib, 0))
            reason = rejection_reasons(plan.memory_mib, plan.source, vm.meta.node_limit, {plan.target: checked})[
                plan.target
            ]
            if reason:
                what = f"migrate VM {plan.name} to" if plan.migrates else f"place VM {plan.name} on"
                raise RequestError(f"cannot {what} {plan.target}: {reason}")
        if plan.migrates:
            record = new_record(plan, vm, requester)
            # First in the transaction: ZooKeeper fires its watches in the order of its
            # operations, so the daemons learn of the record before of the VM's new node, and
            # neither side acts on the new node alone (the target would confirm a start from
            # fresh reads, a round trip before it prepares)
            values = {schema.domain_migration(plan.uuid): record.to_json(), **values}
            values[parent] = record.id
            create.append(schema.domain_migration(plan.uuid))
        else:
            values[parent] = parent_value or f"rehome {plan.uuid}"
        values[schema.node_reservation(plan.target, plan.uuid)] = plan.memory_mib
        if found is None:
            create.append(parent)
        else:
            expect[parent] = found.version
        # A reservation of the VM may be left on the target (a migration that ended there
        # earlier, not yet counted in memprov by the target's keepalive): it is replaced.
        if also[mine] is None:
            create.append(mine)
        else:
            expect[mine] = also[mine][1]
        # One left on the source goes: the VM is assigned elsewhere from this transaction on,
        # and nothing else would delete it (only a keepalive of the VM's own node folds one).
        if left and also[left] is not None:
            delete.append(left)
            expect[left] = also[left][1]
    store.commit(values, expect_versions=expect, create=create, delete=delete)
    return record


def growth_reservation(
    store: ClusterStore, vm: VMRecord, memory_mib: int
) -> tuple[dict[str, object], dict[str, int], list[str]]:
    """The writes, version checks and creates that a VM's growth to ``memory_mib`` adds to the
    transaction that writes its larger XML (``pvc.cluster.vm``): a reservation of its whole new
    size on its node, which its node's keepalive folds once its memprov counts the new size
    (docs/architecture.md, "Memory accounting"), and the node's reservations znode rewritten with
    a version check, so the growth and any request to that node serialise. The fit is checked
    here against the node's figures and reservations read now: the node already counts the VM
    at its old size (by its reservation there, else by its memprov), which is given back first.
    Raises RequestError when the node cannot hold the new size (a node that publishes no
    memtotal is not checked, as the module's plan does not)."""
    schema = store.schema
    node = vm.node
    parent = schema.node_reservations(node)
    mine = schema.node_reservation(node, vm.uuid)
    views, also = read_node_views_of(store, [node], also=[parent, mine], keys=NodeView.FIT_KEYS)
    view = views.get(node)
    if view is None:
        raise RequestError(f"VM {vm.name} is assigned to {node}, which is not a node of this cluster")
    if also[mine] is not None:
        view = replace(view, reserved=max(view.reserved - reservation_mib(also[mine][0], mine, []), 0))
    else:
        view = replace(view, memprov=max(view.memprov - vm.memory_mib, 0))
    if view.memtotal > 0 and memory_mib > view.headroom:
        raise RequestError(
            f"VM {vm.name} would grow from {vm.memory_mib} to {memory_mib} MiB, but node {node} has "
            f"{view.headroom - vm.memory_mib} MiB headroom; move the VM to a node with room first "
            "(pvc.cluster.vm_migrate), or make room on this one"
        )
    values: dict[str, object] = {mine: memory_mib, parent: f"grow {vm.uuid}"}
    expect: dict[str, int] = {}
    create: list[str] = []
    for path in (parent, mine):
        if also[path] is None:
            create.append(path)
        else:
            expect[path] = also[path][1]
    return values, expect, create


# Attempts of one request (read, plan, submit) that meets conflicts: request_vm's and the daemon's
# flush and ready (node_daemon/flush.py), whatever step of it meets them.
REQUEST_ATTEMPTS = 10


def request_vm(
    store: ClusterStore,
    uuid: str,
    kind: str,
    requester: str,
    target: str | None = None,
    force_live: bool = False,
    attempts: int = REQUEST_ATTEMPTS,
) -> MigrationRecord | None:
    """Read VM ``uuid`` and the nodes, plan a ``kind`` request and submit it; planned again from
    fresh reads when the commit conflicts. A conflict is a normal outcome, not an error: another
    request, or the keepalive of a node folding a finished migration's reservation into its
    figures, changed a key the plan was made from. For callers with no check mode and no diff
    (the benchmarks, the lab, tests); the modules keep their own loop around the same two steps.
    Raises RequestError when the VM is gone or the plan is refused, ConflictError after
    ``attempts`` conflicts in a row."""
    from ._store import Attempts, ConflictError  # not at import: sanity loads module_utils without the client library

    budget = Attempts(attempts)
    while True:
        vm = read_vm(store, uuid)
        if vm is None:
            raise RequestError(f"VM {uuid} does not exist")
        plan = plan_request(vm, kind, read_node_views(store), target=target, force_live=force_live)
        try:
            return submit_request(store, plan, vm, requester=requester)
        except ConflictError:
            if not budget.again():
                raise


def history_key(record_id: str, finished: float) -> str:
    """Sortable name of an audit record: finish time in ms, then the migration id."""
    return f"{int(finished * 1000):015d}-{record_id}"


def final_record(record: MigrationRecord, result: str, reason: str | None = None) -> dict[str, Any]:
    """The audit record of a migration that ends now with ``result``: the record without its
    ``step``, with ``result``, the time of the result among its steps, and ``duration_s``."""
    finished = time.time()
    final = record.to_dict()
    final.pop("step", None)
    final["steps"] = {**record.steps, result: round(finished, 3)}
    final["result"] = result
    if reason:
        final["reason"] = reason
    final["duration_s"] = round(finished - record.steps.get(STEP_REQUESTED, finished), 3)
    return final


def finish_values(
    schema: S.Schema,
    uuid: str,
    record: MigrationRecord,
    result: str,
    reason: str | None = None,
    node: str | None = None,
) -> tuple[dict[str, object], list[str], dict[str, Any]]:
    """The writes and deletes that end the migration of VM ``uuid`` (the key's UUID) in one
    transaction: the record goes, the audit record is added, and on abort ``node``/``lastnode``
    point back to where the VM runs. Returns (values, delete, final audit record).

    The VM stays covered at every instant (docs/architecture.md, "Memory accounting"): the
    reservation stays on the node the VM ends on, whose next keepalive counts the VM in memprov
    in the same transaction that deletes the reservation. On ``done`` that is the target's
    reservation, left as it is. On abort the target's goes, and the node the VM returns to gets
    one (its memprov stopped counting the VM while the VM was assigned to the target); that
    node's reservations znode is rewritten too, so that a request to it that read its figures
    before this write fails its version check and plans again.
    """
    final = final_record(record, result, reason)
    values: dict[str, object] = {
        schema.domain_history(uuid) + "/" + history_key(record.id, final["steps"][result]): final
    }
    delete = [schema.domain_migration(uuid)]
    if result == RESULT_ABORTED:
        back = node or record.source
        values[schema.domain_key(uuid, S.DOMAIN_NODE)] = back
        values[schema.domain_key(uuid, S.DOMAIN_LASTNODE)] = record.prev_lastnode
        if back != record.target:
            delete.append(schema.node_reservation(record.target, uuid))
            values[schema.node_reservation(back, uuid)] = record.memory_mib
            values[schema.node_reservations(back)] = record.id
    return values, delete, final
