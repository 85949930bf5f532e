"""ClusterStore.lock against a real ZooKeeper: contention, retries, release on every exit."""

from __future__ import annotations

import logging
import threading

import pytest

from pvc_cluster_common import _store
from pvc_cluster_common._store import LockError

pytestmark = pytest.mark.zk

WAIT_S = 60.0  # generous upper bound for anything we wait on; never a duration we assert


def _attempt_records(caplog, path):
    return [r for r in caplog.records if r.getMessage().startswith(f"lock {path}: attempt")]


def test_lock_names_its_holder(store, make_store):
    store.lock_identifier = "node1"
    other = make_store()
    path = store.schema.node_lock("n2")
    with store.lock(path) as held:
        assert held.held
        assert held.contenders() == ["node1"]
        probe = _store.Lock(other.client, path)
        assert probe.contenders() == ["node1"]
    with store.lock(path, identifier="node1/flush") as held:
        assert held.contenders() == ["node1/flush"]


def test_contender_fails_after_five_attempts(store, make_store, caplog):
    path = store.schema.node_lock("n2")
    contender = make_store(logger=logging.getLogger("test.contender"))
    with store.lock(path), caplog.at_level(logging.WARNING, logger="test.contender"):
        with pytest.raises(LockError) as failure:
            with contender.lock(path, timeout_s=0.2):
                pytest.fail("the contender must not get a held lock")
    assert path in str(failure.value)
    assert failure.value.path == path
    assert failure.value.attempts == _store.LOCK_ATTEMPTS == 5
    records = _attempt_records(caplog, path)
    assert [r.getMessage().split(":")[1].strip().split(" of ")[0] for r in records] == [
        "attempt 1",
        "attempt 2",
        "attempt 3",
        "attempt 4",
        "attempt 5",
    ]
    assert all("held by another contender" in r.getMessage() for r in records)
    assert "retrying in" not in records[-1].getMessage()
    # the failed contender left no lock node behind, and the holder's node is gone too
    assert store.list_children(path, missing_ok=True) == []
    with contender.lock(path, timeout_s=WAIT_S):
        pass


def test_lock_released_when_the_block_raises(store, make_store):
    path = store.schema.node_lock("n1")
    with pytest.raises(RuntimeError, match="boom"), store.lock(path):
        raise RuntimeError("boom")
    assert store.list_children(path, missing_ok=True) == []
    other = make_store()
    with other.lock(path, timeout_s=WAIT_S) as held:
        assert held.held


def test_waiting_contender_gets_the_lock_on_release(store, make_store):
    path = store.schema.node_lock("n3")
    contender = make_store()
    waiting = threading.Event()
    acquired = threading.Event()
    done = threading.Event()
    errors = []

    def watch(children):
        if len(children) >= 2:  # the holder's node and the contender's
            waiting.set()

    def contend():
        try:
            with contender.lock(path, timeout_s=WAIT_S):
                acquired.set()
        except Exception as exc:  # reported below
            errors.append(exc)
        finally:
            done.set()

    with store.lock(path):
        store.client.ChildrenWatch(path, watch)
        thread = threading.Thread(target=contend, daemon=True)
        thread.start()
        assert waiting.wait(WAIT_S), "the contender never queued for the lock"
        assert not acquired.is_set()
    assert acquired.wait(WAIT_S), f"the contender never got the released lock: {errors}"
    assert done.wait(WAIT_S)
    thread.join(WAIT_S)
    assert not errors
    assert store.list_children(path, missing_ok=True) == []


def test_lock_fails_cleanly_without_connection(make_store, caplog):
    store = make_store(start=False, logger=logging.getLogger("test.nolock"))
    with caplog.at_level(logging.WARNING, logger="test.nolock"):
        with pytest.raises(LockError, match="/locks/x after 5 attempts: .*not started"):
            with store.lock("/locks/x", timeout_s=0.1):
                pass
    assert len(_attempt_records(caplog, "/locks/x")) == 5
