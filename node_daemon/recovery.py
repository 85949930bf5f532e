"""High availability decisions: pure logic, no I/O (the service is node_daemon/ha.py).

* :class:`LivenessTracker`: when a peer's keepalive last changed, by this daemon's own monotonic
  clock. A peer is stale when its keepalive has not changed for ``interval x dead_after`` seconds
  of this daemon's connected time: no wall clock of another host is compared, and after this
  daemon (re)connects to ZooKeeper every peer gets a full window again (after a lost quorum every
  keepalive is old, and no node may be declared dead for that).
* :func:`fence_decision`: what to do about one peer (mark it dead, fence it, recover its VMs,
  nothing), from its daemon state, domain state and maintenance flag.
* :func:`plan_recovery`: where each VM of a fenced node starts again, through the one selector
  (:func:`plan_flush`: node_limit, fit, reservations; targets that keep the cluster n-1 safe
  preferred, never required), which VMs fit nowhere (they stay where they are, stopped, with the
  reason) and which wait for a migration involving the node to be resolved first.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from pvc_cluster_common._cluster import VMRecord
from pvc_cluster_common._selector import FlushVM, NodeView, plan_flush

# VM states that should be running (a restart ends running).
SHOULD_RUN = ("start", "restart")


class LivenessTracker:
    """Peers' keepalives as this daemon saw them change (pure: the caller passes the time)."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._seen: dict[str, tuple[object, float]] = {}  # peer -> (keepalive value, when it changed)
        self._since: float | None = None  # connected since (None: not connected)

    def connected(self, now: float) -> None:
        """This daemon's session is (again) usable: every peer starts a new window."""
        self._since = now
        self._seen.clear()

    def disconnected(self) -> None:
        self._since = None
        self._seen.clear()

    def observe(self, peer: str, keepalive: object, now: float) -> None:
        last = self._seen.get(peer)
        if last is None or last[0] != keepalive:
            self._seen[peer] = (keepalive, now)

    def forget(self, peer: str) -> None:
        self._seen.pop(peer, None)

    def stale(self, peer: str, now: float) -> bool:
        """True when ``peer``'s keepalive has not changed for a whole window of connected time."""
        if self._since is None or now - self._since < self.window_s:
            return False
        last = self._seen.get(peer)
        return last is not None and now - last[1] >= self.window_s


class Act(enum.Enum):
    NOTHING = "nothing"
    MARK_DEAD = "mark-dead"  # run -> dead (version-checked: a peer that wrote run meanwhile wins)
    FENCE = "fence"  # dead or fencing -> power it off, confirm, then fenced
    RECOVER = "recover"  # fenced: start its VMs elsewhere
    MAINTENANCE = "maintenance"  # dead but in maintenance: never fenced
    WAIT_OPERATOR = "wait-operator"  # fence-failed: an operator decides


@dataclass(frozen=True)
class FenceDecision:
    act: Act
    why: str


def fence_decision(daemon_state: str, domain_state: str, maintenance: bool, stale: bool) -> FenceDecision:
    """What a live daemon does about one peer.

    A node in maintenance (the explicit flag, or domain state ``flushed``: nothing of it should
    run) is marked dead when stale but never fenced. ``dead`` and ``fencing`` (an actor that died
    while fencing) are fenced; ``fenced`` has its VMs recovered.
    """
    resting = maintenance or domain_state == "flushed"
    if daemon_state == "run":
        if stale:
            return FenceDecision(Act.MARK_DEAD, "its keepalives stopped")
        return FenceDecision(Act.NOTHING, "alive")
    if daemon_state in ("dead", "fencing"):
        if resting:
            why = "the node is in maintenance" if maintenance else "the node is flushed"
            return FenceDecision(Act.MAINTENANCE, f"{why}: it is not fenced")
        return FenceDecision(Act.FENCE, "its daemon is dead")
    if daemon_state == "fenced":
        return FenceDecision(Act.RECOVER, "its power is confirmed off")
    if daemon_state == "fence-failed":
        return FenceDecision(
            Act.WAIT_OPERATOR,
            "its fence failed: nothing is recovered until an operator confirms it "
            "is off (pvc.cluster.node state=fenced confirm_down=true)",
        )
    return FenceDecision(Act.NOTHING, f"daemon state {daemon_state}")


@dataclass(frozen=True)
class RecoveryStart:
    uuid: str
    target: str
    lastnode: str  # what lastnode becomes: where ready brings it home


@dataclass
class RecoveryPlan:
    starts: list[RecoveryStart] = field(default_factory=list)
    unplaced: dict[str, str] = field(default_factory=dict)  # uuid -> why it stays stopped
    waiting: dict[str, str] = field(default_factory=dict)  # uuid -> what it waits for
    aborts: list[str] = field(default_factory=list)  # migrations between fenced nodes: end them

    @property
    def done(self) -> bool:
        """Nothing left to do on this pass (unplaced VMs are tried again on later passes)."""
        return not self.starts and not self.waiting and not self.aborts


def plan_recovery(
    dead: str,
    vms: Iterable[VMRecord],
    nodes: Mapping[str, NodeView],
    fenced: Collection[str] = (),
    default_selector: str | None = None,
    running_by_node: Mapping[str, Sequence[int]] | None = None,
) -> RecoveryPlan:
    """Where the VMs of the fenced node ``dead`` start again.

    ``vms``: the record (fresh reads) of every VM assigned to ``dead`` or with a migration naming it;
    ``nodes``: NodeView by name (fresh reads, reservations counted); ``fenced``: every node whose
    power is confirmed off (``dead`` among them).

    * A VM with a migration record waits while the record's other side is a live node: that
      node's daemon resolves the migration (it asks libvirt there, and takes the fenced side as
      running nothing). When both sides are fenced, nobody else can end it: ``aborts``.
    * A VM assigned to ``dead`` that should run is placed by the selector (plan_flush: node_limit,
      fit, reservations, the largest first); ``lastnode`` keeps a home the VM already had (it was
      on ``dead`` for a while only), else becomes ``dead``, so that making ``dead`` ready brings
      it home. Returning to that home clears ``lastnode``.
    * A VM that fits nowhere, or whose XML or keys are not valid, stays assigned to ``dead``, not
      running, with the reason; later passes try it again.
    * n-1 (``running_by_node``: the memory of the VMs each node runs): availability first. n-1 never
      keeps a VM stopped, but the plan prefers targets that keep the cluster n-1 safe: when the
      selectors' plan would leave it failing the check, each VM, whatever its selector, takes the
      first of its first targets (its selector's order) whose choice makes no node fail the check
      that passed it, and only a VM for which none does goes where its selector says
      (plan_flush's ``n1_every_selector``). Whether the cluster is n-1 safe afterwards is the
      caller's to report.
    """
    plan = RecoveryPlan()
    fenced = set(fenced) | {dead}
    movable = []
    for vm in vms:
        migration = vm.migration
        if migration is not None and dead in (migration.source, migration.target):
            other = migration.target if migration.source == dead else migration.source
            if other in fenced:
                plan.aborts.append(vm.uuid)
            else:
                plan.waiting[vm.uuid] = f"its migration with {other} is resolved by {other}'s daemon first"
            continue
        if vm.node != dead or vm.state not in SHOULD_RUN:
            continue
        if vm.migration_error:
            plan.unplaced[vm.uuid] = f"a key that decides about it is not valid ({vm.migration_error})"
        elif vm.xml_error:
            plan.unplaced[vm.uuid] = f"its domain XML is not valid ({vm.xml_error})"
        else:
            movable.append(vm)
    by_uuid = {vm.uuid: vm for vm in movable}
    moves = plan_flush(
        dead,
        [
            FlushVM(vm.uuid, vm.memory_mib, vm.meta.node_limit, vm.meta.node_selector, vm.lastnode or dead, vm.vcpus)
            for vm in movable
        ],
        nodes,
        default_selector=default_selector,
        running_by_node=running_by_node,
        n1_every_selector=True,
    )
    for move in moves:
        vm = by_uuid[move.uuid]
        if move.target is None:
            plan.unplaced[move.uuid] = f"it fits on no other node: {move.reason}"
            continue
        home = vm.lastnode or dead
        plan.starts.append(RecoveryStart(move.uuid, move.target, "" if home == move.target else home))
    return plan
