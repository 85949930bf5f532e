# -*- coding: utf-8 -*-
# Copyright: pvc.cluster developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
#
# PRIVATE: this module is internal to the pvc.cluster collection and its node daemon.
# It may change without notice; do not import it from other collections.
"""One typed decoder per kind of stored key, shared by the daemon, the modules and the inventory.

Every value the cluster keeps in ZooKeeper is decoded here before anything uses it, with the
bounded primitives of ``_decode``: a value is either what the schema (``_schema``) defines, or an
:class:`~._decode.Invalid` naming its path and what is accepted. The migration record, the one
value that drives both sides of a migration, is a dataclass (:class:`MigrationRecord`) with one
decode path (``from_json``) and one encode path (``to_json``).

Decoders take the stored text (None when the key does not exist) and its path; those of keys
that name a VM also take the UUID of the key, because bookkeeping uses the key's UUID, never a
copy inside a value: a record whose ``vm`` is another UUID is invalid.

Standard library only, no I/O.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field, replace

from . import _decode as D
from . import _schema as S
from ._domain_xml import DomainXMLError, parse_domain_xml

# ---- vocabularies of the migration record (docs/migration-protocol.md) ------------------------

KINDS = ("migrate", "move", "unmigrate")
STEP_REQUESTED = "requested"
STEP_PREPARED = "prepared"
STEP_TRANSFERRING = "transferring"
STEP_TRANSFERRED = "transferred"
STEPS = (STEP_REQUESTED, STEP_PREPARED, STEP_TRANSFERRING, STEP_TRANSFERRED)
RESULT_DONE = "done"
RESULT_ABORTED = "aborted"
RESULTS = (RESULT_DONE, RESULT_ABORTED)
RECORD_METHODS = ("default", "live", "shutdown")
# live and shutdown as the source chose them; offline: nothing ran on the source, the target started it
METHODS_USED = ("live", "shutdown", "offline")

# A record is a few hundred bytes; its reasons are libvirt's messages. 64 KiB leaves room for any
# of them and keeps a hostile one from costing anything.
MAX_RECORD_BYTES = 64 * 1024
# {"steps": {...}} is the deepest part of a record (depth 2).
MAX_RECORD_DEPTH = 3
MAX_REASON_BYTES = D.MAX_TEXT_BYTES
_RECORD_ID = re.compile(r"[0-9A-Za-z_-]{1,64}")
# The most UUIDs a node reports running: far more VMs than a hypervisor can hold.
MAX_RUNNING_DOMAINS = 10_000
# Statistics of one VM: a small object of figures.
MAX_STATS_BYTES = 16 * 1024
MAX_STATS_DEPTH = 4


# ---- node keys --------------------------------------------------------------------------------


def daemon_state(value, path: str) -> str:
    return D.choice(value, path, S.DAEMON_STATES)


def domain_state(value, path: str) -> str:
    return D.choice(value, path, S.DOMAIN_STATES)


def libvirt_health(value, path: str) -> str:
    return D.choice(value, path, S.LIBVIRT_HEALTH)


def running_domains(value, path: str) -> tuple[str, ...]:
    """A node's ``runningdomains``: a JSON list of VM UUIDs."""
    found = D.json_list(value, path, max_bytes=MAX_RUNNING_DOMAINS * 40, max_depth=1)
    if len(found) > MAX_RUNNING_DOMAINS:
        raise D.Invalid(path, f"a JSON list of at most {MAX_RUNNING_DOMAINS} VM UUIDs", value)
    for index, item in enumerate(found):
        if not isinstance(item, str):
            raise D.Invalid(path, "a JSON list of VM UUIDs", value, field=f"[{index}]")
        D.uuid(item, path)
    return tuple(found)


def reservation(value, path: str) -> int:
    """An incoming-migration reservation, ``/nodes/<node>/reservations/<uuid>``, in MiB."""
    return D.integer(value, path, minimum=0, maximum=D.MAX_MIB)


def keepalive(value, path: str) -> float:
    """A node's ``keepalive``: a unix time."""
    return D.number(value, path)


def node_address(value, path: str) -> str:
    """A node's ``address``: how peers reach it (an IP address or a host name)."""
    return D.address(value, path)


# ---- VM keys ----------------------------------------------------------------------------------


def vm_state(value, path: str) -> str:
    return D.choice(value, path, S.VM_STATES)


def vm_node(value, path: str) -> str:
    """A VM's ``node`` or ``lastnode``: a node name, or "" (none)."""
    found = D.text(value, path, max_bytes=256)
    return "" if found == "" else D.node_name(found, path)


def failed_reason(value, path: str) -> str:
    return D.text(value, path, max_bytes=MAX_REASON_BYTES)


def domain_xml(value, path: str):
    """A VM's ``xml``: a libvirt domain XML document of at most MAX_XML_BYTES, parsed
    (``_domain_xml.DomainInfo``). Its policy (what a cluster VM may contain) is checked apart,
    by ``_domain_policy``, where the operator's allowlist is known."""
    document = D.text(value, path, max_bytes=D.MAX_XML_BYTES)
    try:
        return parse_domain_xml(document)
    except DomainXMLError as exc:
        raise D.Invalid(path, f"a libvirt domain XML document ({exc})", value) from None


def flush_halted(value, path: str) -> str:
    """A node's ``flush_halted``: why its daemon stopped a running flush (text)."""
    return D.text(value, path, max_bytes=MAX_REASON_BYTES)


def recovery_n1(value, path: str) -> str:
    """A node's ``recovery_n1``: the n-1 verdict of the last HA recovery its daemon made that left
    the cluster failing the check (text)."""
    return D.text(value, path, max_bytes=MAX_REASON_BYTES)


def vm_stats(value, path: str) -> dict:
    """A running VM's ``stats``: a small JSON object of figures ("" or missing: none yet)."""
    if value is None or value == "":
        return {}
    return D.json_object(value, path, max_bytes=MAX_STATS_BYTES, max_depth=MAX_STATS_DEPTH)


# ---- fields inside JSON values ----------------------------------------------------------------


def _text_field(data: dict, name: str, path: str, *, optional: bool = False, max_bytes: int = 256):
    """A text field of a JSON object (None when ``optional`` and null or absent)."""
    if data.get(name) is None:
        if optional:
            return None
        raise D.Invalid(path, "text", field=name)
    value = data[name]
    if not isinstance(value, str):
        raise D.Invalid(path, "text" + (" or null" if optional else ""), value, field=name)
    try:
        return D.text(value, path, max_bytes=max_bytes)
    except D.Invalid as exc:
        raise exc.in_field(name) from None


def _field(decoder, data: dict, name: str, path: str, *, optional: bool = False, **bounds):
    """``decoder`` applied to a text field of a JSON object; the Invalid names the field.
    ``optional``: null or absent reads as None."""
    value = _text_field(data, name, path, optional=optional, max_bytes=4096)
    if value is None:
        return None
    try:
        return decoder(value, path, **bounds)
    except D.Invalid as exc:
        raise exc.in_field(name) from None


def _bool_field(data: dict, name: str, path: str) -> bool:
    value = data.get(name, False)
    if not isinstance(value, bool):
        raise D.Invalid(path, "true or false", value, field=name)
    return value


def _int_field(data: dict, name: str, path: str, minimum: int, maximum: int) -> int:
    value = data.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise D.Invalid(path, f"an integer from {minimum} to {maximum}", value, field=name)
    return value


def _time(value, path: str, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise D.Invalid(path, "a unix time", value, field=name)
    return float(value)


def _steps(data: dict, path: str, names) -> dict[str, float]:
    value = data.get("steps", {})
    if not isinstance(value, dict):
        raise D.Invalid(path, "an object of step names and unix times", value, field="steps")
    for name in value:
        if name not in names:
            raise D.Invalid(path, "a step name (" + ", ".join(names) + ")", name, field="steps")
    return {name: _time(when, path, f"steps.{name}") for name, when in value.items()}


# ---- the migration record ---------------------------------------------------------------------


@dataclass(frozen=True)
class MigrationRecord:
    """The in-flight migration of one VM, ``/domains/<uuid>/runtime/migration`` (docs/migration-protocol.md).

    Decoded only by :meth:`from_json`, which checks every field and that ``vm`` is the UUID of
    the key it was read from; written only as :meth:`to_json`. ``starting_on`` is the target's
    claim before it starts a shut-down VM (None until then).
    """

    id: str
    vm: str
    kind: str
    source: str
    target: str
    method: str
    memory_mib: int
    step: str
    name: str = ""
    force_live: bool = False
    prev_lastnode: str = ""
    requester: str = ""
    method_used: str | None = None
    fallback_reason: str | None = None
    reason: str | None = None
    steps: dict = field(default_factory=dict, hash=False)
    starting_on: str | None = None

    @classmethod
    def from_json(cls, value, path: str, uuid: str | None = None) -> MigrationRecord:
        """Decode the stored record at ``path``; ``uuid``: the VM's UUID from the key, which
        ``vm`` must equal. Raises Invalid naming the field at fault."""
        data = D.json_object(value, path, max_bytes=MAX_RECORD_BYTES, max_depth=MAX_RECORD_DEPTH)
        return cls.from_dict(data, path, uuid)

    @classmethod
    def from_dict(cls, data: dict, path: str, uuid: str | None = None) -> MigrationRecord:
        record_id = _text_field(data, "id", path, max_bytes=64)
        if not _RECORD_ID.fullmatch(record_id):
            raise D.Invalid(path, "a record id of 1 to 64 letters, digits, '_' or '-'", record_id, field="id")
        vm = _field(D.uuid, data, "vm", path)
        if uuid is not None and vm != uuid:
            raise D.Invalid(path, f"the UUID of its key ({uuid})", vm, field="vm")
        source = _field(D.node_name, data, "source", path)
        target = _field(D.node_name, data, "target", path)
        if source == target:
            raise D.Invalid(path, f"another node than the source {source}", target, field="target")
        starting_on = _field(D.node_name, data, "starting_on", path, optional=True)
        if starting_on not in (None, target):
            raise D.Invalid(
                path, f"the target {target} (only the target claims a start)", starting_on, field="starting_on"
            )
        return cls(
            id=record_id,
            vm=vm,
            kind=_field(D.choice, data, "kind", path, choices=KINDS),
            source=source,
            target=target,
            method=_field(D.choice, data, "method", path, choices=RECORD_METHODS),
            memory_mib=_int_field(data, "memory_mib", path, 1, D.MAX_MIB),
            step=_field(D.choice, data, "step", path, choices=STEPS),
            # name, prev_lastnode and requester: "" when absent (records of older daemons)
            name=(_field(D.vm_name, data, "name", path, optional=True) or "") if data.get("name") != "" else "",
            force_live=_bool_field(data, "force_live", path),
            prev_lastnode=_field(vm_node, data, "prev_lastnode", path, optional=True) or "",
            requester=_text_field(data, "requester", path, optional=True) or "",
            method_used=_field(D.choice, data, "method_used", path, optional=True, choices=METHODS_USED),
            fallback_reason=_text_field(data, "fallback_reason", path, optional=True, max_bytes=MAX_REASON_BYTES),
            reason=_text_field(data, "reason", path, optional=True, max_bytes=MAX_REASON_BYTES),
            steps=_steps(data, path, STEPS),
            starting_on=starting_on,
        )

    def to_dict(self) -> dict:
        data = asdict(self)
        if data["starting_on"] is None:
            del data["starting_on"]
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def at_step(self, step: str, when: float, **fields) -> MigrationRecord:
        """This record moved on to ``step`` at unix time ``when``, with other ``fields`` changed."""
        return replace(self, step=step, steps={**self.steps, step: round(when, 3)}, **fields)

    def describe(self) -> str:
        """One line for logs and messages."""
        return f"migration {self.id} of {self.name or self.vm} from {self.source} to {self.target} (step {self.step})"


def migration_record(value, path: str, uuid: str) -> MigrationRecord:
    """The decoder of ``/domains/<uuid>/runtime/migration`` (see :class:`MigrationRecord`)."""
    return MigrationRecord.from_json(value, path, uuid)


# ---- the runtime state of a VM ----------------------------------------------------------------

# A znode version is a signed 32-bit integer in ZooKeeper.
MAX_ZNODE_VERSION = 2**31 - 1


@dataclass(frozen=True)
class RunState:
    """What the node daemons did with a VM's desired state, ``/domains/<uuid>/runtime/runstate``.

    Only the operator writes a VM's desired ``state``; a daemon that moves the VM to another
    state (a restart done is ``start``, a shutdown ended is ``stop``, a start that failed is
    ``fail``, a flush shuts down a VM that fits nowhere and starts it again on ready) writes this
    record instead, naming the version of ``state`` it applies to (``desired_version``). A newer
    operator's write of ``state`` (a new version, even of the same value) makes it stale: see
    :func:`effective_state`.

    ``autostart``: a flush shut the VM down; the ready of its node starts it again (valid with the
    record, for the same version of ``state``). ``autostart_used``: the version of the operator's
    ``meta/node_autostart`` that a ready has already acted on (-1: none), so that the flag starts
    the VM once per time the operator sets it; kept across records.
    """

    state: str
    desired_version: int
    by: str = ""
    at: float = 0.0
    autostart: bool = False
    autostart_used: int = -1

    @classmethod
    def from_json(cls, value, path: str) -> RunState:
        data = D.json_object(value, path, max_bytes=MAX_RECORD_BYTES, max_depth=1)
        return cls(
            state=_field(D.choice, data, "state", path, choices=S.VM_STATES),
            desired_version=_int_field(data, "desired_version", path, 0, MAX_ZNODE_VERSION),
            by=(_field(D.node_name, data, "by", path, optional=True) or "") if data.get("by") != "" else "",
            at=_time(data.get("at", 0), path, "at"),
            autostart=_bool_field(data, "autostart", path),
            autostart_used=(
                _int_field(data, "autostart_used", path, -1, MAX_ZNODE_VERSION) if "autostart_used" in data else -1
            ),
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    def applies_to(self, desired_version: int) -> bool:
        return self.desired_version == desired_version


def runstate_after(
    current: RunState | None,
    state: str,
    desired_version: int,
    by: str,
    at: float,
    autostart: bool | None = None,
    autostart_used: int | None = None,
) -> RunState:
    """The record after a daemon moved the VM to ``state`` for that version of ``state``, from
    the ``current`` one (None: none, or not valid): ``autostart`` is kept while the record stays
    for the same version (unless given), ``autostart_used`` always (unless given)."""
    if autostart is None:
        autostart = current is not None and current.autostart and current.applies_to(desired_version)
    if autostart_used is None:
        autostart_used = current.autostart_used if current is not None else -1
    return RunState(
        state=state,
        desired_version=desired_version,
        by=by,
        at=round(at, 3),
        autostart=autostart,
        autostart_used=autostart_used,
    )


def runstate(value, path: str) -> RunState | None:
    """The decoder of ``runtime/runstate`` (None or "": none)."""
    if value is None or value == "":
        return None
    return RunState.from_json(value, path)


def effective_state(desired: str, desired_version: int, record: RunState | None) -> str:
    """A VM's state: the daemons' record while it names the version of ``state`` that is stored
    (nobody wrote ``state`` since), else the operator's desired state."""
    if record is not None and desired_version >= 0 and record.applies_to(desired_version):
        return record.state
    return desired


# ---- audit records ----------------------------------------------------------------------------

# The downtime a guest saw at a live migration's switch-over is not known to the daemons (they
# cannot read a guest's console): a measurement outside them adds it to the audit record
# afterwards (``_cluster.record_guest_downtime``), with what measured it.
GUEST_DOWNTIME_MS = "guest_downtime_ms"
GUEST_DOWNTIME_BY = "guest_downtime_by"
# A switch-over that froze the guest longer than an hour is not a live migration's.
MAX_GUEST_DOWNTIME_MS = 3_600_000.0
MAX_MEASURED_BY_BYTES = 256


def guest_downtime_ms(value, path: str) -> float:
    """A guest-seen downtime in milliseconds: a finite number from 0 to MAX_GUEST_DOWNTIME_MS."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or not 0 <= value <= MAX_GUEST_DOWNTIME_MS
    ):
        raise D.Invalid(
            path, f"a number of milliseconds from 0 to {MAX_GUEST_DOWNTIME_MS:g}", value, field=GUEST_DOWNTIME_MS
        )
    return round(float(value), 1)


def guest_downtime_fields(downtime_ms, measured_by: str, path: str = "guest downtime") -> dict:
    """The fields a measurement adds to an audit record, checked: ``downtime_ms`` as
    guest_downtime_ms accepts it, ``measured_by`` a short text naming the measurement."""
    by = measured_by if isinstance(measured_by, str) else None
    if not by or not by.strip() or len(by.encode("utf-8")) > MAX_MEASURED_BY_BYTES:
        raise D.Invalid(
            path,
            f"a text of 1 to {MAX_MEASURED_BY_BYTES} bytes naming the measurement",
            measured_by,
            field=GUEST_DOWNTIME_BY,
        )
    return {GUEST_DOWNTIME_MS: guest_downtime_ms(downtime_ms, path), GUEST_DOWNTIME_BY: by.strip()}


def history_entry(value, path: str, uuid: str) -> dict:
    """An audit record, ``/domains/<uuid>/runtime/history/<key>``: a finished migration record (no
    ``step``) with its ``result`` and ``duration_s``, or (``kind`` recovery) the record of a VM
    started elsewhere after its node was fenced (:func:`recovery_entry`). Returned as a plain dict of the known
    fields (for reports), every one of them checked."""
    data = D.json_object(value, path, max_bytes=MAX_RECORD_BYTES, max_depth=MAX_RECORD_DEPTH)
    if data.get("kind") == RECOVERY_KIND:
        return recovery_entry(data, path, uuid)
    result = _field(D.choice, data, "result", path, choices=RESULTS)
    steps = _steps(data, path, STEPS + RESULTS)
    last_step = max((name for name in steps if name in STEPS), key=STEPS.index, default=STEP_REQUESTED)
    record = MigrationRecord.from_dict({**data, "step": last_step, "steps": {}}, path, uuid)
    duration = data.get("duration_s", 0)
    entry = record.to_dict()
    del entry["step"]
    entry.update(result=result, steps=steps, duration_s=_time(duration, path, "duration_s"))
    # the downtime the guest saw, added afterwards by whoever could measure it (see
    # guest_downtime_fields): both or neither
    if data.get(GUEST_DOWNTIME_MS) is not None or data.get(GUEST_DOWNTIME_BY) is not None:
        entry[GUEST_DOWNTIME_MS] = guest_downtime_ms(data.get(GUEST_DOWNTIME_MS), path)
        entry[GUEST_DOWNTIME_BY] = _text_field(data, GUEST_DOWNTIME_BY, path, max_bytes=MAX_MEASURED_BY_BYTES)
    return entry


# ---- high availability: the fence record and the recovery audit record ----------------------

FENCE_METHODS = ("ipmi", "agent", "operator", "none")
# dead: a peer's verdict that the node's keepalives stopped (no fence yet); the others as their
# daemon states (_schema.FENCE_STATES)
FENCE_RESULTS = ("dead", "fencing", "fenced", "fence-failed")
# The highest version of a znode ZooKeeper keeps (a signed 32-bit integer).
MAX_ZNODE_VERSION = 2**31 - 1
RECOVERY_KIND = "recovery"
RECOVERY_STEPS = ("fencing", "fenced", "recovered")


def maintenance(value, path: str) -> bool:
    """A node's ``maintenance`` flag: "true" or "false" (missing: false)."""
    if value is None:
        return False
    return D.choice(value, path, ("true", "false")) == "true"


def fence_record(value, path: str) -> dict:
    """``/nodes/<node>/fence``: who fenced the node, how, when, with what result (None or "":
    never fenced, an empty dict). Every field checked; returned as a plain dict for reports."""
    if value is None or value == "":
        return {}
    data = D.json_object(value, path, max_bytes=MAX_RECORD_BYTES, max_depth=MAX_RECORD_DEPTH)
    record = {
        "by": _field(D.node_name, data, "by", path),
        "method": _field(D.choice, data, "method", path, choices=FENCE_METHODS),
        "result": _field(D.choice, data, "result", path, choices=FENCE_RESULTS),
        "started": _time(data.get("started"), path, "started"),
    }
    for name in ("device", "detail"):
        text = _text_field(data, name, path, optional=True, max_bytes=MAX_REASON_BYTES)
        if text is not None:
            record[name] = text
    for name in ("finished", "duration_s"):
        if data.get(name) is not None:
            record[name] = _time(data[name], path, name)
    if data.get("version") is not None:
        # the version of the node's own daemon_state this verdict judged (a peer's record)
        record["version"] = _int_field(data, "version", path, 0, MAX_ZNODE_VERSION)
    return record


def latest_fence_record(found, problems: list | None = None) -> dict:
    """A node's fence record: of the records found about it (``found``: (path, stored text or
    None) pairs: its own ``fence``, an operator's or an older daemon's, and each peer's
    ``fences/<node>``), the valid one that started last; {} when there is none. An invalid
    one is left out and added to ``problems``."""
    latest: dict = {}
    for path, value in found:
        try:
            record = fence_record(value, path)
        except D.Invalid as exc:
            if problems is not None:
                problems.append(exc)
            continue
        if record and record["result"] != "dead" and (not latest or record["started"] >= latest["started"]):
            latest = record  # a dead verdict is no fence: the fence record is the last fence's
    return latest


def noted_verdict(note, version: int) -> str:
    """The verdict a node's ``claims`` container notes about the version ``version`` of its
    daemon_state ("" when none, or not about that version). The note is written by the shared
    node identity with every verdict; it is never what a node's state is (that is the verdicts
    under each peer's own keys, :func:`node_state`), only a cheap sign that a verdict was written,
    for a decision that must be conservative: a target taking a VM, a source handing one over.
    A note that is not valid reads as none (its version is still checked)."""
    if not note:
        return ""
    try:
        data = D.json_object(note, "claims", max_bytes=4096, max_depth=2)
    except D.Invalid:
        return ""
    result = data.get("result")
    if data.get("version") == version and result in S.FENCE_STATES:
        return str(result)
    return ""


@dataclass(frozen=True)
class NodeState:
    """A node's state as everyone reads it (:func:`node_state`).

    ``daemon_state``/``domain_state``: the effective states; ``own_state``: the node's own
    ``daemon_state`` as stored (written by the node, or an operator's confirm_down, or an older
    daemon's peer), ``version`` its znode version (-1: none); ``verdict``: the peer's record that
    decides the daemon state ({}: the node's own state decides); ``claimed``: a claim of
    ``version`` exists (a peer fences, or fenced, the node at this version)."""

    daemon_state: str
    domain_state: str
    own_state: str
    version: int = -1
    verdict: dict = field(default_factory=dict)
    claimed: bool = False

    @property
    def by_verdict(self) -> bool:
        return bool(self.verdict)


def node_state(own_state: str, version: int, domain_state: str, claims, verdicts) -> NodeState:
    """The one combination of a node's own state and its peers' verdicts (docs/high-availability.md).

    ``own_state``/``version``: the node's ``daemon_state`` and its znode version; ``claims``: the
    names of the node's ``claims/`` children (versions); ``verdicts``: the decoded records of its
    peers (``fences/<node>`` of each, see :func:`fence_record`), any number, valid ones only.

    * An own ``fenced`` (an operator's confirm_down) decides; another own fence state (an older
      daemon's peer wrote it) counts as one more verdict about its version.
    * Else a peer's verdict decides when it names the version the node's state has now (a node
      that wrote its state since has answered every older verdict: stale-proof), and, for
      ``fencing``, ``fenced`` and ``fence-failed``, when that version is claimed (a peer fences
      only in the transaction that claims it; a record outliving the node's keys decides
      nothing). Of several, the strongest (``_schema.FENCE_STATES``: fenced over fence-failed
      over fencing over dead): a hand-over writes a second record about the same version.
    * A node fenced by a verdict is ``flushed`` (nothing of it should run, and ``ready`` brings its
      VMs home); it writes that itself when its daemon starts again.
    """
    claimed = version >= 0 and str(version) in set(claims or ())
    if own_state == "fenced" or version < 0:
        return NodeState(own_state, domain_state, own_state, version, {}, claimed)
    # an own fence state (an older daemon's peer wrote it) is one more verdict, the weakest of equals
    best: dict = {"result": own_state, "version": version} if own_state in S.FENCE_STATES else {}
    for record in verdicts:
        result = record.get("result")
        if record.get("version") != version or result not in S.FENCE_STATES:
            continue
        if result != "dead" and not claimed:
            continue
        if not best or S.FENCE_STATES.index(result) > S.FENCE_STATES.index(best["result"]):
            best = record
    if not best or "by" not in best:
        return NodeState(own_state, domain_state, own_state, version, {}, claimed)
    domain = "flushed" if best["result"] == "fenced" else domain_state
    return NodeState(best["result"], domain, own_state, version, best, claimed)


def recovery_entry(data: dict, path: str, uuid: str) -> dict:
    """An audit record of a VM started elsewhere after its node was fenced (ha.py writes it)."""
    record_id = _text_field(data, "id", path, max_bytes=64)
    if not _RECORD_ID.fullmatch(record_id):
        raise D.Invalid(path, "a record id of 1 to 64 letters, digits, '_' or '-'", record_id, field="id")
    vm = _field(D.uuid, data, "vm", path)
    if vm != uuid:
        raise D.Invalid(path, f"the UUID of its key ({uuid})", vm, field="vm")
    fence = data.get("fence", {})
    if not isinstance(fence, dict):
        raise D.Invalid(path, "an object", fence, field="fence")
    entry = {
        "kind": RECOVERY_KIND,
        "id": record_id,
        "vm": vm,
        "name": (_field(D.vm_name, data, "name", path, optional=True) or "") if data.get("name") != "" else "",
        "source": _field(D.node_name, data, "source", path),
        "target": _field(D.node_name, data, "target", path),
        "lastnode": _field(vm_node, data, "lastnode", path, optional=True) or "",
        "requester": _field(D.node_name, data, "requester", path),
        "result": _field(D.choice, data, "result", path, choices=("recovered",)),
        "memory_mib": _int_field(data, "memory_mib", path, 0, D.MAX_MIB),
        "fence": {
            "method": _field(D.choice, fence, "method", path + " fence", optional=True, choices=FENCE_METHODS),
            "device": _text_field(fence, "device", path + " fence", optional=True),
            "by": _field(D.node_name, fence, "by", path + " fence", optional=True),
            "detail": _text_field(fence, "detail", path + " fence", optional=True, max_bytes=MAX_REASON_BYTES),
        },
        "steps": _steps(data, path, RECOVERY_STEPS),
        "duration_s": _time(data.get("duration_s", 0), path, "duration_s"),
    }
    # the n-1 verdict of the cluster after the recovery pass (never a reason to refuse one)
    n1 = data.get("n1")
    if n1 is not None:
        if not isinstance(n1, dict):
            raise D.Invalid(path, "an object", n1, field="n1")
        entry["n1"] = {
            "ok": _field(D.boolean, n1, "ok", path + " n1"),
            "require_n1": _field(D.boolean, n1, "require_n1", path + " n1"),
            "detail": _text_field(n1, "detail", path + " n1", optional=True, max_bytes=MAX_REASON_BYTES) or "",
        }
    return entry


# ---- one VM's keys, as a table (for readers that decode whatever they read) --------------------

NODE_KEY_DECODERS = {
    S.NODE_DAEMON_STATE: daemon_state,
    S.NODE_DOMAIN_STATE: domain_state,
    S.NODE_RUNNINGDOMAINS: running_domains,
    S.NODE_KEEPALIVE: keepalive,
    S.NODE_MAINTENANCE: maintenance,
    S.NODE_FENCE: fence_record,
    S.NODE_FLUSH_HALTED: flush_halted,
    S.NODE_RECOVERY_N1: recovery_n1,
}

VM_KEY_DECODERS = {
    S.DOMAIN_STATE: vm_state,
    S.DOMAIN_NODE: vm_node,
    S.DOMAIN_LASTNODE: vm_node,
    S.DOMAIN_FAILEDREASON: failed_reason,
    S.DOMAIN_STATS: vm_stats,
    S.DOMAIN_RUNSTATE: runstate,
}
