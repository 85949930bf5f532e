# -*- coding: utf-8 -*-
# Copyright: pvc.cluster developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Builders for the typed records the module logic decides on (no ZooKeeper)."""

from __future__ import annotations

from ansible_collections.pvc.cluster.plugins.module_utils._cluster import VMRecord
from ansible_collections.pvc.cluster.plugins.module_utils._meta import VMMeta
from ansible_collections.pvc.cluster.plugins.module_utils._records import MigrationRecord
from ansible_collections.pvc.cluster.plugins.module_utils._selector import NodeView


def domain_xml(name="web1", uuid="6695eb01-f6a4-8304-79aa-97f2502e193f", memory_mib=1024, vcpus=2):
    return (
        f"<domain type='test'><name>{name}</name><uuid>{uuid}</uuid><memory unit='MiB'>{memory_mib}</memory>"
        f"<vcpu>{vcpus}</vcpu><os><type>hvm</type></os><devices/></domain>"
    )


def make_record(uuid="6695eb01-f6a4-8304-79aa-97f2502e193f", **fields):
    """A migration record of VM ``uuid``; ``fields`` override the defaults (n1 -> n2, requested)."""
    defaults = dict(
        id="m1", vm=uuid, kind="migrate", source="n1", target="n2", method="default", memory_mib=1024, step="requested"
    )
    return MigrationRecord(**dict(defaults, **fields))


def make_vm(
    name="web1",
    uuid="6695eb01-f6a4-8304-79aa-97f2502e193f",
    state="start",
    node="n1",
    lastnode="",
    memory_mib=1024,
    meta=None,
    migration=None,
    xml=None,
    migration_error="",
    xml_error="",
):
    """``migration``: the fields of its record that differ from make_record's."""
    return VMRecord(
        uuid=uuid,
        name=name,
        state=state,
        node=node,
        lastnode=lastnode,
        xml=xml if xml is not None else domain_xml(name, uuid, memory_mib),
        meta=VMMeta.from_store(meta or {}),
        memory_mib=memory_mib,
        vcpus=2,
        node_version=3,
        migration=make_record(uuid, **migration) if migration is not None else None,
        migration_version=0 if migration is not None or migration_error else -1,
        migration_error=migration_error,
        xml_error=xml_error,
    )


def make_node(name, daemon_state="run", domain_state="ready", memtotal=16384, memprov=0, memreserve=0, reserved=0):
    return NodeView(
        name=name,
        daemon_state=daemon_state,
        domain_state=domain_state,
        memtotal=memtotal,
        memfree=memtotal - memprov,
        memprov=memprov,
        memreserve=memreserve,
        reserved=reserved,
    )


class FakeStore:
    """The read side of ClusterStore over a dict of znode path -> text (for logic that only reads)."""

    def __init__(self, values: dict[str, str], root: str = "/pvc") -> None:
        from ansible_collections.pvc.cluster.plugins.module_utils._schema import Schema

        self.schema = Schema(root)
        self.values = values

    def find_text(self, path):
        return self.values.get(path)

    def get_many(self, paths):
        """Every path -> Versioned or None (missing); every stored value reads as version 0."""
        from ansible_collections.pvc.cluster.plugins.module_utils._store import Versioned

        return {path: Versioned(self.values[path], 0) if path in self.values else None for path in paths}

    def list_children(self, path, missing_ok=False):
        """The names below ``path`` that some stored path has."""
        from ansible_collections.pvc.cluster.plugins.module_utils._store import MissingError

        prefix = path.rstrip("/") + "/"
        names = {stored[len(prefix) :].split("/", 1)[0] for stored in self.values if stored.startswith(prefix)}
        if not names and path not in self.values and not missing_ok:
            raise MissingError(f"list {path}: no such key")
        return sorted(names)

    def get_round(self, paths, lists=()):
        listed = {}
        for path in lists:
            prefix = path.rstrip("/") + "/"
            found = any(stored.startswith(prefix) for stored in self.values) or path in self.values
            listed[path] = self.list_children(path) if found else None
        return self.get_many(paths), listed

    def get_round_zxids(self, paths, lists=()):
        """get_round, and no zxids: whoever needs one reads as if it could not tell (every
        peer's verdict about a node is then read)."""
        found, listed = self.get_round(paths, lists)
        return found, listed, {}
