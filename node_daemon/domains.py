"""The daemon's table of the cluster's VMs, kept current by ZooKeeper watches.

Watch callbacks replace whole immutable records; readers take a snapshot (a copy of the mapping)
and never iterate the live table, which other threads change while they read.

The table is what the reconciler decides from: each key's value is the answer to a read that the
key's own watch started, so it is never older than the last change the daemon was told about,
and every later change brings another pass. Writes that depend on it carry a version check (the
migration record's ``migration_version``), so a decision on a value that has just changed fails
to write instead of overwriting the newer one.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, replace
from typing import Any

from pvc_cluster_common._records import MigrationRecord, RunState, effective_state

# The fields the VM's state is computed from (see DomainTable.put).
STATE_FIELDS = ("desired_state", "state_version", "runstate")


@dataclass(frozen=True)
class DomainRecord:
    uuid: str
    name: str = ""
    state: str = ""          # the VM's state: desired_state, or the runstate record while it applies
    desired_state: str = ""  # the operator's ``state``
    state_version: int = -1  # its znode version
    runstate: RunState | None = None   # the daemons' record (runtime/runstate), None: none or not valid
    node: str = ""
    node_version: int = -1   # the znode version of ``node`` (guards requests made from the table)
    lastnode: str = ""
    migration_source: str | None = None   # set while a migration record exists
    migration_target: str | None = None
    memory_mib: int = 0      # configured maximum, from the XML
    vcpus: int = 0
    xml_ok: bool = True      # False when the XML is not valid or refused by the policy (memory then counts 0)
    xml_error: str = ""      # why not
    xml: str = ""
    migration: MigrationRecord | None = None   # the in-flight migration record, decoded
    migration_version: int = -1     # its znode version (-1: no record)
    migration_error: str = ""       # why the record that exists is not valid (then migration is None)
    # why the VM's state or node is not valid: then the daemon leaves the VM alone
    state_error: str = ""
    node_error: str = ""

    @property
    def invalid(self) -> str:
        """Why the daemon leaves the VM alone (a key that decides about it is not valid), or ""."""
        return self.migration_error or self.state_error or self.node_error
    # watched keys answered at least once, and those of them that exist
    loaded: frozenset[str] = frozenset()
    present: frozenset[str] = frozenset()

    def has(self, *keys: str) -> bool:
        """True when every key has been read (whether or not it exists)."""
        return all(key in self.loaded for key in keys)


class DomainTable:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: dict[str, DomainRecord] = {}

    def update(self, uuid: str, **fields: Any) -> DomainRecord:
        with self._lock:
            record = self._records.get(uuid) or DomainRecord(uuid=uuid)
            record = replace(record, **fields)
            self._records[uuid] = record
            return record

    def put(self, uuid: str, key: str, exists: bool, **fields: Any) -> DomainRecord:
        """Record the answer to a read of one watched key (``exists``: the key is there)."""
        with self._lock:
            record = self._records.get(uuid) or DomainRecord(uuid=uuid)
            present = record.present | {key} if exists else record.present - {key}
            record = replace(record, loaded=record.loaded | {key}, present=present, **fields)
            if any(name in fields for name in STATE_FIELDS):
                # computed under the lock: the two keys' answers come on different callbacks
                record = replace(record, state=effective_state(record.desired_state, record.state_version,
                                                               record.runstate))
            self._records[uuid] = record
            return record

    def wrote_migration(self, uuid: str, before: tuple[str, int], record: MigrationRecord | None, version: int) -> None:
        """This daemon wrote the VM's migration record (``record`` None: ended it), changing it
        from ``before`` = (record id, version). Recorded at once, only if the table still holds
        exactly that version: the watch's answer comes later, and until then a queued pass would
        act on the step this daemon has just left (and fail its version check)."""
        with self._lock:
            current = self._records.get(uuid)
            if (current is None or current.migration is None
                    or (current.migration.id, current.migration_version) != before):
                return
            self._records[uuid] = replace(current, migration=record, migration_version=version if record else -1,
                                          migration_source=record.source if record else None,
                                          migration_target=record.target if record else None)

    def remove(self, uuid: str) -> None:
        with self._lock:
            self._records.pop(uuid, None)

    def get(self, uuid: str) -> DomainRecord | None:
        with self._lock:
            return self._records.get(uuid)

    def snapshot(self) -> dict[str, DomainRecord]:
        with self._lock:
            return dict(self._records)

    def uuids(self) -> list[str]:
        with self._lock:
            return list(self._records)
