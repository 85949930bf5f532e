"""The daemon's table of the cluster's VMs, kept current by ZooKeeper watches.

Each entry is the VM's one record, ``VMRecord`` (plugins/module_utils/_cluster.py), built one key
at a time as the keys' watches answer (its ``loaded`` and ``present``). Watch callbacks replace
whole immutable records; readers take a snapshot (a copy of the mapping)
and never iterate the live table, which other threads change while they read.

The table is what the reconciler decides from: each key's value is the answer to a read that the
key's own watch started, so it is never older than the last change the daemon was told about,
and every later change brings another pass. Writes that depend on it carry a version check (the
migration record's ``migration_version``), so a decision on a value that has just changed fails
to write instead of overwriting the newer one.
"""

from __future__ import annotations

import threading
from dataclasses import replace
from typing import Any

from pvc_cluster_common._cluster import VMRecord
from pvc_cluster_common._records import MigrationRecord, effective_state

# The fields the VM's state is computed from (see DomainTable.put).
STATE_FIELDS = ("desired_state", "state_version", "runstate")


class DomainTable:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: dict[str, VMRecord] = {}

    def update(self, uuid: str, **fields: Any) -> VMRecord:
        with self._lock:
            record = self._records.get(uuid) or VMRecord(uuid=uuid)
            record = replace(record, **fields)
            self._records[uuid] = record
            return record

    def put(self, uuid: str, key: str, exists: bool, **fields: Any) -> VMRecord:
        """Record the answer to a read of one watched key (``exists``: the key is there)."""
        with self._lock:
            record = self._records.get(uuid) or VMRecord(uuid=uuid)
            present = record.present | {key} if exists else record.present - {key}
            record = replace(record, loaded=record.loaded | {key}, present=present, **fields)
            if any(name in fields for name in STATE_FIELDS):
                # computed under the lock: the two keys' answers come on different callbacks
                record = replace(
                    record, state=effective_state(record.desired_state, record.state_version, record.runstate)
                )
            self._records[uuid] = record
            return record

    def wrote_migration(self, uuid: str, before: tuple[str, int], record: MigrationRecord | None, version: int) -> None:
        """This daemon wrote the VM's migration record (``record`` None: ended it), changing it
        from ``before`` = (record id, version). Recorded at once, only if the table still holds
        exactly that version: the watch's answer comes later, and until then a queued pass would
        act on the step this daemon has just left (and fail its version check)."""
        with self._lock:
            current = self._records.get(uuid)
            if (
                current is None
                or current.migration is None
                or (current.migration.id, current.migration_version) != before
            ):
                return
            self._records[uuid] = replace(current, migration=record, migration_version=version if record else -1)

    def remove(self, uuid: str) -> None:
        with self._lock:
            self._records.pop(uuid, None)

    def get(self, uuid: str) -> VMRecord | None:
        with self._lock:
            return self._records.get(uuid)

    def snapshot(self) -> dict[str, VMRecord]:
        with self._lock:
            return dict(self._records)

    def uuids(self) -> list[str]:
        with self._lock:
            return list(self._records)
