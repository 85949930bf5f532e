"""ACLs of a secured cluster against a real ZooKeeper: who may read and write what (docs/security.md).

The operator creates the cluster, node daemons n1 and n2 register; then each identity tries what
it may and may not do, with kazoo directly (a hostile client does not go through the store).
"""

from __future__ import annotations

import json
import logging

import pytest
from kazoo.client import KazooClient
from kazoo.exceptions import NoAuthError
from kazoo.security import OPEN_ACL_UNSAFE, make_digest_acl

from pvc_cluster_common import _schema as S
from pvc_cluster_common._cluster import move_runstate, read_vm, vm_definition
from pvc_cluster_common._store import ClusterStore, ConnectionOptions, StoreError
from tests.support import identities as ids

pytestmark = pytest.mark.zk

UUID = "0b1c5f6e-2a47-4c1e-9d63-6f0a8c2b9e11"
XML = f"<domain type='test'><name>vm1</name><uuid>{UUID}</uuid><memory unit='MiB'>256</memory></domain>"


@pytest.fixture
def cluster(zk_server, zk_root):
    """The operator's store with the cluster and VM vm1 in it, and the stores of daemons n1, n2."""
    stores = []

    def start(options):
        store = ClusterStore(options).start()
        stores.append(store)
        return store

    operator = start(ids.operator_options(zk_server.hosts, zk_root))
    assert operator.ensure_schema() is True
    operator.commit(vm_definition(operator.schema, UUID, "vm1", XML, "n1", "start"))
    nodes = {}
    for node in ("n1", "n2"):
        nodes[node] = start(ids.node_options(node, zk_server.hosts, zk_root))
        nodes[node].ensure_schema()
        schema = nodes[node].schema
        values = {schema.node_key(node, key): value for key, value in S.NODE_DEFAULTS.items()}
        # as the daemon registers
        nodes[node].commit({**values, schema.node_reservations(node): "", schema.node_claims(node): ""})
    yield operator, nodes
    for store in stores:
        store.stop()


@pytest.fixture
def raw_client(zk_server):
    """raw_client(*auth) -> a started KazooClient with those digest credentials ("user:password")."""
    clients = []

    def make(*auth):
        client = KazooClient(hosts=zk_server.hosts, auth_data=[("digest", a) for a in auth])
        client.start(timeout=30)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.stop()
        client.close()


def _every_path(client, top):
    found, pending = [], [top]
    while pending:
        path = pending.pop()
        found.append(path)
        pending.extend(f"{path}/{child}" for child in client.get_children(path))
    return sorted(found)


def test_an_unauthenticated_client_reads_nothing_and_writes_nothing(cluster, raw_client):
    operator, _nodes = cluster
    schema = operator.schema
    paths = _every_path(operator.client, schema.root)
    assert schema.domain_key(UUID, S.DOMAIN_XML) in paths and schema.node_key("n2", S.NODE_MEMTOTAL) in paths
    anonymous = raw_client()
    for path in paths:
        with pytest.raises(NoAuthError):
            anonymous.get(path)
        with pytest.raises(NoAuthError):
            anonymous.get_children(path)
        with pytest.raises(NoAuthError):
            anonymous.set(path, b"evil")
        with pytest.raises(NoAuthError):
            anonymous.create(f"{path}/evil", b"evil")
    for path in paths:
        if path != schema.root:
            with pytest.raises(NoAuthError):
                anonymous.delete(path)
    assert _every_path(operator.client, schema.root) == paths


def test_a_wrong_password_is_no_identity(cluster, raw_client):
    operator, _nodes = cluster
    for auth in ("operator:wrong", "nodes:wrong", "n1:wrong"):
        client = raw_client(auth)
        with pytest.raises(NoAuthError):
            client.get(operator.schema.domain_key(UUID, S.DOMAIN_XML))


def test_a_node_identity_writes_its_own_keys_and_the_runtime_keys_of_vms(cluster, raw_client):
    operator, nodes = cluster
    schema = operator.schema
    n1 = raw_client(f"{ids.NODES_USER}:{ids.NODES_PASSWORD}", f"n1:{ids.node_password('n1')}")
    n1.set(schema.node_key("n1", S.NODE_MEMTOTAL), b"4096")
    n1.set(schema.domain_key(UUID, S.DOMAIN_NODE), b"n2")
    n1.set(schema.domain_key(UUID, S.DOMAIN_FAILEDREASON), b"why")
    # through the store: a migration record, a reservation on the target, an audit record, then the end
    store = nodes["n1"]
    migration, reservation = schema.domain_migration(UUID), schema.node_reservation("n2", UUID)
    store.commit({migration: {"id": "m"}, reservation: 256})
    store.commit({schema.domain_history(UUID) + "/0001": {"id": "m"}}, delete=[migration, reservation])
    assert store.exists(migration) is False and store.exists(reservation) is False
    # the state it moved the VM to, beside the operator's desired state
    assert move_runstate(store, UUID, "fail", "n1", also={schema.domain_key(UUID, S.DOMAIN_FAILEDREASON): "no"})
    assert (read_vm(operator, UUID).state, read_vm(operator, UUID).desired_state) == ("fail", "start")
    # and each of those keys is readable by the other node and by the operator
    assert nodes["n2"].find_text(schema.domain_history(UUID) + "/0001") == '{"id":"m"}'
    assert operator.find_text(schema.node_key("n1", S.NODE_MEMTOTAL)) == "4096"


def test_a_node_identity_cannot_write_another_nodes_keys(cluster, raw_client):
    operator, nodes = cluster
    schema = operator.schema
    n1 = raw_client(f"{ids.NODES_USER}:{ids.NODES_PASSWORD}", f"n1:{ids.node_password('n1')}")
    # n2's own states: a peer's verdict about n2 is the peer's own record, never a write of n2's keys
    for key in (S.NODE_DAEMON_STATE, S.NODE_DOMAIN_STATE):
        assert n1.get(schema.node_key("n2", key)) is not None
        _refused(n1, schema.node_key("n2", key))
    # a peer claims a version of n2's state (create-once) and notes its verdict in the container;
    # the claim, once made, it cannot alter nor delete, nor may it delete the container
    claim = schema.node_claim("n2", 3)
    nodes["n1"].commit({claim: "n1"}, create=[claim])  # with the ACL its rule gives it
    n1.set(schema.node_claims("n2"), b'{"by": "n1", "result": "fencing", "version": 3}')
    _refused(n1, claim)
    with pytest.raises(NoAuthError):
        n1.delete(schema.node_claims("n2"), recursive=True)
    with pytest.raises(NoAuthError):
        n1.set_acls(schema.node_claims("n2"), OPEN_ACL_UNSAFE)
    # n2 itself clears the claims of its older states (as its daemon does when it registers)
    nodes["n2"].delete(claim)
    assert not nodes["n2"].exists(claim)
    # n2's record of its fence of n3, and n2's own fence key (an operator's confirm_down)
    record = json.dumps({"by": "n2", "method": "ipmi", "result": "fenced", "started": 1.0})
    nodes["n2"].commit({schema.node_fence_record("n2", "n3"): record})
    operator.commit({schema.node_key("n2", S.NODE_FENCE): record})
    for path in (schema.node_fence_record("n2", "n3"), schema.node_key("n2", S.NODE_FENCE), schema.node_fences("n2")):
        assert n1.get(path) is not None
        _refused(n1, path)
    # nothing can be created in n2's znode: not a fence record, not an `alive` hiding n2's death
    for key in (S.NODE_ALIVE, "anything"):
        with pytest.raises(NoAuthError):
            n1.create(schema.node_key("n2", key), b"x")
    with pytest.raises(NoAuthError):
        n1.create(schema.node_fence_record("n2", "n1"), record.encode())
    # its own record of a fence of n2 it writes, under its own keys
    nodes["n1"].commit({schema.node_fence_record("n1", "n2"): record.replace('"n2"', '"n1"')})
    for key in (S.NODE_MEMTOTAL, S.NODE_MAINTENANCE, S.NODE_ADDRESS, S.NODE_RUNNINGDOMAINS, S.NODE_KEEPALIVE):
        assert n1.get(schema.node_key("n2", key)) is not None  # reads it
        with pytest.raises(NoAuthError):
            n1.set(schema.node_key("n2", key), b"0")
        with pytest.raises(NoAuthError):
            n1.delete(schema.node_key("n2", key))
    with pytest.raises(NoAuthError):
        n1.delete(schema.node("n2"), recursive=True)


def _refused(client, path: str, create_child: bool = True) -> None:
    """Every write of ``path`` by ``client`` is refused: set, delete, a new child, its ACL."""
    with pytest.raises(NoAuthError):
        client.set(path, b"evil")
    with pytest.raises(NoAuthError):
        client.delete(path)
    with pytest.raises(NoAuthError):
        client.set_acls(path, OPEN_ACL_UNSAFE)
    if create_child:
        with pytest.raises(NoAuthError):
            client.create(f"{path}/evil", b"evil")


def test_a_node_identity_writes_no_key_the_operator_owns(cluster, raw_client):
    """With both of its identities (the nodes' and its own), a node daemon's credentials write
    none of a VM's XML, desired state, name or meta (each meta key, set or not), nor the cluster's
    configuration: one leaked node credential defines, starts or stops no VM."""
    operator, _nodes = cluster
    schema = operator.schema
    operator.commit(
        {
            schema.domain_meta(UUID, key): value
            for key, value in (
                (S.META_NODE_LIMIT, '["n1"]'),
                (S.META_NODE_AUTOSTART, "false"),
                (S.META_MIGRATION_METHOD, "live"),
            )
        }
    )
    operator.commit({schema.default_selector(): "mem", schema.require_n1(): "false"})
    n1 = raw_client(f"{ids.NODES_USER}:{ids.NODES_PASSWORD}", f"n1:{ids.node_password('n1')}")
    owned = [
        schema.domain_key(UUID, S.DOMAIN_XML),
        schema.domain_key(UUID, S.DOMAIN_STATE),
        schema.domain_meta(UUID),
        schema.default_selector(),
        schema.require_n1(),
        schema.schema_version(),
    ]
    owned += [
        schema.domain_meta(UUID, key) for key in (S.META_NODE_LIMIT, S.META_NODE_AUTOSTART, S.META_MIGRATION_METHOD)
    ]
    for path in owned:
        assert n1.get(path) is not None  # it reads them
        _refused(n1, path)
    with pytest.raises(NoAuthError):
        n1.set(schema.domain(UUID), b"renamed")
    # a meta key the operator never set cannot be created either
    for key in (S.META_NODE_SELECTOR, S.META_MIGRATION_MAX_DOWNTIME_MS, S.META_MIGRATION_AUTO_CONVERGE):
        with pytest.raises(NoAuthError):
            n1.create(schema.domain_meta(UUID, key), b"true")
    assert operator.find_text(schema.domain_key(UUID, S.DOMAIN_STATE)) == "start"
    assert operator.find_text(schema.domain_meta(UUID, S.META_NODE_AUTOSTART)) == "false"


def test_a_node_identity_cannot_define_a_vm_nor_change_its_xml_or_meta(cluster, raw_client):
    operator, _nodes = cluster
    schema = operator.schema
    n1 = raw_client(f"{ids.NODES_USER}:{ids.NODES_PASSWORD}", f"n1:{ids.node_password('n1')}")
    xml = schema.domain_key(UUID, S.DOMAIN_XML)
    with pytest.raises(NoAuthError):
        n1.set(xml, b"<domain/>")
    with pytest.raises(NoAuthError):
        n1.delete(xml)  # so it cannot be created again with other content
    with pytest.raises(NoAuthError):
        n1.set_acls(xml, OPEN_ACL_UNSAFE)
    with pytest.raises(NoAuthError):
        n1.create(schema.domain("ffffffff-2a47-4c1e-9d63-6f0a8c2b9e11"), b"evil")  # a new VM
    with pytest.raises(NoAuthError):
        n1.delete(schema.domain(UUID), recursive=True)
    operator.commit({schema.domain_meta(UUID, S.META_NODE_LIMIT): ["n1"]})
    with pytest.raises(NoAuthError):
        n1.set(schema.domain_meta(UUID, S.META_NODE_LIMIT), b'["n1", "n2"]')
    with pytest.raises(NoAuthError):
        n1.delete(schema.domain_meta(UUID, S.META_NODE_LIMIT))
    with pytest.raises(NoAuthError):
        n1.set(schema.domain_meta(UUID), b"x")
    with pytest.raises(NoAuthError):
        n1.delete(schema.domain_meta(UUID), recursive=True)
    with pytest.raises(NoAuthError):
        n1.set(schema.schema_version(), b"2")
    assert operator.find_text(xml) == XML


def test_the_operator_learns_the_identities_from_the_cluster_and_creates_keys_the_nodes_can_use(
    cluster, zk_server, zk_root
):
    _operator, nodes = cluster
    module = ClusterStore(
        ConnectionOptions(
            hosts=zk_server.hosts, root=zk_root, auth_username=ids.OPERATOR_USER, auth_password=ids.OPERATOR_PASSWORD
        )
    ).start()
    try:
        module.verify_cluster()
        other = "5d1c5f6e-2a47-4c1e-9d63-6f0a8c2b9e11"
        module.commit(vm_definition(module.schema, other, "vm2", XML.replace(UUID, other), "n2", "stop"))
        for store in nodes.values():
            assert store.find_text(module.schema.domain_key(other, S.DOMAIN_XML)) == XML.replace(UUID, other)
            store.commit({module.schema.domain_key(other, S.DOMAIN_FAILEDREASON): "why"})
            assert move_runstate(store, other, "fail", "n1")  # the VM's runtime/ the operator created
            for refused in (S.DOMAIN_STATE, S.DOMAIN_XML):
                with pytest.raises(StoreError, match="NoAuth"):
                    store.commit({module.schema.domain_key(other, refused): "<domain/>"})
        assert read_vm(module, other).state == "fail" and read_vm(module, other).desired_state == "stop"
        # and the nodes' keys the operator writes stay theirs: a reservation made by a module
        module.commit({module.schema.node_reservation("n1", other): 256})
        nodes["n2"].delete([module.schema.node_reservation("n1", other)])
        assert not module.exists(module.schema.node_reservation("n1", other))
    finally:
        module.stop()


def test_a_node_identity_is_refused_as_the_operator(cluster, zk_server, zk_root):
    module = ClusterStore(
        ConnectionOptions(
            hosts=zk_server.hosts, root=zk_root, auth_username=ids.NODES_USER, auth_password=ids.NODES_PASSWORD
        )
    ).start()
    try:
        with pytest.raises(StoreError, match="user nodes is not the operator of the cluster"):
            module.verify_cluster()
    finally:
        module.stop()


# ---- ensure_schema: existing base paths --------------------------------------------------------


def test_ensure_schema_secures_base_paths_left_open(zk_server, zk_root, caplog, raw_client):
    opened = ClusterStore(ConnectionOptions(hosts=zk_server.hosts, root=zk_root)).start()  # an older, open cluster
    try:
        opened.ensure_schema()
    finally:
        opened.stop()
    store = ClusterStore(ids.node_options("n1", zk_server.hosts, zk_root)).start()
    try:
        with caplog.at_level(logging.WARNING):
            assert store.ensure_schema() is False
        for path in store.schema.base_paths():
            if path != "/":
                acls, _stat = store.client.get_acls(path)  # digests shown as "user:x" to a node
                assert {(a.perms, a.id.id.split(":")[0]) for a in acls} == {
                    (a.perms, a.id.id.split(":")[0]) for a in store.acl_for(path)
                }, path
                assert "world" not in {acl.id.scheme for acl in acls}
        assert f"{store.schema.nodes()} was open to anyone (ACL world:anyone:rwcda): secured it" in caplog.text
        with pytest.raises(NoAuthError):
            raw_client().get(store.schema.schema_version())
        assert store.ensure_schema() is False  # nothing left to repair
    finally:
        store.stop()


def test_ensure_schema_refuses_a_cluster_secured_for_other_identities(zk_server, zk_root):
    other = ClusterStore(
        ConnectionOptions(hosts=zk_server.hosts, root=zk_root, auth_username="someone", auth_password="pw")
    ).start()
    try:
        other.ensure_schema()  # every base path: someone's alone
    finally:
        other.stop()
    store = ClusterStore(ids.operator_options(zk_server.hosts, zk_root)).start()
    try:
        with pytest.raises(StoreError) as failure:
            store.ensure_schema()
    finally:
        store.stop()
    assert str(failure.value) == (
        f"ZooKeeper at {zk_server.hosts} refuses user operator access to {zk_root}/schema/version: "
        "the cluster was secured with other identities; check the usernames and passwords "
        "(and the operator's digest) this client was given"
    )


def test_an_older_clusters_looser_acl_of_a_nodes_state_is_accepted_with_a_warning(cluster, caplog):
    """An older version let every node identity write each node's daemon_state and domain_state
    (a peer fencing it wrote them): the check of a node's keys accepts that ACL with a warning
    (the node identity cannot change an ACL; the operator can), and refuses any other."""
    operator, nodes = cluster
    schema = operator.schema
    path = schema.node_key("n2", S.NODE_DAEMON_STATE)
    older = operator._acl(S.AclRule(S.PERM_READ | S.PERM_WRITE, "n2"), nodes["n2"].acl_ids)
    operator.client.set_acls(path, older)
    with caplog.at_level(logging.WARNING):
        assert nodes["n2"].check_acls([path]) == []
    assert "has the ACL of an older version" in caplog.text
    # a key that never had that rule is not accepted with it
    other = schema.node_key("n2", S.NODE_MEMTOTAL)
    operator.client.set_acls(other, older)
    with pytest.raises(StoreError, match="secured with other identities"):
        nodes["n2"].check_acls([other])


def test_a_daemon_refuses_a_node_registered_by_another_identity(cluster, zk_server, zk_root):
    operator, _nodes = cluster
    # n3's znode created by the operator for someone else (digest of another password)
    squatter = [
        make_digest_acl(ids.OPERATOR_USER, ids.OPERATOR_PASSWORD, all=True),
        make_digest_acl("n3", "another-password", all=True),
    ]
    operator.client.create(operator.schema.node("n3"), b"", acl=squatter)
    store = ClusterStore(ids.node_options("n3", zk_server.hosts, zk_root)).start()
    try:
        with pytest.raises(StoreError, match="secured with other identities"):
            store.check_acls([store.schema.node("n3")])
    finally:
        store.stop()


# ---- options --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields, message",
    [
        ({}, "authentication is required"),
        ({"auth_username": "nodes", "auth_password": "pw", "operator_digest": ids.operator_digest()}, "node_password"),
        ({"auth_username": "nodes", "auth_password": "pw", "node_password": "x"}, "operator_digest must be"),
        (
            {"auth_username": "nodes", "auth_password": "pw", "node_password": "x", "operator_digest": "operator:pw"},
            "operator_digest must be",
        ),
        (
            {
                "auth_username": "n1",
                "auth_password": "pw",
                "node_password": "x",
                "operator_digest": ids.operator_digest(),
            },
            "must not be a node's name",
        ),
        ({"insecure": True, "auth_username": "nodes", "auth_password": "pw"}, "credentials are refused"),
    ],
)
def test_a_node_daemon_needs_its_identities_or_insecure(fields, message):
    with pytest.raises(ValueError, match=message):
        ConnectionOptions(hosts="h:1", node_name="n1", **fields).validate()


def test_an_insecure_node_daemon_needs_no_credentials():
    ConnectionOptions(hosts="h:1", node_name="n1", insecure=True).validate()
    assert "pw2" not in repr(ConnectionOptions(hosts="h:1", node_name="n1", node_password="pw2"))
