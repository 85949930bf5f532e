"""Waiting for a state a node daemon moves a VM to (its runtime/runstate record, docs/security.md)."""

from __future__ import annotations

from pvc_cluster_common import _records as R
from pvc_cluster_common import _schema as S
from pvc_cluster_common._decode import Invalid


def runstate_reached(store, uuid: str, state: str):
    """(path, predicate) for a wait on the VM's runstate key: the predicate holds when the record
    says ``state`` for the version of the VM's desired ``state`` stored now (so a record of an
    earlier request never satisfies it). Call it after writing the desired state."""
    desired = store.find(store.schema.domain_key(uuid, S.DOMAIN_STATE))
    assert desired is not None, f"VM {uuid} has no state"
    path = store.schema.domain_key(uuid, S.DOMAIN_RUNSTATE)

    def predicate(value: str | None) -> bool:
        try:
            record = R.runstate(value, path)
        except Invalid:
            return False
        return record is not None and record.state == state and record.applies_to(desired[1])

    return path, predicate
