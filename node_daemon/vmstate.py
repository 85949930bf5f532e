"""What one node must do about one VM: a pure decision from the desired and the actual state.

The XML and state in ZooKeeper are the source of truth; libvirt on this node is the actual state.
The reconciler reads both, calls :func:`decide`, and applies the action. Migrations are not
decided here: when a migration record exists the migration agent owns the VM.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .hypervisor import ACTIVE_STATES, RUNNING_STATES


class Action(enum.Enum):
    NOTHING = "nothing"
    START = "start"  # create the domain from the XML in ZooKeeper
    RESTART = "restart"  # clean shutdown (forced after the timeout), start, state=start
    SHUTDOWN = "shutdown"  # clean shutdown (forced after the timeout), state=stop
    STOP = "stop"  # forced stop, state unchanged
    RECORD_STOPPED = "record-stopped"  # not running: write the state the request leads to
    MIGRATION = "migration"  # a migration record names this node: the agent acts
    REHOME = "rehome"  # running here but assigned elsewhere without a record
    FORGET = "forget"  # nothing to do here; stop tracking


# libvirt states in which a domain occupies a node (the driver's vocabulary). A paused domain is
# still there (and may be an incoming migration, which only the migration agent may touch).
ACTIVE_LIBVIRT_STATES = ACTIVE_STATES


@dataclass(frozen=True)
class Desired:
    state: str  # one of VM_STATES
    node: str  # node the VM is assigned to
    migration_source: str | None = None  # set when a migration record exists
    migration_target: str | None = None
    # why a key that decides about the VM (its state, node or migration record) is not valid;
    # then nothing is done about the VM until it is (an operator's fix, or a record cleared)
    invalid: str = ""


@dataclass(frozen=True)
class Decision:
    action: Action
    new_state: str | None = None  # the state to record after the action, if it changes
    why: str = ""


def decide(me: str, desired: Desired, local_state: str | None) -> Decision:
    """Decide what node ``me`` does about one VM.

    ``local_state`` is libvirt's state name on this node, or None when libvirt does not know the VM.
    """
    active = local_state in ACTIVE_LIBVIRT_STATES
    running = local_state in RUNNING_STATES

    if desired.invalid:
        # Acting on a guess could start a second copy (a record that was mid-migration) or stop
        # a VM someone needs: the VM stays exactly as it is, wherever it runs.
        return Decision(Action.NOTHING, why=f"left as it is: {desired.invalid}")

    if desired.migration_source is not None:
        if me in (desired.migration_source, desired.migration_target):
            return Decision(Action.MIGRATION, why="a migration record names this node")
        if active:
            # Not part of the migration but running it: a stray copy (I1). Never ours to keep.
            return Decision(Action.STOP, why="running here but migrating between two other nodes")
        return Decision(Action.FORGET, why="migrating between other nodes")

    if desired.node != me:
        if active:
            return Decision(Action.REHOME, why=f"running here but assigned to {desired.node}")
        return Decision(Action.FORGET, why=f"assigned to {desired.node}")

    state = desired.state
    if state == "start":
        if active:
            return Decision(Action.NOTHING, why="running as desired")
        return Decision(Action.START, why="should run here and does not")
    if state == "restart":
        if running:
            return Decision(Action.RESTART, new_state="start", why="restart requested")
        return Decision(Action.RECORD_STOPPED, new_state="start", why="restart of a VM that is not running: start it")
    if state == "shutdown":
        if active:
            return Decision(Action.SHUTDOWN, new_state="stop", why="shutdown requested")
        return Decision(Action.RECORD_STOPPED, new_state="stop", why="already off")
    if state == "disable":
        if active:
            return Decision(Action.SHUTDOWN, why="disabled: shut down cleanly and keep it off")
        return Decision(Action.NOTHING, why="off as desired (disable)")
    if state == "stop":
        if active:
            return Decision(Action.STOP, why="stop requested: forced stop")
        return Decision(Action.NOTHING, why="off as desired (stop)")
    if state == "fail":
        if running:
            return Decision(Action.RECORD_STOPPED, new_state="start", why="marked failed but running: record start")
        return Decision(Action.NOTHING, why="failed; waiting for an operator")
    return Decision(Action.NOTHING, why=f"unknown state {state!r}: left alone")
