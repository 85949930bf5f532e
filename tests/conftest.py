"""Shared pytest fixtures: real ZooKeeper servers and cluster stores on them, and the lab
(tests/lab/fixtures.py).

Every fixture stops what it starts: servers by PID (through ZooKeeperServer), stores by stop().
"""

from __future__ import annotations

import uuid

import pytest

from pvc_cluster_common._store import ClusterStore, ConnectionOptions
from tests.lab.fixtures import lab, lab_guest, lab_guests  # noqa: F401  (here, so that tests/lab and tests/rollout share one lab)
from tests.support.zookeeper import ZooKeeperServer, free_port


def _serve(workdir, **kwargs):
    server = ZooKeeperServer(workdir=workdir, client_port=free_port(), **kwargs)
    try:
        server.start()
    except BaseException:
        server.stop()  # a JVM that never became ready is still ours to end
        raise
    return server


@pytest.fixture(scope="session")
def zk_server(tmp_path_factory):
    """One standalone ZooKeeper on 127.0.0.1 for the whole session (tests use their own roots)."""
    server = _serve(tmp_path_factory.mktemp("zookeeper"))
    yield server
    server.stop()


@pytest.fixture
def zk_private_server(tmp_path):
    """A ZooKeeper of this test's own, for tests that stop, kill or restart the server."""
    server = _serve(tmp_path / "zookeeper")
    yield server
    server.stop()


@pytest.fixture
def zk_root():
    """A cluster root no other test uses."""
    return f"/test-{uuid.uuid4().hex[:16]}"


@pytest.fixture
def make_store(zk_server, zk_root):
    """make_store(**ConnectionOptions fields, logger=None, start=True) -> ClusterStore; all stopped after.

    Defaults: the session server and this test's root.
    """
    stores = []

    def make(logger=None, start=True, **fields):
        fields.setdefault("hosts", zk_server.hosts)
        fields.setdefault("root", zk_root)
        store = ClusterStore(ConnectionOptions(**fields), logger=logger)
        stores.append(store)
        if start:
            store.start()
        return store

    yield make
    for store in stores:
        store.stop()


@pytest.fixture
def store(make_store):
    """A started store on the session server with this test's root and its schema in place."""
    store = make_store()
    store.ensure_schema()
    return store
