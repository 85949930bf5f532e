"""The store's watches, ephemeral keys, non-waiting locks and session listeners, against a real
ZooKeeper. Every wait is on the watch's own callbacks (a Condition), with a generous deadline."""

from __future__ import annotations

import threading

import pytest
from kazoo.client import KazooClient

from pvc_cluster_common._store import SESSION_CONNECTED, SESSION_LOST, MissingError, StoreError, Versioned

pytestmark = pytest.mark.zk

WAIT_S = 60.0


class Seen:
    """The values a callback was given, in order; wait_for(predicate over the list) blocks until it holds."""

    def __init__(self, answer=True):
        self.values: list = []
        self.answer = answer
        self._cond = threading.Condition()

    def __call__(self, value):
        with self._cond:
            self.values.append(value)
            self._cond.notify_all()
        return self.answer(value) if callable(self.answer) else self.answer

    def wait_for(self, predicate, what):
        with self._cond:
            assert self._cond.wait_for(lambda: predicate(self.values), WAIT_S), f"never {what}: {self.values}"


def drained(store) -> None:
    """Return once the store's event thread has handled every watch event of the writes made so far:
    ZooKeeper sends a session's notifications in order, and the store's callbacks run in that
    order, so a marker's own change being told means every earlier one was."""
    marker = store.schema.node_key("drain", "marker")
    seen = Seen()
    store.watch_data(marker, seen)
    version = store.commit({marker: "x"})[marker]
    seen.wait_for(lambda v: v[-1] is not None and v[-1].version == version, "told of the marker")


def test_watch_data_answers_before_returning_then_every_change_until_false(store):
    key = store.schema.node_key("n1", "domain_state")
    seen = Seen(answer=lambda value: value is None or value.value != "stop")
    store.watch_data(key, seen)
    assert seen.values == [None]  # missing, told at once
    versions = store.commit({key: "flush"})
    seen.wait_for(lambda v: Versioned("flush", versions[key]) in v, "told of the created key")
    store.commit({key: "stop"})
    seen.wait_for(lambda v: v[-1] == Versioned("stop", versions[key] + 1), "told of the change")
    told = len(seen.values)
    store.commit({key: "after"})
    drained(store)
    assert len(seen.values) == told  # the callback said False at "stop": nothing more


def test_watch_data_survives_a_failing_callback_elsewhere(store):
    key = store.schema.node_key("n1", "maintenance")

    def failing(_value):
        raise RuntimeError("boom")

    store.watch_data(key, failing)  # logged, that watch ends
    seen = Seen()
    store.watch_data(key, seen)
    store.commit({key: "true"})
    seen.wait_for(lambda v: v and v[-1] is not None and v[-1].value == "true", "told after another callback failed")


def test_watch_children_sorted_and_none_for_a_missing_parent(store):
    parent = store.schema.domains()
    seen = Seen()
    store.watch_children(parent, seen)
    assert seen.values == [[]]
    store.commit({f"{parent}/b/state": "start", f"{parent}/a/state": "start"})
    seen.wait_for(lambda v: v[-1] == ["a", "b"], "told of both children, sorted")
    missing = Seen()
    store.watch_children(f"{parent}/nope", missing)
    assert missing.values == [None]


def test_follow_reads_again_while_wanted_and_tells_a_missing_key(store):
    key = store.schema.node_key("n2", "libvirt")
    wanted = threading.Event()
    wanted.set()
    seen = Seen()
    store.follow(key, seen, wanted.is_set)
    seen.wait_for(lambda v: v == [None], "told the key is missing")
    store.commit({key: "ok"})
    seen.wait_for(lambda v: v[-1] is not None and v[-1].value == "ok", "told the key appeared")
    store.commit({key: "lost"})
    seen.wait_for(lambda v: v[-1].value == "lost", "told of the change")
    wanted.clear()
    told = len(seen.values)
    store.commit({key: "ok"})
    drained(store)
    assert len(seen.values) == told  # not wanted any more: the change is not read


def test_put_ephemeral_replaces_a_previous_session_s_key_in_place(store, make_store, zk_server):
    path = store.schema.node_key("n1", "alive")
    store.commit({store.schema.node_key("n1", "daemon_state"): "run"})
    old = make_store()
    old.put_ephemeral(path, "old session")
    assert store.get(path).value == "old session"
    store.put_ephemeral(path, "new session")  # the old session is still alive: replaced in one transaction
    assert store.get(path).value == "new session"
    owner = KazooClient(hosts=zk_server.hosts)
    owner.start(timeout=WAIT_S)
    try:
        assert owner.exists(path).ephemeralOwner == store.client.client_id[0]
    finally:
        owner.stop()
        owner.close()
    store.put_ephemeral(path, "again")  # ours already: left as it is
    assert store.get(path).value == "new session"
    old.stop()
    assert store.get(path).value == "new session"  # the old session's end does not take it away
    store.stop()
    with pytest.raises(MissingError):
        make_store().get(path)


def test_put_ephemeral_without_a_connection_raises(make_store):
    stopped = make_store(start=False, timeout_s=0.2)
    stopped.start()
    stopped.stop()
    with pytest.raises(StoreError, match="stopped"):
        stopped.put_ephemeral(stopped.schema.node_key("n1", "alive"), "x")


def test_try_lock_takes_a_free_lock_and_yields_none_while_another_holds_it(store, make_store):
    path = store.schema.fence_lock("n3")
    other = make_store()
    with store.try_lock(path, identifier="n1") as lock:
        assert lock is not None and lock.held and lock.contenders() == ["n1"]
        with other.try_lock(path, identifier="n2") as refused:
            assert refused is None
        assert (
            store.list_children(path, missing_ok=True) is not None
            and len(store.list_children(path, missing_ok=True)) == 1
        )  # no contender left behind
    assert store.list_children(path, missing_ok=True) == []
    with other.try_lock(path) as lock:
        assert lock is not None and lock.held


def test_try_lock_released_when_the_block_raises(store):
    path = store.schema.fence_lock("n2")
    with pytest.raises(RuntimeError, match="boom"), store.try_lock(path) as lock:
        assert lock is not None
        raise RuntimeError("boom")
    assert store.list_children(path, missing_ok=True) == []


def test_a_lock_is_not_held_after_its_session_is_lost(store, zk_server):
    path = store.schema.fence_lock("n1")
    states = Seen()
    store.add_session_listener(states)
    with store.try_lock(path) as lock:
        assert lock is not None and lock.held
        twin = KazooClient(hosts=zk_server.hosts, client_id=store.client.client_id)
        twin.start(timeout=WAIT_S)
        twin.stop()
        twin.close()
        states.wait_for(
            lambda s: SESSION_LOST in s and SESSION_CONNECTED in s[s.index(SESSION_LOST) :],
            "lost the session and connected again",
        )
        assert store.connected and not lock.held  # connected again, but with another session
    store.remove_session_listener(states)
