"""The cluster store when ZooKeeper goes away: outages, session expiry, locks held across a loss.

Waits are on the store's session listeners (a Condition), with generous bounds; no durations are
asserted.
"""

from __future__ import annotations

import logging
import threading

import pytest
from kazoo.client import KazooClient

from pvc_cluster_common._store import SESSION_CONNECTED, SESSION_LOST, SESSION_SUSPENDED, StoreError, UnreachableError

pytestmark = pytest.mark.zk

WAIT_S = 60.0


class StateLog:
    """Records a store's connection states; wait_for(predicate over the list) blocks until it holds."""

    def __init__(self, store):
        self.states: list[str] = []
        self._cond = threading.Condition()
        store.add_session_listener(self._record)

    def _record(self, state):
        with self._cond:
            self.states.append(state)
            self._cond.notify_all()

    def wait_for(self, predicate, what):
        with self._cond:
            assert self._cond.wait_for(lambda: predicate(self.states), WAIT_S), f"never {what}: {self.states}"

    def mark(self) -> int:
        with self._cond:
            return len(self.states)


class LogEvent(logging.Handler):
    """Sets an Event when a record containing `text` is logged."""

    def __init__(self, text):
        super().__init__(logging.DEBUG)
        self.text = text
        self.seen = threading.Event()

    def emit(self, record):
        if self.text in record.getMessage():
            self.seen.set()


def _expire_session(client, hosts):
    """The standard kazoo trick: a twin client joins the session, then closes it."""
    twin = KazooClient(hosts=hosts, client_id=client.client_id)
    twin.start(timeout=WAIT_S)
    twin.stop()
    twin.close()


def test_outage_every_access_raises_unreachable_then_recovers(zk_private_server, make_store):
    """During an outage no access answers "missing" (None, [], False): each raises
    UnreachableError naming why, and the store works again once ZooKeeper is back."""
    logger = logging.getLogger("test.outage")
    store = make_store(hosts=zk_private_server.hosts, timeout_s=2.0, logger=logger)
    store.ensure_schema()
    key = store.schema.node_key("n1", "memtotal")
    store.commit({key: 1})
    states = StateLog(store)

    zk_private_server.stop()
    states.wait_for(lambda s: SESSION_SUSPENDED in s, "suspended")
    assert not store.connected
    why = f"not connected to ZooKeeper at {zk_private_server.hosts}"
    accesses = {
        "get": lambda: store.get(key),
        "find": lambda: store.find(key),
        "find_text": lambda: store.find_text(key),
        "get_many": lambda: store.get_many([key]),
        "get_round": lambda: store.get_round([key], [store.schema.nodes()]),
        "list_children": lambda: store.list_children(store.schema.nodes(), missing_ok=True),
        "exists": lambda: store.exists(key),
        "commit": lambda: store.commit({key: 2}),
        "delete": lambda: store.delete(key),
    }
    for name, access in accesses.items():
        with pytest.raises(UnreachableError, match=why):
            access()
            pytest.fail(f"{name} answered during the outage")

    mark = states.mark()
    zk_private_server.start()
    states.wait_for(lambda s: SESSION_CONNECTED in s[mark:], "reconnected")
    assert store.connected
    assert store.find_text(key) == "1"
    store.commit({key: 3})
    assert store.find_text(key) == "3"


def test_session_expiry_drops_ephemerals_and_the_store_carries_on(store, zk_server):
    s = store.schema
    alive = s.node_key("n1", "alive")
    store.commit({s.node_key("n1", "daemon_state"): "run"})
    store.client.create(alive, b"", ephemeral=True)
    assert store.exists(alive) is True
    old_session = store.client.client_id[0]
    states = StateLog(store)

    _expire_session(store.client, zk_server.hosts)
    states.wait_for(
        lambda st: SESSION_LOST in st and SESSION_CONNECTED in st[st.index(SESSION_LOST) :],
        "lost the session and connected again",
    )
    assert store.client.client_id[0] != old_session
    assert store.exists(alive) is False  # the ephemeral went with the session
    assert store.find_text(s.node_key("n1", "daemon_state")) == "run"  # persistent data stays
    store.commit({s.node_key("n1", "daemon_state"): "init"})
    assert store.find_text(s.node_key("n1", "daemon_state")) == "init"
    with store.lock(s.node_lock("n1"), timeout_s=WAIT_S):
        pass


def test_lock_release_on_lost_connection_is_logged_and_cleaned_up(zk_private_server, make_store, caplog):
    logger = logging.getLogger("test.release")
    store = make_store(hosts=zk_private_server.hosts, timeout_s=3.0, logger=logger)
    store.ensure_schema()
    path = store.schema.node_lock("n2")
    states = StateLog(store)
    cleaned = LogEvent("deleted our leftover lock node")
    logger.addHandler(cleaned)
    try:
        with caplog.at_level(logging.INFO, logger="test.release"):
            session = store.client.client_id[0]
            with store.lock(path):
                zk_private_server.stop()
                states.wait_for(lambda s: SESSION_SUSPENDED in s, "suspended")
            failed = [r for r in caplog.records if r.getMessage().startswith(f"lock {path}: release failed")]
            assert len(failed) == 1 and failed[0].levelno == logging.ERROR, [r.getMessage() for r in caplog.records]

            mark = states.mark()
            zk_private_server.start()
            states.wait_for(lambda s: SESSION_CONNECTED in s[mark:], "reconnected")
            # whether our session survived the restart (the leftover node is then deleted by the
            # store) or expired (the node went with it), the lock is free for others
            other = make_store(hosts=zk_private_server.hosts)
            with other.lock(path, timeout_s=WAIT_S) as held:
                assert held.held
            if SESSION_LOST not in states.states and store.client.client_id[0] == session:
                assert cleaned.seen.wait(WAIT_S), "the leftover lock node was not deleted"
    finally:
        logger.removeHandler(cleaned)


def test_start_can_be_retried_after_the_server_comes_up(zk_private_server, make_store):
    zk_private_server.stop()
    store = make_store(hosts=zk_private_server.hosts, timeout_s=1.0, start=False)
    with pytest.raises(StoreError, match=f"cannot reach ZooKeeper at {zk_private_server.hosts} within 1 s"):
        store.start()
    assert not store.connected
    zk_private_server.start()
    store.start()
    assert store.connected
    assert store.ensure_schema() is True


def test_watches_and_try_lock_do_not_wait_for_an_outage_to_end(zk_private_server, make_store, monkeypatch):
    """During an outage watch_data and watch_children return at once and make their first call
    when the connection is back; try_lock answers None at once, even when the connection goes
    after it looked (kazoo queues the requests of its lock recipe until the connection is back)."""
    store = make_store(hosts=zk_private_server.hosts, timeout_s=2.0)
    store.ensure_schema()
    key = store.schema.node_key("n1", "memtotal")
    store.commit({key: 1})
    states = StateLog(store)
    zk_private_server.stop()
    states.wait_for(lambda s: SESSION_SUSPENDED in s, "suspended")

    data, children, locks = [], [], []
    told = {"data": threading.Event(), "children": threading.Event()}

    def on_data(value):
        data.append(value)
        told["data"].set()

    def on_children(names):
        children.append(names)
        told["children"].set()

    def arm():
        store.watch_data(key, on_data)
        store.watch_children(store.schema.node("n1"), on_children)
        with store.try_lock(store.schema.node_lock("n1")) as lock:
            locks.append(lock)
        with monkeypatch.context() as patch:
            # as if the connection went right after try_lock looked: its request waits for an
            # answer at most timeout_s, not for the connection (kazoo queues it until then)
            patch.setattr(store._live, "is_set", lambda: True)
            patch.setattr(store._live, "wait", lambda timeout=None: True)
            with store.try_lock(store.schema.node_lock("n1")) as lock:
                locks.append(lock)

    caller = threading.Thread(target=arm, daemon=True)
    caller.start()
    caller.join(WAIT_S)
    assert not caller.is_alive(), "a watch or try_lock waited for the outage to end"
    assert locks == [None, None]
    assert data == [] and children == []  # nothing is told before the connection is back

    zk_private_server.start()
    assert told["data"].wait(WAIT_S) and data[0] == ("1", 0)
    assert told["children"].wait(WAIT_S) and children[0] == ["memtotal"]
    # the create sent when the connection came back left no contender that holds the lock for nobody
    with store.lock(store.schema.node_lock("n1"), timeout_s=WAIT_S) as held:
        assert held.held
