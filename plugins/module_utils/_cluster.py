# -*- coding: utf-8 -*-
# Copyright: pvc.cluster developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
#
# PRIVATE: this module is internal to the pvc.cluster collection and its node daemon.
# It may change without notice; do not import it from other collections.
"""Typed reads of the cluster from the store, shared by the modules, the inventory and the daemon."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field, replace

from . import _schema as S
from . import _records as R
from ._decode import Invalid, json_object, or_default, vm_name
from ._meta import VMMeta
from ._records import MigrationRecord, RunState
from ._selector import NodeView
from ._store import ConflictError, MissingError, StoreError, digest_id
from ._store import text_of as _text

HISTORY_SHOWN = 5


def _default_meta() -> VMMeta:
    return VMMeta.from_store({})


@dataclass(frozen=True)
class VMRecord:
    """One VM as ZooKeeper records it (state, placement, meta, in-flight migration).

    ``state`` is the VM's state as the operator's desired ``state`` and the daemons' ``runstate``
    record make it (_records.effective_state); ``desired_state`` is the operator's value alone.

    The one record of a VM for the modules, the inventory and the node daemon: ``vm_from`` makes
    it from one read of every key; the daemon's watch-fed table (node_daemon/domains.py) builds it
    one key at a time as each key's watch answers, and ``loaded`` names the keys answered so far
    (whether or not they exist), ``present`` those of them that exist (both empty in a record made
    by ``vm_from``, which reads every key at once)."""

    uuid: str
    name: str = ""
    state: str = ""
    node: str = ""
    lastnode: str = ""
    xml: str = ""
    meta: VMMeta = field(default_factory=_default_meta)
    memory_mib: int = 0  # the configured maximum, from the XML (0 when it is not valid)
    vcpus: int = 0
    failedreason: str = ""
    node_version: int = -1  # the znode version of ``node`` (guards requests made from the record)
    migration: MigrationRecord | None = None  # the in-flight migration, when its record is valid
    migration_version: int = -1  # the record's version, valid or not (-1: no record)
    migration_error: str = ""  # why the record that exists is not valid
    xml_error: str = ""  # why the XML is not valid (for the daemon: or refused by its domain XML policy)
    # why the VM's state or node is not valid (set by the daemon's table: then it leaves the VM alone)
    state_error: str = ""
    node_error: str = ""
    loaded: frozenset[str] = frozenset()
    present: frozenset[str] = frozenset()
    stats: dict = field(default_factory=dict)
    # every stored value of the VM that is not valid (the XML, the migration record and the
    # meta included), each naming its key; such a value reads as its default
    invalid: tuple = ()
    desired_state: str = ""
    state_version: int = -1  # the version of the operator's ``state`` (-1: none)
    runstate: RunState | None = None  # the daemons' record (None: none, or not valid)
    runstate_version: int = -1  # its version, valid or not (-1: no record)
    autostart_meta_version: int = -1  # the version of meta/node_autostart (-1: not set)

    @property
    def home(self) -> str:
        """The node the VM returns to on unmigrate: its lastnode when moved temporarily."""
        return self.lastnode or self.node

    @property
    def migration_source(self) -> str | None:
        """The source of the in-flight migration (None when there is no valid record)."""
        return self.migration.source if self.migration else None

    @property
    def migration_target(self) -> str | None:
        return self.migration.target if self.migration else None

    @property
    def xml_ok(self) -> bool:
        return not self.xml_error

    @property
    def left_alone(self) -> str:
        """Why the daemon leaves the VM alone (its migration record, state or node is not
        valid), or ""."""
        return self.migration_error or self.state_error or self.node_error

    def has(self, *keys: str) -> bool:
        """True when every key has been read (whether or not it exists): see ``loaded``."""
        return all(key in self.loaded for key in keys)

    @property
    def autostart(self) -> bool:
        """Whether the ready of its node starts the VM: a flush shut it down (the runstate
        record of the current desired state says so), or the operator's meta node_autostart is
        set and no ready has acted on that setting yet."""
        record = self.runstate
        if record is not None and record.autostart and record.applies_to(self.state_version):
            return True
        used = record.autostart_used if record is not None else -1
        return bool(self.meta.node_autostart) and self.autostart_meta_version != used


def reservation_mib(text: str | None, path: str, problems: list) -> int:
    """An incoming-migration reservation in MiB; an invalid one reads as 0 and is added to
    ``problems`` (it cannot hold a node's memory hostage, and the report shows it)."""
    return or_default(R.reservation, text, path, 0, problems)


def node_names(store) -> list[str]:
    return store.list_children(store.schema.nodes(), missing_ok=True)


def read_running(store, node: str, problems: list | None = None) -> tuple[str, ...]:
    """The VMs ``node`` reports running (its ``runningdomains``); none when the key is missing
    or not valid (then added to ``problems``)."""
    path = store.schema.node_key(node, S.NODE_RUNNINGDOMAINS)
    return or_default(R.running_domains, store.find_text(path), path, (), [] if problems is None else problems)


# the node keys read_nodes_raw reads: every key a node has, and the ones it has only at times
NODE_READ_KEYS = (*S.NODE_DEFAULTS, S.NODE_FLUSH_HALTED, S.NODE_RECOVERY_N1)


def read_nodes_raw(
    store, names, problems: dict | None = None, everyone=None
) -> dict[str, tuple[dict, dict[str, int], bool]]:
    """For every existing node of ``names``: (every NODE_READ_KEYS key as stored, None when
    absent, its in-flight incoming-migration reservations as VM uuid -> MiB, whether it is
    alive), in two rounds of
    parallel reads (the keys, liveness, reservation and claims lists, and the list of every node
    unless ``everyone`` gives it; then the reservations and every peer's fence record about each).
    Reservations that are not valid read as 0 MiB and are added to ``problems[node]``
    (optional)."""
    problems = {} if problems is None else problems
    schema = store.schema
    names = list(names)
    if not names:
        return {}
    keys = {name: {key: schema.node_key(name, key) for key in NODE_READ_KEYS} for name in names}
    paths = [
        path
        for name in names
        for path in [schema.node_key(name, S.NODE_DAEMON_STATE), schema.node(name), schema.node_key(name, S.NODE_ALIVE)]
        + list(keys[name].values())
    ]
    lists = [schema.node_reservations(name) for name in names] + [schema.node_claims(name) for name in names]
    found, listed = store.get_round(list(dict.fromkeys(paths)), lists + ([schema.nodes()] if everyone is None else []))
    # whoever may have fenced one of them
    everyone = list(listed.get(schema.nodes()) or []) if everyone is None else list(everyone)
    fences = {name: fence_record_paths(schema, name, everyone) for name in names}
    reserved = {name: listed[schema.node_reservations(name)] or [] for name in names}
    later = store.get_many(
        [schema.node_reservation(name, uuid) for name in names for uuid in reserved[name]]
        + [path for name in names for path in fences[name]]
    )
    found = {**found, **later}
    result = {}
    for name in names:
        if found[schema.node(name)] is None:
            continue
        raw = {key: (found[path][0] if found[path] else None) for key, path in keys[name].items()}
        state = state_from(schema, name, found, listed, everyone)  # its problems: reported as the keys' below
        raw[S.NODE_DAEMON_STATE], raw[S.NODE_DOMAIN_STATE] = _effective_raw(state, raw)
        # the node's fence record: the latest of its own and its peers' (decoded again by the reports)
        fence = R.latest_fence_record(
            [(path, _text(found[path])) for path in fences[name]], problems.setdefault(name, [])
        )
        raw[S.NODE_FENCE] = json.dumps(fence) if fence else None
        reservations = {
            uuid: reservation_mib(
                found[schema.node_reservation(name, uuid)].value,
                schema.node_reservation(name, uuid),
                problems.setdefault(name, []),
            )
            for uuid in reserved[name]
            if found[schema.node_reservation(name, uuid)]
        }
        result[name] = (raw, reservations, found[schema.node_key(name, S.NODE_ALIVE)] is not None)
    return result


def fence_record_paths(schema, node: str, names) -> list[str]:
    """Where ``node``'s fence records may be: its own ``fence`` (an operator's confirm_down, or
    an older daemon's record) and the ``fences/<node>`` of each other node of ``names``."""
    return [schema.node_key(node, S.NODE_FENCE)] + verdict_paths(schema, node, names)


def verdict_paths(schema, node: str, names) -> list[str]:
    """Where the verdicts of ``node``'s peers about it are: ``fences/<node>`` of each other node
    of ``names``."""
    return [schema.node_fence_record(other, node) for other in names if other != node]


def node_state_paths(schema, node: str) -> tuple[list[str], list[str]]:
    """What ``state_from`` needs of ``node`` but its peers' verdicts: (keys to read, containers
    to list), in this order in one round (``get_round_zxids``: its own ``daemon_state`` is read
    before its claims container is listed; see ``verdicts_may_decide``)."""
    return [schema.node_key(node, S.NODE_DAEMON_STATE), schema.node_key(node, S.NODE_DOMAIN_STATE)], [
        schema.node_claims(node)
    ]


def verdicts_may_decide(schema, node: str, found: dict, zxids: dict) -> bool:
    """Whether a verdict about ``node`` may name the version its ``daemon_state`` has in
    ``found``, from the zxids (``get_round_zxids``) of the round that read ``node_state_paths``.

    Every verdict is written with a note in the node's claims container, in one transaction
    checked against the version of the state it judges and never writing the state
    (node_daemon/ha.py, ``_verdict_writes``): a verdict about the current version was written
    after the state got that version, and left the container's data a higher zxid than the
    state's. A container last written no later than the state (before it, or with it: the
    daemon's registration makes both) holds no note of such a verdict, so there is none, and the
    peers' records need not be read (a record about an older version never decides:
    _records.node_state).
    The container is listed after the state is read, so a verdict written between the two is seen.
    Without a state, no verdict counts; without a zxid for either (no container, or a store that
    gives none), the verdicts are read."""
    state_path = schema.node_key(node, S.NODE_DAEMON_STATE)
    if found.get(state_path) is None:
        return False
    state_zxid, claims_zxid = zxids.get(state_path), zxids.get(schema.node_claims(node))
    return state_zxid is None or claims_zxid is None or claims_zxid > state_zxid


def state_from(schema, node: str, found: dict, listed: dict, names, problems: list | None = None) -> R.NodeState:
    """``node``'s state (_records.node_state) from the answers of a read of
    ``node_state_paths(schema, node)`` and of the ``verdict_paths(schema, node, names)`` that
    ``verdicts_may_decide`` asks for (a verdict not in ``found`` counts as none). An own state
    that is not valid reads as "invalid" (added to ``problems``), a verdict that is not valid is
    left out (likewise)."""
    problems = [] if problems is None else problems
    own_path, domain_path = schema.node_key(node, S.NODE_DAEMON_STATE), schema.node_key(node, S.NODE_DOMAIN_STATE)
    own = found.get(own_path)
    own_state = or_default(R.daemon_state, own[0] if own else None, own_path, "invalid", problems) if own else ""
    domain = found.get(domain_path)
    domain_state = or_default(R.domain_state, domain[0], domain_path, "invalid", problems) if domain else ""
    verdicts = []
    for other in names:
        if other == node:
            continue
        path = schema.node_fence_record(other, node)
        answer = found.get(path)
        if not answer:
            continue
        try:
            record = R.fence_record(answer[0], path)
        except Invalid as exc:
            problems.append(exc)
            continue
        if record and record["by"] == other:  # a record names its own writer
            verdicts.append(record)
    return R.node_state(own_state, own[1] if own else -1, domain_state, listed.get(schema.node_claims(node)), verdicts)


def _effective_raw(state: R.NodeState, raw: dict) -> tuple:
    """The daemon and domain state a raw node dict shows: as stored, unless a verdict decides."""
    if not state.by_verdict:
        return raw.get(S.NODE_DAEMON_STATE), raw.get(S.NODE_DOMAIN_STATE)
    return state.daemon_state, state.domain_state


def read_node_states(store, names=None, problems: dict | None = None, everyone=None) -> dict[str, R.NodeState]:
    """The state of each node of ``names`` (default: every node) as everyone reads it: its own
    ``daemon_state`` combined with its peers' verdicts (_records.node_state). A node without a
    ``daemon_state`` is left out. The one reader of a node's state for the daemon (HA,
    migrations), the modules and the inventory (through read_nodes_raw and the node views).

    ``everyone``: the names of every node, whoever may have judged one of them, when the caller
    has just listed them (else they are listed in the first round, or before it when ``names``
    is not given). One round of reads (each node's state, domain state and claims), and a second
    only for the nodes whose peers' verdicts may decide (``verdicts_may_decide``): for each of
    them, every peer's verdict about it."""
    schema = store.schema
    if names is None and everyone is None:
        everyone = node_names(store)
    names = list(everyone if names is None else names)
    problems = {} if problems is None else problems
    found, listed = _judged_round(store, names, everyone)
    everyone = listed.get(schema.nodes()) or [] if everyone is None else everyone
    states = {}
    for name in names:
        if found.get(schema.node_key(name, S.NODE_DAEMON_STATE)) is None:
            continue
        states[name] = state_from(schema, name, found, listed, everyone, problems.setdefault(name, []))
    return states


def _judged_round(store, names, everyone, paths=(), lists=(), later=()) -> tuple[dict, dict]:
    """The reads of ``read_node_states`` with more keys and lists in its rounds: one round of
    ``paths``, each node's ``node_state_paths``, ``lists`` (and the list of every node, unless
    ``everyone`` gives it), then one of ``later`` (keys named by the first round's answers: a
    callable of (found, listed)) and the peers' verdicts about each node whose verdicts may
    decide (``verdicts_may_decide``), the second only when it has something to read. The answers
    of both, merged: ({path: Versioned or None}, {path: [names] or None})."""
    schema = store.schema
    paths, lists = list(paths), list(lists)
    for name in names:
        keys, containers = node_state_paths(schema, name)
        paths += keys
        lists += containers
    if everyone is None:
        lists.append(schema.nodes())
    found, listed, zxids = store.get_round_zxids(list(dict.fromkeys(paths)), list(dict.fromkeys(lists)))
    peers = listed.get(schema.nodes()) or [] if everyone is None else everyone
    second = list(later(found, listed)) if callable(later) else list(later)
    second += [
        path
        for name in names
        if verdicts_may_decide(schema, name, found, zxids)
        for path in verdict_paths(schema, name, peers)
    ]
    if second:
        found = {**found, **store.get_many(second)}
    return found, listed


def read_node_state(store, name: str) -> R.NodeState | None:
    return read_node_states(store, [name]).get(name)


def read_fence_record(store, node: str, problems: list | None = None, everyone=None) -> dict:
    """``node``'s fence record (_records.latest_fence_record; {} when never fenced), in one
    round of reads (after listing every node, unless ``everyone`` names them); an invalid record
    is left out and added to ``problems``."""
    paths = fence_record_paths(store.schema, node, node_names(store) if everyone is None else everyone)
    found = store.get_many(paths)
    return R.latest_fence_record([(path, _text(found[path])) for path in paths], problems)


def read_node_views_of(store, names, also=(), keys=NodeView.KEYS, everyone=None) -> tuple[dict[str, NodeView], dict]:
    """The views of the nodes ``names`` (missing nodes left out) and the keys ``also``, in two
    rounds of parallel reads: every node key, reservation list and ``also`` key (and, when the
    daemon state is among ``keys``, each node's claims and the list of every node, unless
    ``everyone`` gives it), then the reservations (and the peers' verdicts that may decide a
    node's state, read_node_states). ``also`` is read first: ZooKeeper answers one session's
    requests in order. ``keys``: the node keys to read (NodeView.FIT_KEYS for a fit check; the
    others read as 0). Returns (views, {path: (text, version) or None} for ``also``)."""
    schema = store.schema
    also, names = list(also), list(names)
    keys = {name: {key: schema.node_key(name, key) for key in keys} for name in names}
    paths = also + [path for name in names for path in [schema.node(name)] + list(keys[name].values())]
    lists = [schema.node_reservations(name) for name in names]

    def reservation_paths(_found, listed) -> list[str]:
        return [
            schema.node_reservation(name, uuid)
            for name in names
            for uuid in listed[schema.node_reservations(name)] or []
        ]

    # a node's daemon state is its own combined with its peers' verdicts (read_node_states)
    judged = S.NODE_DAEMON_STATE in keys.get(names[0], {}) if names else False
    if judged:
        found, listed = _judged_round(store, names, everyone, paths, lists, reservation_paths)
        everyone = listed.get(schema.nodes()) or [] if everyone is None else everyone
    else:
        found, listed = store.get_round(paths, lists)
        found = {**found, **store.get_many(reservation_paths(found, listed))}
    views = {}
    for name in names:
        if found[schema.node(name)] is None:
            continue
        raw = {key: _text(found[path]) for key, path in keys[name].items()}
        problems: list = []
        if judged:
            state = state_from(schema, name, found, listed, everyone)
            raw[S.NODE_DAEMON_STATE], raw[S.NODE_DOMAIN_STATE] = _effective_raw(state, raw)
        reserved_uuids = listed[schema.node_reservations(name)] or []
        reserved = sum(
            reservation_mib(
                found[schema.node_reservation(name, uuid)].value, schema.node_reservation(name, uuid), problems
            )
            for uuid in reserved_uuids
            if found[schema.node_reservation(name, uuid)]
        )
        view = NodeView.from_store(name, raw, reserved, prefix=schema.node(name) + "/")
        views[name] = replace(view, invalid=tuple(problems) + view.invalid) if problems else view
    return views, {path: found[path] for path in also}


def read_node_view(store, name: str) -> NodeView | None:
    return read_node_views_of(store, [name])[0].get(name)


def read_node_views(store) -> dict[str, NodeView]:
    everyone = node_names(store)
    return read_node_views_of(store, everyone, everyone=everyone)[0]


def vm_uuids(store) -> list[str]:
    return store.list_children(store.schema.domains(), missing_ok=True)


def find_vm(store, name_or_uuid: str) -> str | None:
    """The uuid of the VM with this uuid or name, or None."""
    candidates = vm_uuids(store)
    lowered = name_or_uuid.lower()
    if lowered in candidates:
        return lowered
    for uuid in candidates:
        if store.find_text(store.schema.domain(uuid)) == name_or_uuid:
            return uuid
    return None


def meta_paths(schema, uuid: str, keys=S.META_KEYS) -> list[str]:
    return [schema.domain_meta(uuid, key) for key in keys]


def meta_from(schema, uuid: str, found: dict, keys=S.META_KEYS) -> VMMeta:
    """A VM's meta from the answers of a read that included ``meta_paths(schema, uuid, keys)``."""
    return VMMeta.from_store({key: _text(found[schema.domain_meta(uuid, key)]) for key in keys})


_VM_KEYS = (
    S.DOMAIN_STATE,
    S.DOMAIN_NODE,
    S.DOMAIN_LASTNODE,
    S.DOMAIN_XML,
    S.DOMAIN_FAILEDREASON,
    S.DOMAIN_STATS,
    S.DOMAIN_RUNSTATE,
)


def vm_paths(schema, uuid: str) -> list[str]:
    """Every key read_vm reads."""
    return (
        [schema.domain(uuid), schema.domain_migration(uuid)]
        + [schema.domain_key(uuid, key) for key in _VM_KEYS]
        + meta_paths(schema, uuid)
    )


def read_vm(store, uuid: str) -> VMRecord | None:
    return vm_from(store.schema, uuid, store.get_many(vm_paths(store.schema, uuid)))


def read_vms(store, uuids) -> dict[str, VMRecord]:
    """read_vm of every VM of ``uuids`` (missing ones left out), in one round of parallel reads."""
    uuids = list(uuids)
    found = store.get_many([path for uuid in uuids for path in vm_paths(store.schema, uuid)])
    vms = {uuid: vm_from(store.schema, uuid, found) for uuid in uuids}
    return {uuid: vm for uuid, vm in vms.items() if vm is not None}


def vm_from(schema, uuid: str, found: dict) -> VMRecord | None:
    """A VM's record from the answers of a read that included ``vm_paths(schema, uuid)``.
    Every key is decoded by its decoder in _records; an invalid value reads as its default and
    is listed in ``invalid`` (the XML's and the record's problems also in ``xml_error`` and
    ``migration_error``)."""
    if found[schema.domain(uuid)] is None:
        return None
    problems: list[Invalid] = []

    def value(path: str):
        return _text(found[path])

    def key(name: str, fallback):
        path = schema.domain_key(uuid, name)
        return or_default(R.VM_KEY_DECODERS[name], value(path), path, fallback, problems)

    node = found[schema.domain_key(uuid, S.DOMAIN_NODE)]
    xml_path = schema.domain_key(uuid, S.DOMAIN_XML)
    xml = value(xml_path) or ""
    memory = vcpus = 0
    xml_error = ""
    try:
        info = R.domain_xml(xml, xml_path)
        memory, vcpus = info.memory_mib, info.vcpus
    except Invalid as exc:
        problems.append(exc)
        xml_error = str(exc)
    migration_path = schema.domain_migration(uuid)
    migration = found[migration_path]
    record = None
    migration_error = ""
    if migration is not None:
        try:
            record = R.migration_record(migration.value, migration_path, uuid)
        except Invalid as exc:
            problems.append(exc)
            migration_error = str(exc)
    meta = meta_from(schema, uuid, found)
    name = or_default(vm_name, value(schema.domain(uuid)), schema.domain(uuid), uuid, problems)
    desired, desired_answer = key(S.DOMAIN_STATE, ""), found[schema.domain_key(uuid, S.DOMAIN_STATE)]
    runstate = key(S.DOMAIN_RUNSTATE, None)
    runstate_answer = found[schema.domain_key(uuid, S.DOMAIN_RUNSTATE)]
    autostart_answer = found[schema.domain_meta(uuid, S.META_NODE_AUTOSTART)]
    return VMRecord(
        uuid=uuid,
        name=name,
        state=R.effective_state(desired, desired_answer.version if desired_answer else -1, runstate),
        desired_state=desired,
        state_version=desired_answer.version if desired_answer else -1,
        runstate=runstate,
        runstate_version=runstate_answer.version if runstate_answer else -1,
        autostart_meta_version=autostart_answer.version if autostart_answer else -1,
        node=key(S.DOMAIN_NODE, ""),
        lastnode=key(S.DOMAIN_LASTNODE, ""),
        xml=xml,
        meta=meta,
        memory_mib=memory,
        vcpus=vcpus,
        failedreason=key(S.DOMAIN_FAILEDREASON, ""),
        node_version=node.version if node else -1,
        migration=record,
        migration_version=migration.version if migration else -1,
        migration_error=migration_error,
        xml_error=xml_error,
        stats=key(S.DOMAIN_STATS, {}),
        invalid=tuple(problems),
    )


def read_vm_state(store, uuid: str) -> str | None:
    """A VM's state (the desired ``state`` and the daemons' ``runstate``, combined as
    read_vm does), or None when it has no ``state``."""
    state_path = store.schema.domain_key(uuid, S.DOMAIN_STATE)
    run_path = store.schema.domain_key(uuid, S.DOMAIN_RUNSTATE)
    found = store.get_many([state_path, run_path])
    state = found[state_path]
    if state is None:
        return None
    problems: list = []
    desired = or_default(R.vm_state, state.value, state_path, "", problems)
    record = or_default(R.runstate, _text(found[run_path]), run_path, None, problems)
    return R.effective_state(desired, state.version, record)


def move_runstate(
    store,
    uuid: str,
    state: str,
    by: str,
    *,
    expected: str | None = None,
    autostart: bool | None = None,
    use_autostart_meta: bool = False,
    also: dict | None = None,
    attempts: int = 3,
) -> bool:
    """A node daemon moved VM ``uuid`` to ``state`` (or is about to): write its runstate record
    for the version of the desired ``state`` read now, with ``also`` (more values) in the same
    transaction. ``expected``: only while the VM's state is that. ``autostart``: set or clear
    the flush's autostart (None: kept while the desired state is unchanged).
    ``use_autostart_meta``: record that the operator's meta node_autostart, as read now, has been
    acted on. Version-checked on the record (a concurrent change is read again, ``attempts``
    times). True when written; False when the VM has no state, is not in ``expected``, or kept
    changing. Raises StoreError when the store cannot be written."""
    schema = store.schema
    state_path = schema.domain_key(uuid, S.DOMAIN_STATE)
    run_path = schema.domain_key(uuid, S.DOMAIN_RUNSTATE)
    meta_path = schema.domain_meta(uuid, S.META_NODE_AUTOSTART)
    for _attempt in range(attempts):
        found = store.get_many([state_path, run_path, meta_path])
        desired = found[state_path]
        if desired is None:
            return False
        problems: list = []
        current = or_default(R.runstate, _text(found[run_path]), run_path, None, problems)
        now = R.effective_state(
            or_default(R.vm_state, desired.value, state_path, "", problems), desired.version, current
        )
        if expected is not None and now != expected:
            return False
        meta = found[meta_path]
        used = (meta.version if meta else -1) if use_autostart_meta else None
        record = R.runstate_after(current, state, desired.version, by, time.time(), autostart, used)
        values = {run_path: record.to_json(), **(also or {})}
        try:
            stored = found[run_path]
            if stored is None:
                store.commit(values, create=[run_path])
            else:
                store.commit(values, expect_versions={run_path: stored.version})
            return True
        except ConflictError:
            continue
    return False


def vm_definition(schema, uuid: str, name: str, xml: str, node: str, state: str, meta: dict | None = None) -> dict:
    """Every key of a newly defined VM, for one ``commit``: placement, state and the given meta.
    The meta and runtime containers are among them, so that the commit creates every key of the
    VM in its transaction (it would create a missing parent outside it)."""
    values = {
        schema.domain(uuid): name,
        schema.domain_key(uuid, S.DOMAIN_XML): xml,
        schema.domain_key(uuid, S.DOMAIN_NODE): node,
        schema.domain_key(uuid, S.DOMAIN_LASTNODE): "",
        schema.domain_key(uuid, S.DOMAIN_FAILEDREASON): "",
        schema.domain_key(uuid, S.DOMAIN_STATE): state,
        schema.domain_meta(uuid): "",
        schema.domain_runtime(uuid): "",
    }
    for key, value in (meta or {}).items():
        values[schema.domain_meta(uuid, key)] = value
    return values


def read_history(store, uuid: str, last: int = HISTORY_SHOWN, problems: list | None = None) -> list[dict]:
    """The last ``last`` finished migrations of a VM, oldest first, each decoded
    (_records.history_entry); an invalid one is left out and added to ``problems``."""
    path = store.schema.domain_history(uuid)
    entries = store.list_children(path, missing_ok=True)[-last:] if last else []
    found = store.get_many([f"{path}/{entry}" for entry in entries])
    problems = [] if problems is None else problems
    result = []
    for entry in entries:
        answer = found[f"{path}/{entry}"]
        if answer is None:
            continue  # pruned since it was listed
        try:
            result.append(R.history_entry(answer.value, f"{path}/{entry}", uuid))
        except Invalid as exc:
            problems.append(exc)
    return result


def record_guest_downtime(store, uuid: str, migration_id: str, downtime_ms: float, measured_by: str) -> bool:
    """Add the downtime the guest saw at the switch-over of live migration ``migration_id`` of VM
    ``uuid`` to its audit record (``guest_downtime_ms`` and ``guest_downtime_by``, see
    _records.guest_downtime_fields). The daemons cannot measure it (docs/migration-protocol.md,
    "Downtime as the guest sees it"): whoever can (the lab's tick collector, a monitoring system
    that pings the guest) calls this once the migration is done.

    Only a finished live migration that succeeded takes a figure, and only once: True when it was
    written; False when there is no such audit record (pruned, or not finished yet), it is not a
    done live migration, it already has one, or it changed while this wrote (version-checked).
    Raises Invalid for a figure out of bounds."""
    fields = R.guest_downtime_fields(downtime_ms, measured_by)
    path = store.schema.domain_history(uuid)
    suffix = "-" + migration_id
    entries = [entry for entry in store.list_children(path, missing_ok=True) if entry.endswith(suffix)]
    if len(entries) != 1:
        return False
    key = f"{path}/{entries[0]}"
    found = store.find(key)
    if found is None:
        return False
    try:
        entry = R.history_entry(found.value, key, uuid)
        stored = json_object(found.value, key, max_bytes=R.MAX_RECORD_BYTES, max_depth=R.MAX_RECORD_DEPTH)
    except Invalid:
        return False
    if (
        entry["id"] != migration_id
        or entry["result"] != R.RESULT_DONE
        or entry.get("method_used") != "live"
        or R.GUEST_DOWNTIME_MS in entry
    ):
        return False
    try:
        store.commit({key: {**stored, **fields}}, expect_versions={key: found.version})
    except ConflictError:
        return False
    return True


def wait_for_key(store, path: str, predicate, timeout_s: float, cancel=None) -> bool:
    """Wait on a ZooKeeper watch until ``predicate(value)`` holds for the key at ``path`` (value
    None while the key does not exist). True when it held; False on timeout or when the
    ``cancel`` event (optional) is set first."""
    done = threading.Event()

    def watcher(found) -> bool:
        if done.is_set():
            return False
        if predicate(found.value if found is not None else None):
            done.set()
            return False
        return True

    store.watch_data(path, watcher)
    if cancel is None:
        return done.wait(timeout_s)
    deadline = time.monotonic() + timeout_s
    # Two events cannot be waited on at once; cancellation is checked at a coarse interval.
    while not done.wait(min(0.25, max(0.0, deadline - time.monotonic()))):
        if cancel.is_set() or time.monotonic() >= deadline:
            return False
    return True


def watch_until(store, paths, condition, timeout_s: float):
    """Evaluate ``condition()`` now and whenever a key in ``paths`` changes (ZooKeeper watches),
    until it returns something true (returned) or ``timeout_s`` passes (None returned). The one
    watch-and-read-again loop of the modules and the daemon's waits (``wait_for_node_state``):
    the watches only wake it, ``condition`` reads what it decides on itself, outside the store's
    event thread; a change during its evaluation wakes it again. The watches end with the wait."""
    changed = threading.Event()
    active = [True]

    def watcher(*_args) -> bool:
        if not active[0]:
            return False
        changed.set()
        return True

    for path in paths:
        store.watch_data(path, watcher)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            changed.clear()
            result = condition()
            if result:
                return result
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            changed.wait(remaining)
    finally:
        active[0] = False


def wait_for_node_state(store, node: str, predicate, timeout_s: float) -> R.NodeState | None:
    """Wait until ``predicate(state)`` holds for ``node``'s state as everyone reads it
    (read_node_state; None while the node has no daemon_state). Woken by data watches on the
    node's own daemon_state, domain_state and on its claims container (every verdict about it
    changes that; a verdict's record and its note are written in one transaction), through
    ``watch_until``. The state, or None on timeout."""
    schema = store.schema

    def reached() -> tuple | None:
        state = read_node_state(store, node)
        return (state,) if predicate(state) else None

    paths = (
        schema.node_key(node, S.NODE_DAEMON_STATE),
        schema.node_key(node, S.NODE_DOMAIN_STATE),
        schema.node_claims(node),
    )
    found = watch_until(store, paths, reached, timeout_s)
    return found[0] if found else None


def wait_until_gone(store, path: str, timeout_s: float) -> bool:
    """Wait until the key at ``path`` does not exist; True when gone, False on timeout.

    Watches the children of its parent, not the key itself: a data watch would also fire (and
    cost a read) on every change of the key's value, where this fires only when a child is
    created or deleted. (A children watch ends without a word when the parent itself is
    deleted: that case is caught by the existence check after the wait.)
    """
    parent, name = path.rsplit("/", 1)
    gone = threading.Event()

    def on_children(children) -> bool:
        if gone.is_set():
            return False
        if children is None or name not in children:  # None: the parent does not exist, so neither does the key
            gone.set()
            return False
        return True

    store.watch_children(parent, on_children)  # answers once before it returns
    return gone.wait(timeout_s) or not store.exists(path)


# ---- rotating a password (docs/security.md, "Rotating credentials") ----------------------------

ROTATION_STATES = ("added", "rotated")


def _password_reference(store, username: str) -> str:
    """The znode whose ACL tells which of the user's passwords the cluster accepts: the cluster
    root for the operator and the nodes, the node's znode for a node's own identity."""
    root = store.schema.root or "/"
    if any(digest.split(":", 1)[0] == username for digest in store.digest_perms(root)):
        return str(root)
    node = store.schema.node(username)
    try:
        if any(digest.split(":", 1)[0] == username for digest in store.digest_perms(node)):
            return str(node)
    except MissingError:
        pass
    raise StoreError(
        f"no identity of user {username} is in the cluster's ACLs (neither on {root} nor on {node}): give the "
        "operator's, the nodes' or a node's user name"
    )


def rotate_password(store, username: str, password: str, new_password: str, state: str, dry_run: bool = False) -> dict:
    """One step of a password rotation on every znode of the cluster, by the operator's store:
    ``added`` gives ``new_password`` the permissions of ``password`` wherever it has some (both
    work); ``rotated`` takes ``password`` off every znode (refused unless ``new_password`` was
    added first). Returns ``paths`` changed (with ``dry_run``: that would change), ``before`` and
    ``after`` (which of "current" and "new" the identity's ACLs accept) and ``new_digest_id``.
    Raises StoreError with what to do."""
    if state not in ROTATION_STATES:
        raise StoreError(f"state must be one of {', '.join(ROTATION_STATES)}, not {state!r}")
    if password == new_password:
        raise StoreError("new_password is the current password: give a new one")
    current, new = digest_id(username, password), digest_id(username, new_password)
    reference = _password_reference(store, username)
    found = store.digest_perms(reference)
    before = [label for label, digest in (("current", current), ("new", new)) if digest in found]
    if not before:
        raise StoreError(
            f"the ACL of {reference} names user {username} with neither password nor new_password: password is not "
            f"{username}'s current password (after a finished rotation, it is new_password's)"
        )
    if state == "rotated" and "new" not in before:
        raise StoreError(
            f"new_password of user {username} is not in the cluster's ACLs yet ({reference}): run state=added first, "
            "and move the clients to it (playbooks/rotate_credentials.yml), before the current one is taken off"
        )
    # both identities, whatever this session connected as: a znode created while the clients
    # moved may name only one of them, and this session needs its ADMIN permission
    store.add_auth(username, password)
    store.add_auth(username, new_password)
    paths = store.replace_acl_id(current, new, keep_old=state == "added", dry_run=dry_run)
    if state == "rotated":
        after = ["new"]
    else:  # a finished rotation (only the new one left) stays as it is
        after = ["current", "new"] if "current" in before else before
    return {"paths": paths, "before": before, "after": after, "new_digest_id": new}
