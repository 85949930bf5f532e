"""WatchedKeys (node_daemon/watched.py) on a real ZooKeeper."""

from __future__ import annotations

import pytest

from pvc_node_daemon.watched import WatchedKeys

pytestmark = pytest.mark.zk


def test_values_and_versions_follow_the_keys(store):
    present, absent = store.schema.node_key("n1", "daemon_state"), store.schema.node_key("n1", "domain_state")
    store.commit({present: "run"})
    keys = WatchedKeys(store, (present, absent))
    keys.start()  # kazoo's DataWatch answers once before it returns
    assert keys.snapshot() == {present: ("run", 0), absent: None}
    store.commit({present: "shutdown", absent: "ready"})
    expected = {present: ("shutdown", 1), absent: ("ready", 0)}
    assert keys.wait_for(lambda snapshot: snapshot == expected, 10), keys.snapshot()
    store.delete([absent])
    assert keys.wait_for(lambda snapshot: snapshot[absent] is None, 10), keys.snapshot()


def test_no_snapshot_before_every_key_answered(store):
    keys = WatchedKeys(store, (store.schema.node_key("n1", "daemon_state"),))
    assert keys.snapshot() is None
    assert not keys.wait_for(lambda snapshot: snapshot is not None, 0.05)
