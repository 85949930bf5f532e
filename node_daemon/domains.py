"""The daemon's table of the cluster's VMs, kept current by ZooKeeper watches.

Watch callbacks replace whole immutable records; readers take a snapshot (a copy of the mapping)
and never iterate the live table, which other threads change while they read.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class DomainRecord:
    uuid: str
    name: str = ""
    state: str = ""
    node: str = ""
    lastnode: str = ""
    migration_source: str | None = None   # set while a migration record exists
    migration_target: str | None = None
    memory_mib: int = 0      # configured maximum, from the XML
    vcpus: int = 0
    xml_ok: bool = True      # False when the XML could not be parsed (memory then counts 0)


class DomainTable:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: dict[str, DomainRecord] = {}

    def update(self, uuid: str, **fields) -> DomainRecord:
        with self._lock:
            record = self._records.get(uuid) or DomainRecord(uuid=uuid)
            record = replace(record, **fields)
            self._records[uuid] = record
            return record

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
