"""The cluster store against a real ZooKeeper: encoding, options, accessors, transactions, schema, auth."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading

import pytest
from kazoo.client import KazooClient
from kazoo.exceptions import NoAuthError
from kazoo.security import make_acl, make_digest_acl

from pvc_cluster_common import _store
from pvc_cluster_common._schema import SCHEMA_VERSION
from pvc_cluster_common._store import (
    ClusterStore,
    ConflictError,
    ConnectionOptions,
    MissingError,
    StoreError,
    encode_value,
)
from tests.support.zookeeper import free_port

pytestmark = pytest.mark.zk

# ---- encoding ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, stored",
    [
        ("text", b"text"),
        ("", b""),
        ("h\u00e9", "h\u00e9".encode()),
        (True, b"true"),
        (False, b"false"),
        (0, b"0"),
        (1, b"1"),
        (-3, b"-3"),
        (1.5, b"1.5"),
        (None, b""),
        (b"\x00raw", b"\x00raw"),
        ({"b": 1, "a": [1, 2]}, b'{"a":[1,2],"b":1}'),
        ([3, "x", None, True], b'[3,"x",null,true]'),
        ((1, 2), b"[1,2]"),
        ({}, b"{}"),
        ([], b"[]"),
    ],
)
def test_encode_value(value, stored):
    assert encode_value(value) == stored


@pytest.mark.parametrize("value", [object(), {1, 2}, 1j])
def test_encode_value_refuses_other_types(value):
    with pytest.raises(TypeError, match="cannot store"):
        encode_value(value)


def test_values_round_trip_as_text(store):
    base = store.schema.config("roundtrip")
    values = {f"{base}/{i}": v for i, v in enumerate([True, 7, 2.25, None, {"k": [1]}, "plain"])}
    store.commit(values)
    assert [store.find_text(p) for p in values] == ["true", "7", "2.25", "", '{"k":[1]}', "plain"]
    assert store.find_text(f"{base}/3") == ""  # "" is how None is stored


# ---- connection options -------------------------------------------------------------------------


def test_options_defaults_are_valid():
    options = ConnectionOptions(hosts="127.0.0.1:2181")
    options.validate()
    assert (options.root, options.timeout_s, options.tls, options.tls_verify) == ("/pvc", 10.0, False, True)
    assert "secret" not in repr(ConnectionOptions(hosts="h:1", auth_username="u", auth_password="secret"))


TIMEOUT_BOUNDS = "timeout_s must be a number of seconds from 0.1 to 3600, not "


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"hosts": ""}, "hosts must name"),
        ({"hosts": "   "}, "hosts must name"),
        ({"hosts": "a:1,,b:2"}, "empty server entry"),
        ({"hosts": "a:http"}, "no valid port"),
        ({"hosts": "a:70000"}, "no valid port"),
        ({"root": "pvc"}, "root must be an absolute"),
        ({"root": "/a//b"}, "root '/a//b' has an empty path component"),
        ({"root": "/pvc/"}, "root '/pvc/' has an empty path component"),
        ({"root": "/pvc/../x"}, "root '/pvc/../x' has a '.' or '..' component, which ZooKeeper refuses"),
        ({"root": "/./pvc"}, "has a '.' or '..' component"),
        ({"root": "/pv\x01c"}, "contains the character U\\+0001"),
        ({"root": "/pv\ufff5c"}, "contains the character U\\+FFF5"),
        ({"root": "/" + "x" * 1024}, "root must be at most 1024 characters long, not 1025"),
        ({"root": None}, "root must be an absolute"),
        ({"timeout_s": 0}, TIMEOUT_BOUNDS),
        ({"timeout_s": 0.09}, TIMEOUT_BOUNDS),
        ({"timeout_s": -1.0}, TIMEOUT_BOUNDS),
        ({"timeout_s": "10"}, TIMEOUT_BOUNDS),
        ({"timeout_s": True}, TIMEOUT_BOUNDS),
        ({"timeout_s": float("inf")}, TIMEOUT_BOUNDS),
        ({"timeout_s": float("nan")}, TIMEOUT_BOUNDS),
        # above about 24.8 days kazoo's connection thread died (a 32-bit millisecond count); 1e10 never connected
        ({"timeout_s": 3600.001}, TIMEOUT_BOUNDS),
        ({"timeout_s": 1e10}, TIMEOUT_BOUNDS),
        ({"auth_password": "pw"}, "auth_password is set but auth_username is not"),
        ({"auth_username": "u"}, "auth_username is set but auth_password is not"),
        ({"auth_username": "a:b", "auth_password": "pw"}, "must not contain ':'"),
        ({"tls": True, "tls_cert": "/etc/hostname"}, "tls_cert is set but tls_key is not"),
        ({"tls": True, "tls_key": "/etc/hostname"}, "tls_key is set but tls_cert is not"),
        ({"tls": True, "tls_ca": "/nonexistent/ca.pem"}, "tls_ca file /nonexistent/ca.pem does not exist"),
        (
            {"tls": True, "tls_cert": "/nonexistent/c.pem", "tls_key": "/etc/hostname"},
            "tls_cert file /nonexistent/c.pem",
        ),
        ({"tls": "yes"}, "tls and tls_verify must be true or false"),
    ],
)
def test_options_validate_names_the_problem(fields, message):
    """Each bad option is refused, naming the option, the value and what is accepted."""
    fields.setdefault("hosts", "127.0.0.1:2181")
    with pytest.raises(ValueError, match=message):
        ConnectionOptions(**fields).validate()


@pytest.mark.parametrize("root, timeout_s", [("/", 0.1), ("/pvc", 3600), ("/a/b.c/..d", 10), ("/pvc-it-1234", 2)])
def test_options_accept_roots_and_timeouts_within_bounds(root, timeout_s):
    ConnectionOptions(hosts="h:1", root=root, timeout_s=timeout_s).validate()


@pytest.mark.parametrize("hosts", ["h1:2181,h2:2181,h3:2181", "h1:2181/chroot/path", "[::1]:2181", "localhost"])
def test_options_accept_kazoo_host_strings(hosts):
    ConnectionOptions(hosts=hosts).validate()


def test_options_ignore_tls_files_while_tls_is_off():
    ConnectionOptions(
        hosts="h:1", tls=False, tls_ca="/etc/pvc/ca.pem", tls_cert="/etc/pvc/n.pem", tls_key="/etc/pvc/n.key"
    ).validate()


def test_options_report_every_problem_at_once():
    with pytest.raises(ValueError) as failure:
        ConnectionOptions(hosts="", timeout_s=0, auth_password="x").validate()
    assert str(failure.value).count(";") == 2


def test_store_validates_options_on_construction():
    with pytest.raises(ValueError, match="auth_password"):
        ClusterStore(ConnectionOptions(hosts="127.0.0.1:1", auth_password="x"))


def test_start_fails_clearly_and_leaves_no_threads():
    port = free_port()  # nothing listens there
    before = set(threading.enumerate())
    store = ClusterStore(ConnectionOptions(hosts=f"127.0.0.1:{port}", timeout_s=1.0))
    with pytest.raises(StoreError, match=rf"cannot reach ZooKeeper at 127.0.0.1:{port} within 1 s"):
        store.start()
    for thread in set(threading.enumerate()) - before:
        thread.join(timeout=30)
        assert not thread.is_alive(), f"thread {thread.name} left running"
    assert not store.connected
    store.stop()
    store.stop()  # idempotent


def test_unstarted_and_stopped_store_fail_cleanly(make_store, caplog):
    store = make_store(start=False)
    with pytest.raises(StoreError, match="not started"):
        store.get("/x")
    with pytest.raises(StoreError, match="not started"):
        store.find_text("/x")
    store.start()
    assert store.connected
    store.stop()
    assert not store.connected
    with pytest.raises(StoreError, match="stopped"):
        store.commit({"/x": 1})
    with pytest.raises(StoreError, match="stopped"):
        store.start()


def test_context_manager(zk_server, zk_root):
    with ClusterStore(ConnectionOptions(hosts=zk_server.hosts, root=zk_root)) as store:
        assert store.connected
        assert store.schema.root == zk_root
        assert store.ensure_schema() is True
    assert not store.connected


def test_module_imports_without_kazoo():
    """ansible-test's import sanity test loads module_utils without kazoo; it must import cleanly."""
    code = (
        "import sys; sys.modules['kazoo'] = None\n"
        "from pvc_cluster_common import _store as s\n"
        "assert s.KazooClient is None and 'kazoo' in s.KAZOO_IMPORT_ERROR\n"
        "try:\n"
        "    s.ClusterStore(s.ConnectionOptions(hosts='127.0.0.1:2181'))\n"
        "except s.StoreError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert "kazoo Python library is required" in out.stdout


# ---- accessors ----------------------------------------------------------------------------------


def test_read_write_children_exists_delete(store):
    s = store.schema
    node = s.node("n1")
    store.commit({s.node_key("n1", "memtotal"): 4096, s.node_key("n1", "daemon_state"): "run"})
    assert store.find_text(s.node_key("n1", "memtotal")) == "4096"
    text, version = store.find(s.node_key("n1", "memtotal"))
    assert (text, version) == ("4096", 0)
    assert store.get(s.node_key("n1", "daemon_state")) == ("run", 0)
    assert store.list_children(node, missing_ok=True) == ["daemon_state", "memtotal"]
    assert store.exists(node) is True
    store.commit({s.node_key("n1", "memtotal"): 8192})
    assert store.find(s.node_key("n1", "memtotal")) == ("8192", 1)

    # a key that does not exist: None (find), [] (missing_ok) or MissingError, never confused with a failure
    assert store.find_text(s.node_key("n1", "nokey")) is None
    assert store.find(s.node_key("n1", "nokey")) is None
    assert store.get_many([s.node_key("n1", "nokey"), s.node_key("n1", "memtotal")]) == {
        s.node_key("n1", "nokey"): None,
        s.node_key("n1", "memtotal"): ("8192", 1),
    }
    assert store.list_children(s.node("nobody"), missing_ok=True) == []
    with pytest.raises(MissingError, match=f"list {s.node('nobody')}: no such key"):
        store.list_children(s.node("nobody"))
    assert store.get_round([], [s.node("nobody")]) == ({}, {s.node("nobody"): None})
    assert store.exists(s.node("nobody")) is False
    with pytest.raises(MissingError):
        store.get(s.node_key("n1", "nokey"))

    store.delete(node)  # recursive by default
    assert store.exists(node) is False
    assert store.list_children(s.nodes(), missing_ok=True) == []
    store.delete(node)  # already gone: nothing to do


def test_write_creates_parents_and_nested_new_keys(store):
    s = store.schema
    uuid = "0b6f2c4e-0000-4000-8000-000000000001"
    store.commit(
        {s.domain(uuid): "vm1", s.domain_key(uuid, "xml"): "<domain/>", s.domain_meta(uuid, "node_limit"): ["n1"]}
    )
    assert store.find_text(s.domain(uuid)) == "vm1"  # the parent carries its own value, not ""
    assert store.find_text(s.domain_meta(uuid, "node_limit")) == '["n1"]'
    assert store.list_children(s.domain(uuid), missing_ok=True) == ["meta", "xml"]
    deep = store.schema.root + "/scratch/a/b/c"
    store.commit({deep: 1})
    assert store.find_text(deep) == "1"


def test_commit_returns_new_versions(store):
    a, b = store.schema.config("a"), store.schema.config("b")
    assert store.commit({a: 1}) == {a: 0}
    assert store.commit({a: 2, b: 3}) == {a: 1, b: 0}


def test_non_utf8(store):
    path = store.schema.config("blob")
    store.commit({path: b"\xff\xfe"})
    # untrusted text for the typed decoders, which refuse it; the other keys of the round are read
    assert store.find_text(path) == "\ufffd\ufffd"
    assert store.get_many([path, store.schema.nodes()]) == {path: ("\ufffd\ufffd", 0), store.schema.nodes(): ("", 0)}
    store.commit({path: b"\xff"})
    with pytest.raises(StoreError, match="not UTF-8"):
        store.get(path)


def test_delete_non_recursive_refuses_children(store):
    s = store.schema
    store.commit({s.node_key("n1", "memtotal"): 1})
    with pytest.raises(StoreError, match="it has children"):
        store.delete(s.node("n1"), recursive=False)
    store.delete([s.node_key("n1", "memtotal")], recursive=False)
    store.delete(s.node("n1"), recursive=False)
    assert store.exists(s.node("n1")) is False


def test_write_with_deletes_is_one_transaction(store):
    s = store.schema
    uuid = "u1"
    store.commit({s.domain_migration(uuid): {"id": 1}, s.node_reservation("n2", uuid): 512})
    store.commit({s.domain_key(uuid, "node"): "n2"}, delete=[s.domain_migration(uuid), s.node_reservation("n2", uuid)])
    assert store.exists(s.domain_migration(uuid)) is False
    assert store.list_children(s.node_reservations("n2"), missing_ok=True) == []
    assert store.find_text(s.domain_key(uuid, "node")) == "n2"


# ---- transactions: atomicity and compare-and-set -----------------------------------------------


def test_failed_version_check_writes_nothing(store):
    s = store.schema
    a, b, c = s.node_key("n1", "memalloc"), s.node_key("n1", "memprov"), s.node_key("n1", "new")
    store.commit({a: 1, b: 1})
    _, version_b = store.get(b)
    with pytest.raises(ConflictError, match=f"{b} changed concurrently"):
        store.commit({a: 2, b: 2, c: 2}, expect_versions={b: version_b + 7}, delete=[s.node_key("n1", "x")])
    assert store.find_text(a) == "1"
    assert store.find_text(b) == "1"
    assert store.exists(c) is False
    with pytest.raises(ConflictError):
        store.commit({a: 2, c: 2}, expect_versions={b: version_b + 7})
    assert store.find_text(a) == "1" and store.exists(c) is False


def test_compare_and_set(store):
    path = store.schema.domain_key("u1", "node")
    store.commit({path: "n1"})
    _, version = store.find(path)
    # two writers read the same version; the first wins, the second conflicts
    store.commit({path: "n2"}, expect_versions={path: version})
    with pytest.raises(ConflictError, match="changed concurrently"):
        store.commit({path: "n3"}, expect_versions={path: version})
    assert store.find_text(path) == "n2"
    # a version expected for a key that is missing is a conflict too
    with pytest.raises(ConflictError, match="does not exist"):
        store.commit(
            {store.schema.domain_key("u2", "node"): "n1"}, expect_versions={store.schema.domain_key("u2", "node"): 0}
        )


def test_check_only_and_delete_versions(store):
    s = store.schema
    guard, other = s.domain_key("u1", "state"), s.domain_key("u1", "node")
    store.commit({guard: "start", other: "n1"})
    _, gv = store.get(guard)
    store.commit({other: "n2"}, expect_versions={guard: gv})  # guard only checked
    store.commit({guard: "stop"})
    with pytest.raises(ConflictError):
        store.commit({other: "n3"}, expect_versions={guard: gv})
    assert store.find_text(other) == "n2"
    with pytest.raises(ConflictError):
        store.commit({}, delete=[guard], expect_versions={guard: gv})
    assert store.commit({}, delete=[guard], expect_versions={guard: gv + 1}) == {}
    assert store.exists(guard) is False
    with pytest.raises(ConflictError, match="does not exist"):
        store.commit({}, delete=[guard], expect_versions={guard: 0})


def test_create_only_keys(store):
    path = store.schema.domain_migration("u1")
    store.commit({path: {"id": 1}}, create=[path])
    with pytest.raises(ConflictError, match="already exists"):
        store.commit({path: {"id": 2}}, create=[path])
    assert store.find_text(path) == '{"id":1}'


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"values": {"/a": 1}, "expect_versions": {"/a": -1}}, "must be an int >= 0"),
        ({"values": {"/a": 1}, "expect_versions": {"/a": "3"}}, "must be an int >= 0"),
        ({"values": {"/a": 1}, "create": ["/b"]}, "must be written too"),
        ({"values": {"/a": 1}, "create": ["/a"], "expect_versions": {"/a": 0}}, "cannot also expect"),
        ({"values": {"/a/b": 1}, "delete": ["/a"]}, "cannot delete /a and write /a/b"),
    ],
)
def test_commit_refuses_contradictions(store, kwargs, message):
    with pytest.raises(ValueError, match=message):
        store.commit(**kwargs)


def test_create_race_is_retried_once(store, zk_server, monkeypatch, caplog):
    """Another client changes a key between our existence check and our transaction (a real race,
    made deterministic by running the other client's change when the store builds its transaction).
    A commit first runs as if its keys existed; only when that transaction says a key is missing
    are the keys checked, and the race is injected between that check and the second transaction."""
    path = store.schema.config("raced")
    other = KazooClient(hosts=zk_server.hosts)
    other.start(timeout=30)
    real_transaction = store.client.transaction
    built = []
    try:

        def race_on_second():
            built.append(1)
            if len(built) == 2:  # the planned transaction, after the assumed one failed
                other.create(path, b"theirs")
            return real_transaction()

        monkeypatch.setattr(store.client, "transaction", race_on_second)
        with caplog.at_level(logging.DEBUG, logger=_store.__name__):
            assert store.commit({path: "ours"}) == {path: 1}
        assert store.find_text(path) == "ours"
        assert "does not exist; checking the keys first" in caplog.text
        assert "retrying once" in caplog.text

        # create-only keys are never assumed: the race is a conflict, not retried
        other.delete(path)

        def race_once():
            monkeypatch.setattr(store.client, "transaction", real_transaction)
            other.create(path, b"theirs")
            return real_transaction()

        monkeypatch.setattr(store.client, "transaction", race_once)
        with pytest.raises(ConflictError):
            store.commit({path: "ours"}, create=[path])
        assert store.find_text(path) == "theirs"

        # a race on both planned attempts (created, then deleted again): StoreError
        def toggle():
            built.append(1)
            if len(built) > 1:  # leave the assumed attempt alone: it fails on the missing key
                if other.exists(path):
                    other.delete(path)
                else:
                    other.create(path, b"theirs")
            return real_transaction()

        other.delete(path)
        built.clear()
        monkeypatch.setattr(store.client, "transaction", toggle)
        with pytest.raises(StoreError, match="kept changing"):
            store.commit({path: "ours"})
        if other.exists(path):
            other.delete(path)
        built.clear()
        with pytest.raises(StoreError, match="kept changing"):
            store.commit({path: "ours"})
    finally:
        other.stop()
        other.close()


# ---- schema -------------------------------------------------------------------------------------


def test_ensure_schema_is_idempotent(make_store):
    store = make_store()
    assert store.ensure_schema() is True
    for path in store.schema.base_paths():
        assert store.exists(path) is True
    assert store.find_text(store.schema.schema_version()) == str(SCHEMA_VERSION)
    assert store.ensure_schema() is False
    # a second client sees it in place too
    assert make_store().ensure_schema() is False
    # one missing base path is recreated, nothing else touched
    store.delete(store.schema.nodes())
    store.commit({store.schema.default_selector(): "mem"})
    assert store.ensure_schema() is True
    assert store.exists(store.schema.nodes()) is True
    assert store.find_text(store.schema.default_selector()) == "mem"


@pytest.mark.parametrize(
    "stored, message",
    [(str(SCHEMA_VERSION + 1), "upgrade pvc.cluster first"), ("0", "no migration"), ("banana", "not a schema version")],
)
def test_ensure_schema_refuses_other_versions(store, stored, message):
    store.commit({store.schema.schema_version(): stored})
    with pytest.raises(StoreError, match=message):
        store.ensure_schema()
    assert store.find_text(store.schema.schema_version()) == stored


# ---- digest auth --------------------------------------------------------------------------------


def test_digest_auth_locks_out_unauthenticated_clients(make_store, zk_server):
    store = make_store(auth_username="pvc", auth_password="s3cret")
    store.ensure_schema()
    key = store.schema.node_key("n1", "memtotal")
    store.commit({key: 1})
    with store.lock(store.schema.node_lock("n1")):
        pass
    expected = make_digest_acl("pvc", "s3cret", all=True)
    for path in (
        store.schema.root,
        store.schema.schema_version(),
        store.schema.node("n1"),
        key,
        store.schema.node_lock("n1"),
    ):
        acls, _ = store.client.get_acls(path)
        assert acls == [expected], path

    anonymous = KazooClient(hosts=zk_server.hosts)
    wrong = KazooClient(hosts=zk_server.hosts, auth_data=[("digest", "pvc:wrong")])
    try:
        for client in (anonymous, wrong):
            client.start(timeout=30)
            with pytest.raises(NoAuthError):
                client.get(key)
            with pytest.raises(NoAuthError):
                client.get_children(store.schema.root)
            with pytest.raises(NoAuthError):
                client.set(key, b"evil")
    finally:
        for client in (anonymous, wrong):
            client.stop()
            client.close()
    # the store itself, without credentials, raises: refused is neither missing nor unreachable
    intruder = make_store()
    with pytest.raises(StoreError, match="NoAuthError") as refused:
        intruder.find_text(key)
    assert not isinstance(refused.value, (MissingError, _store.UnreachableError))
    with pytest.raises(StoreError):
        intruder.commit({key: 2})
    assert store.find_text(key) == "1"


# ---- verify_cluster: a pvc.cluster at the root, credentials that fit how it is secured ----------


def _tree(client, top):
    """Every znode below ``top`` with its data and ACL (to show that nothing was written)."""
    found = {}
    pending = [top]
    while pending:
        path = pending.pop()
        data, _stat = client.get(path)
        found[path] = (data, client.get_acls(path)[0])
        pending.extend(f"{path.rstrip('/')}/{child}" for child in client.get_children(path))
    return found


def test_verify_cluster_accepts_an_open_cluster_without_credentials(store, make_store):
    client = make_store()
    client.verify_cluster()
    assert client.client.default_acl is None  # kazoo's default: the open ACL of the cluster
    client.commit({client.schema.node_key("n1", "memtotal"): 1})


@pytest.mark.parametrize(
    "root, message",
    [
        (
            "/does-not-exist",
            "there is no pvc.cluster at {hosts}/does-not-exist: /does-not-exist does not exist; check zk_root",
        ),
        (
            "/zookeeper",
            "there is no pvc.cluster at {hosts}/zookeeper: /zookeeper/schema/version does not exist; check zk_root",
        ),
        ("/", "there is no pvc.cluster at {hosts}/: /schema/version does not exist; check zk_root"),
    ],
)
def test_verify_cluster_refuses_a_root_without_a_cluster(make_store, zk_server, root, message):
    with pytest.raises(StoreError) as failure:
        make_store(root=root).verify_cluster()
    assert str(failure.value).startswith(message.format(hosts=zk_server.hosts))


@pytest.mark.parametrize(
    "stored, message",
    [
        (str(SCHEMA_VERSION + 1), "upgrade pvc.cluster first"),
        ("banana" * 100, "holds 'bananabanana"),
        ("9" * 500, "not a schema version"),
    ],
)
def test_verify_cluster_refuses_other_schema_versions(store, make_store, stored, message):
    store.commit({store.schema.schema_version(): stored})
    with pytest.raises(StoreError, match=message):
        make_store().verify_cluster()


def test_verify_cluster_refuses_credentials_for_an_open_cluster(store, make_store, zk_server):
    before = _tree(store.client, store.schema.root)
    client = make_store(auth_username="operator", auth_password="s3cret")
    with pytest.raises(StoreError) as failure:
        client.verify_cluster()
    assert str(failure.value) == (
        f"the cluster at {zk_server.hosts}{store.schema.root} does not use authentication ({store.schema.root} lets anyone "
        "read and write it), so zk_username and zk_password are refused: the keys a task created with them would be "
        "readable by user operator only, locking the node daemons and every other reader out; leave them out, or secure "
        "the cluster first"
    )
    assert _tree(store.client, store.schema.root) == before


def test_verify_cluster_with_credentials_says_a_root_without_a_cluster_holds_none(make_store, zk_server):
    # ZooKeeper's own / lets anyone read and write, but what is wrong there is that it holds no
    # cluster (a zk_root mistyped), not that credentials were given to an open cluster
    client = make_store(root="/", auth_username="operator", auth_password="s3cret")
    with pytest.raises(StoreError) as failure:
        client.verify_cluster()
    assert str(failure.value) == (
        f"there is no pvc.cluster at {zk_server.hosts}/: /schema/version does not exist; check zk_root "
        "(the node daemons create a cluster's keys when they first start)"
    )


@pytest.fixture
def secured(make_store):
    """A cluster whose keys only user admin (password pw) may use, and world may read (its root only)."""
    store = make_store(auth_username="admin", auth_password="pw")
    store.ensure_schema()
    return store


def test_verify_cluster_refuses_a_client_without_the_clusters_credentials(secured, make_store, zk_server):
    where = f"{zk_server.hosts}{secured.schema.root}"
    with pytest.raises(StoreError) as failure:
        make_store().verify_cluster()
    assert str(failure.value) == (
        f"the cluster at {where} uses authentication: ZooKeeper lets no client without credentials "
        f"read {secured.schema.root}; give zk_username and zk_password"
    )
    with pytest.raises(StoreError) as failure:
        make_store(auth_username="admin", auth_password="wrong").verify_cluster()
    assert str(failure.value) == (
        f"ZooKeeper refuses user admin access to the cluster at {where} (cannot read the ACL of "
        f"{secured.schema.root}): check zk_username and zk_password"
    )
    # a root anyone may read but only admin may write: a client without credentials is refused too
    secured.client.set_acls(
        secured.schema.root, [make_digest_acl("admin", "pw", all=True), make_acl("world", "anyone", read=True)]
    )
    with pytest.raises(StoreError) as failure:
        make_store().verify_cluster()
    assert str(failure.value) == (
        f"the cluster at {where} uses authentication (the ACL of {secured.schema.root} grants "
        "digest:admin, world:anyone), but no zk_username and zk_password were given; give them"
    )


def test_verify_cluster_explains_a_server_that_requires_authentication(tmp_path):
    """A server with enforce.auth (the zookeeper role's default) closes an unauthenticated
    client's session: the module says what to give, not the name of kazoo's exception."""
    from tests.conftest import _serve

    server = _serve(tmp_path / "zookeeper", enforce_auth=True)
    stores = []
    try:
        for fields in ({}, {"auth_username": "admin", "auth_password": "pw"}):
            store = ClusterStore(ConnectionOptions(hosts=server.hosts, root="/enforced", **fields))
            stores.append(store)
            store.start()
        stores[1].ensure_schema()
        with pytest.raises(StoreError) as failure:
            stores[0].verify_cluster()
        assert str(failure.value) == (
            f"the ZooKeeper at {server.hosts} requires every client to authenticate (enforce.auth) "
            "and closed this client's session: give zk_username and zk_password for /enforced"
        )
    finally:
        for store in stores:
            store.stop()
        server.stop()


def test_keys_created_after_verify_cluster_take_their_rules_acl_with_the_identities_of_the_cluster_root(
    secured, make_store
):
    # the cluster root names the operator (every permission) and the nodes (read): a module's
    # client learns both there, and gives each key it creates the ACL of its rule (_schema.acl_rule)
    secured.client.set_acls(
        secured.schema.root, [make_digest_acl("admin", "pw", all=True), make_digest_acl("daemons", "pw2", read=True)]
    )
    operator = make_store(auth_username="admin", auth_password="pw")
    operator.verify_cluster()
    uuid = "6695eb01-f6a4-8304-79aa-97f2502e193f"
    state, xml = operator.schema.domain_key(uuid, "state"), operator.schema.domain_key(uuid, "xml")
    node = operator.schema.domain_key(uuid, "node")
    operator.commit({state: "stop", xml: "<domain/>", node: "n1"})
    admin = make_digest_acl("admin", "pw", all=True)
    assert secured.client.get_acls(node)[0] == [admin, make_digest_acl("daemons", "pw2", read=True, write=True)]
    assert secured.client.get_acls(state)[0] == [admin, make_digest_acl("daemons", "pw2", read=True)]
    assert secured.client.get_acls(xml)[0] == [admin, make_digest_acl("daemons", "pw2", read=True)]
    assert secured.client.get_acls(operator.schema.domain(uuid))[0] == [
        admin,
        make_digest_acl("daemons", "pw2", read=True, create=True),
    ]
    daemon = make_store(auth_username="daemons", auth_password="pw2")
    assert daemon.find_text(xml) == "<domain/>"
    daemon.commit({node: "n2"})
    with pytest.raises(StoreError):
        daemon.commit({state: "start"})
    with pytest.raises(StoreError):
        daemon.commit({xml: "<domain><evil/></domain>"})


# ---- the polling handler, assumed commits and one-round reads ---------------------------------------


def test_the_store_waits_with_poll(store):
    assert isinstance(store.client.handler, _store.PollingHandler)


def test_polling_select_reports_readable_writable_and_hangup():
    import socket

    handler = _store.PollingHandler()
    ours, theirs = socket.socketpair()
    try:
        assert handler.select([ours], [ours], [], 0) == ([], [ours], [])
        theirs.send(b"x")
        assert handler.select([ours], [], [], 1.0) == ([ours], [], [])
        ours.recv(1)
        assert handler.select([ours], [], [], 0) == ([], [], [])
        theirs.close()
        # the peer is gone: readable, so that the reader meets the end of the stream
        assert handler.select([ours], [], [], 1.0)[0] == [ours]
    finally:
        ours.close()


def test_commits_look_at_keys_only_when_the_transaction_says_so(store, monkeypatch):
    s = store.schema
    path, fresh = s.config("assumed"), s.config("assumed2")
    child = fresh + "/child"
    store.commit({path: "a"})
    looked = []
    for name in ("exists_async", "get_children_async"):
        real = getattr(store.client, name)
        monkeypatch.setattr(store.client, name, lambda p, *a, _real=real, **k: looked.append(p) or _real(p, *a, **k))
    # an existing key: one transaction, nothing looked at
    assert store.commit({path: "b"}) == {path: 1}
    assert looked == []
    # a missing key: the assumed transaction fails, the key is looked at, then created
    assert store.commit({fresh: "x", child: "y"}) == {fresh: 0, child: 0}
    assert fresh in looked and store.find_text(child) == "y"
    # deleting a key with children: it is listed, then deleted with them
    looked.clear()
    store.delete([fresh])
    assert fresh in looked and store.exists(fresh) is False
    # deleting a key that is not there is still not an error
    store.delete([fresh])
    assert store.find_text(path) == "b"


def test_a_commit_creating_under_a_missing_parent_and_setting_a_missing_key_writes_both(store):
    # A recovery's transaction (node_daemon/ha.py): the VM's first history record (its parent not
    # there yet, a create) and a reservation on the target (a set of a key that does not exist):
    # the assumed transaction first fails at the create, its parent is made, and the second run
    # fails at the set; that is still a wrong assumption, never an internal error.
    s = store.schema
    existing, history, reservation = s.config("k"), s.config("hist") + "/0001", s.config("res") + "/r1"
    store.commit({existing: "a", s.config("res"): ""})
    versions = store.commit({existing: "b", history: "h", reservation: 512}, create=[history])
    assert versions == {existing: 1, history: 0, reservation: 0}
    assert (store.find_text(history), store.find_text(reservation), store.find_text(existing)) == ("h", "512", "b")


def test_read_round_reads_and_lists_at_once(store):
    s = store.schema
    top = s.config("round")
    a, b, none = top + "/a", top + "/b", top + "/none"
    store.commit({a: "1", b: "2"})
    store.commit({a: "3"})
    found, listed = store.get_round([a, none], [top, s.config("nothing")])
    assert found == {a: ("3", 1), none: None}
    assert listed == {s.config("round"): ["a", "b"], s.config("nothing"): None}
    assert store.get_many([b]) == {b: ("2", 0)}


def test_a_round_gives_the_zxid_of_the_last_write_of_each_key_it_found(store):
    s = store.schema
    top = s.config("zxids")
    a, b, none = top + "/a", top + "/b", top + "/none"
    store.commit({a: "1", b: "2"})  # one transaction: one zxid
    found, listed, zxids = store.get_round_zxids([a, b, none], [top, s.config("nothing")])
    assert found == {a: ("1", 0), b: ("2", 0), none: None} and listed[top] == ["a", "b"]
    assert zxids[a] == zxids[b] and set(zxids) == {a, b, top}
    store.commit({b: "3"})
    store.commit({top + "/c": ""})  # a new child changes the list, not the data of its parent
    found, listed, later = store.get_round_zxids([a, b], [top])
    assert later[a] == zxids[a] and later[b] > zxids[a] and later[top] == zxids[top]
    store.commit({top: "note"})
    assert store.get_round_zxids([b], [top])[2][top] > later[b]


def test_a_transaction_keeps_the_callers_order_with_parents_before_their_children():
    order = _store._parents_first
    assert order(["/a/b/c", "/z", "/a/b", "/a"]) == ["/a", "/a/b", "/a/b/c", "/z"]
    assert order(["/deep/er/key", "/top"]) == ["/deep/er/key", "/top"]  # not by depth
    assert order(["/a/x/y", "/b", "/a"]) == ["/a", "/a/x/y", "/b"]  # an ancestor that is not a parent
    assert order(["/b", "/a"]) == ["/b", "/a"]


def test_watchers_learn_of_a_transactions_writes_in_the_callers_order(store):
    """ZooKeeper fires a transaction's watches in the order of its operations: the store keeps
    the caller's order (a migration record deeper than the VM's node, written first, is seen
    first), creating new parents before their children in the same transaction."""
    s = store.schema
    top = s.config("order")
    deep, shallow = top + "/runtime/x/record", top + "/node"
    store.commit({deep: "0", shallow: "0"})
    seen: list[tuple[str, str]] = []
    both = threading.Event()

    def watcher(path):
        def on_value(value):
            if value is not None and value.value != "0":
                seen.append((path, value.value))
                if len(seen) % 2 == 0:
                    both.set()

        return on_value

    store.watch_data(deep, watcher(deep))
    store.watch_data(shallow, watcher(shallow))
    store.commit({deep: "1", shallow: "1"})
    assert both.wait(60)
    assert seen == [(deep, "1"), (shallow, "1")]
    both.clear()
    store.commit({shallow: "2", deep: "2"})
    assert both.wait(60)
    assert seen[2:] == [(shallow, "2"), (deep, "2")]
    fresh = top + "/new"
    store.commit({fresh + "/child/leaf": "x", fresh + "/child": "", fresh: ""})  # parents made first
    assert store.get_many([fresh, fresh + "/child", fresh + "/child/leaf"])[fresh + "/child/leaf"] == ("x", 0)


def test_node_views_count_reservations_and_read_extra_keys(store):
    from pvc_cluster_common import _schema as S
    from pvc_cluster_common._cluster import read_node_view, read_node_views, read_node_views_of
    from pvc_cluster_common._selector import NodeView

    s = store.schema
    for name, total in (("n1", 8192), ("n2", 4096)):
        store.commit(
            {
                s.node(name): "",
                **{s.node_key(name, key): value for key, value in S.NODE_DEFAULTS.items()},
                s.node_key(name, S.NODE_MEMTOTAL): str(total),
                s.node_key(name, S.NODE_DAEMON_STATE): "run",
            }
        )
    store.commit(
        {s.node_reservations("n1"): "r", s.node_reservation("n1", "vm-a"): 512, s.node_reservation("n1", "vm-b"): 1024}
    )
    views, extra = read_node_views_of(store, ["n1", "n2", "ghost"], also=[s.node_reservations("n1")])
    assert sorted(views) == ["n1", "n2"]
    assert (views["n1"].memtotal, views["n1"].reserved, views["n1"].daemon_state) == (8192, 1536, "run")
    assert views["n2"].reserved == 0
    assert extra == {s.node_reservations("n1"): ("r", 0)}
    assert read_node_view(store, "n1") == views["n1"] and read_node_view(store, "ghost") is None
    assert read_node_views(store) == views
    # a fit check reads only the keys that decide a fit; the others read as 0
    store.commit({s.node_key("n1", S.NODE_MEMFREE): "777", s.node_key("n1", S.NODE_MEMPROV): "100"})
    fit = read_node_views_of(store, ["n1"], keys=NodeView.FIT_KEYS)[0]["n1"]
    assert (fit.memtotal, fit.memprov, fit.reserved, fit.memfree) == (8192, 100, 1536, 0)
    assert fit.headroom == read_node_view(store, "n1").headroom


def test_bulk_reads_of_nodes_and_vms_match_the_single_ones(store):
    from pvc_cluster_common import _schema as S
    from pvc_cluster_common._cluster import read_nodes_raw, read_vm, read_vms, vm_definition

    s = store.schema
    store.commit(
        {
            s.node("n1"): "",
            **{s.node_key("n1", key): value for key, value in S.NODE_DEFAULTS.items()},
            s.node_key("n1", S.NODE_MEMTOTAL): "8192",
            s.node_key("n1", S.NODE_ALIVE): "pid 1",
            s.node_reservation("n1", "vm-a"): 512,
            s.node_reservation("n1", "vm-b"): 256,
        }
    )
    store.commit({s.node("n2"): "", s.node_key("n2", S.NODE_DAEMON_STATE): "stop"})
    nodes = read_nodes_raw(store, ["n1", "n2", "ghost"])
    assert sorted(nodes) == ["n1", "n2"]
    raw, reservations, alive = nodes["n1"]
    assert (raw[S.NODE_MEMTOTAL], reservations, alive) == ("8192", {"vm-a": 512, "vm-b": 256}, True)
    raw, reservations, alive = nodes["n2"]
    assert (raw[S.NODE_DAEMON_STATE], raw[S.NODE_MEMTOTAL], reservations, alive) == ("stop", None, {}, False)

    uuids = []
    for i, memory in enumerate((256, 512)):
        uuid = f"6695eb01-f6a4-8304-79aa-97f2502e19{i:02d}"
        xml = (
            f"<domain type='test'><name>vm{i}</name><uuid>{uuid}</uuid><memory unit='MiB'>{memory}</memory>"
            "<vcpu>1</vcpu><os><type>hvm</type></os></domain>"
        )
        store.commit(vm_definition(s, uuid, f"vm{i}", xml, "n1", "start", {S.META_NODE_LIMIT: "n1"}))
        uuids.append(uuid)
    bulk = read_vms(store, uuids + ["not-a-vm"])
    assert list(bulk) == uuids
    assert bulk == {uuid: read_vm(store, uuid) for uuid in uuids}
    assert [vm.memory_mib for vm in bulk.values()] == [256, 512] and bulk[uuids[0]].meta.node_limit == ("n1",)


def test_wait_until_gone(store):
    from pvc_cluster_common._cluster import wait_until_gone

    s = store.schema
    parent = s.config("waiting")
    key, other = parent + "/record", parent + "/other"
    store.commit({key: "1", other: "x"})
    assert wait_until_gone(store, key, 0.2) is False  # still there: the wait times out
    deleter = threading.Thread(target=lambda: store.delete([key]))
    deleter.start()
    try:
        assert wait_until_gone(store, key, 30) is True  # gone (before or during the wait)
    finally:
        deleter.join()
    assert store.exists(other)  # a sibling is not waited for
    assert wait_until_gone(store, s.config("nowhere") + "/record", 0) is True  # no parent either
    store.commit({key: "2"})
    deleter = threading.Thread(target=lambda: store.delete([parent]))  # the parent goes with it
    deleter.start()
    try:
        assert wait_until_gone(store, key, 1.0) is True
    finally:
        deleter.join()
