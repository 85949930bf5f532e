"""Rotating the operator's password and ZooKeeper's certificate with the daemons running, as
docs/security.md ("Rotating credentials and certificates") says to: the cluster keeps working
through each step, and afterwards the old password is refused and the server shows its new
certificate. A private ZooKeeper secured as the zookeeper role's (enforce.auth, TLS client port)."""

from __future__ import annotations

import hashlib
import ssl
import uuid as uuidlib

import pytest
from cryptography.hazmat.primitives import serialization

from pvc_cluster_common._cluster import read_node_views, read_vm, rotate_password
from pvc_cluster_common._requests import plan_request, submit_request
from pvc_cluster_common._store import ClusterStore, ConnectionOptions, StoreError, digest_id
from tests.support.identities import NODES_PASSWORD, NODES_USER, OPERATOR_PASSWORD, OPERATOR_USER, node_password
from tests.support.tls import make_tls_material, reissue_server_keystore
from tests.support.zookeeper import ZooKeeperServer, connect, free_port

from .harness import TestCluster, domain_xml

pytestmark = pytest.mark.zk

NEW_OPERATOR_PASSWORD = "operator-rotated-password"
NODES = ("node1", "node2")


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    return make_tls_material(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def server(tmp_path_factory, tls):
    zookeeper = ZooKeeperServer(
        workdir=tmp_path_factory.mktemp("zookeeper"),
        client_port=free_port(),
        secure_client_port=free_port(),
        tls=tls.zookeeper_files(),
        tls_client_auth="none",
        enforce_auth=True,
    )
    zookeeper.start()
    try:
        yield zookeeper
    finally:
        zookeeper.stop()


def _hosts(server: ZooKeeperServer) -> str:
    return f"{server.client_address}:{server.secure_client_port}"


@pytest.fixture
def cluster(server, tls, tmp_path):
    """Two ready nodes whose daemons connect over TLS as the nodes and themselves."""
    c = TestCluster(_hosts(server), f"/rotation-{uuidlib.uuid4().hex[:8]}", tmp_path, zk_tls={"ca": str(tls.ca_cert)})
    try:
        for node in NODES:
            c.add(node)
        for node in NODES:
            c.wait_node_state(node, "run")
            c.set_domain_state(node, "unflush")
        for node in NODES:
            c.wait_domain_state(node, "ready")
        yield c
    finally:
        c.close()


def _tls_options(cluster: TestCluster, tls, password: str, username: str = OPERATOR_USER) -> ConnectionOptions:
    """How a client connects as ``username`` (by default the operator, as a module does) with
    ``password``, over TLS."""
    return ConnectionOptions(
        hosts=cluster.zk_hosts,
        root=cluster.root,
        timeout_s=10,
        auth_username=username,
        auth_password=password,
        tls=True,
        tls_ca=str(tls.ca_cert),
    )


def _operator(cluster: TestCluster, tls, password: str) -> ClusterStore:
    """The operator's store as a module makes it (verify_cluster learns the cluster's identities)."""
    store = ClusterStore(_tls_options(cluster, tls, password)).start()
    try:
        store.verify_cluster()
    except BaseException:
        store.stop()
        raise
    return store


def _running_vm(cluster: TestCluster, node: str) -> str:
    name = f"rot-{uuidlib.uuid4().hex[:6]}"
    uuid, xml = domain_xml(name, memory="256")
    cluster.define_vm(xml, uuid, name, node)
    cluster.wait_running_on(node, uuid)
    return uuid


def _migrate(cluster: TestCluster, store: ClusterStore, uuid: str, target: str) -> None:
    vm = read_vm(store, uuid)
    plan = plan_request(vm, "migrate", read_node_views(store), target=target)
    submit_request(store, plan, vm, requester="rotation test")
    cluster.wait_no_migration(uuid, timeout_s=120)
    cluster.wait_running_on(target, uuid, timeout_s=120)


def _restart(cluster: TestCluster, node: str, **auth) -> None:
    """Restart a node's daemon with changes to its zookeeper.auth section (what the node_daemon
    role does when its configuration changes), and wait until it runs again."""
    daemon = cluster.daemons[node]
    daemon.stop()
    cluster.wait_node_state(node, "stop", timeout_s=120)
    section = daemon.config["zookeeper"]["auth"]
    section.update(auth)
    for key in [key for key, value in section.items() if value is None]:  # None: taken out
        del section[key]
    daemon.start()
    cluster.wait_node_state(node, "run", timeout_s=120)


def test_the_operator_password_is_rotated_with_the_daemons_running(cluster, tls):
    old, new = digest_id(OPERATOR_USER, OPERATOR_PASSWORD), digest_id(OPERATOR_USER, NEW_OPERATOR_PASSWORD)
    vm = _running_vm(cluster, "node1")

    # 1. the new identity beside the old one on every znode: both passwords work
    added = cluster.store.replace_acl_id(old, new, keep_old=True)
    assert cluster.root in added and len(added) > 10
    rotated = _operator(cluster, tls, NEW_OPERATOR_PASSWORD)
    try:
        _operator(cluster, tls, OPERATOR_PASSWORD).stop()

        # 2. every daemon restarted with the new operator digest, one at a time; the VM keeps
        # running (its node's daemon finds it again)
        for node in NODES:
            _restart(cluster, node, operator_digest=new)
        cluster.wait_running_on("node1", vm, timeout_s=120)

        # 3. the old identity taken off every znode, by the operator holding both (the daemons
        # may have created znodes naming the old one alone before their restart)
        rotated.add_auth(OPERATOR_USER, OPERATOR_PASSWORD)
        assert rotated.replace_acl_id(old, new)
        cluster.store.stop()
        cluster.store = rotated  # the harness's waits read as the operator: the new one now
        assert rotated.replace_acl_id(old, new) == []  # no znode names the old identity any more

        # the old password is refused: no read, no write
        with pytest.raises(StoreError, match=f"ZooKeeper refuses user {OPERATOR_USER} access"):
            _operator(cluster, tls, OPERATOR_PASSWORD)
        stale = ClusterStore(_tls_options(cluster, tls, OPERATOR_PASSWORD)).start()
        try:
            with pytest.raises(StoreError):
                stale.get(cluster.schema.schema_version())
            with pytest.raises(StoreError):
                stale.commit({cluster.schema.schema_version(): "1"})
        finally:
            stale.stop()

        # the cluster keeps working with the new password: the VM moves and comes back, and what
        # the daemons created for it names the new identity only
        _migrate(cluster, rotated, vm, "node2")
        _migrate(cluster, rotated, vm, "node1")
        assert rotated.replace_acl_id(old, new) == []
    finally:
        if cluster.store is not rotated:
            rotated.stop()


def _served_certificate(server: ZooKeeperServer, tls) -> bytes:
    """The certificate the server's TLS client port presents (DER), checked against the CA."""
    context = ssl.create_default_context(cafile=str(tls.ca_cert))
    with context.wrap_socket(
        connect(server.client_address, server.secure_client_port, 10.0), server_hostname=server.client_address
    ) as sock:
        der = sock.getpeercert(binary_form=True)
    assert der
    return der


def test_zookeepers_certificate_is_reissued_with_the_daemons_running(cluster, server, tls):
    vm = _running_vm(cluster, "node1")
    before = _served_certificate(server, tls)

    # a new key and certificate from the same CA, and the server restarted with them (a member
    # of an ensemble at a time: the zookeeper role restarts it when its key store changes)
    issued = reissue_server_keystore(tls)
    server.restart(timeout_s=120)
    after = _served_certificate(server, tls)
    assert after != before
    assert after == issued.public_bytes(serialization.Encoding.DER)
    assert hashlib.sha256(after).hexdigest() != hashlib.sha256(before).hexdigest()

    # the daemons reconnected, checking the new certificate against the CA: a migration needs both
    _migrate(cluster, cluster.store, vm, "node2")
    for node in NODES:
        assert cluster.daemons[node].process.poll() is None, cluster.daemons[node].log()[-3000:]
        assert "CERTIFICATE_VERIFY_FAILED" not in cluster.daemons[node].log()


NEW_NODES_PASSWORD = "nodes-rotated-password"


def _rotate(store: ClusterStore, username: str, password: str, new_password: str, state: str, dry_run=False):
    """What pvc.cluster.cluster_credentials does (the module calls this, as the operator)."""
    return rotate_password(store, username, password, new_password, state, dry_run)


def _nodes_that_name(store: ClusterStore, digest: str) -> list[str]:
    """Every znode whose ACL names ``digest`` (a dry run that would add a throwaway id beside it)."""
    return store.replace_acl_id(digest, digest_id("nobody", "x"), keep_old=True, dry_run=True)


def test_the_nodes_and_a_nodes_own_password_are_rotated_with_the_daemons_running(cluster, tls):
    """playbooks/rotate_credentials.yml's steps for the nodes' shared password and node1's own: at no
    step does a daemon lose access (a migration between a moved and a not-yet-moved daemon works)."""
    store = cluster.store
    own_old, own_new = node_password("node1"), "node1-rotated-password"
    old_ids = (digest_id(NODES_USER, NODES_PASSWORD), digest_id("node1", own_old))
    vm = _running_vm(cluster, "node1")

    # 1. added: a dry run counts and changes nothing; the run changes those; a second run nothing
    planned = _rotate(store, NODES_USER, NODES_PASSWORD, NEW_NODES_PASSWORD, "added", dry_run=True)
    assert planned["before"] == ["current"] and planned["after"] == ["current", "new"]
    assert len(planned["paths"]) > 10
    assert _nodes_that_name(store, digest_id(NODES_USER, NEW_NODES_PASSWORD)) == []
    assert _rotate(store, NODES_USER, NODES_PASSWORD, NEW_NODES_PASSWORD, "added")["paths"] == planned["paths"]
    assert _rotate(store, NODES_USER, NODES_PASSWORD, NEW_NODES_PASSWORD, "added")["paths"] == []
    own = _rotate(store, "node1", own_old, own_new, "added")
    assert own["paths"] and all(p.startswith(cluster.schema.node("node1")) for p in own["paths"])
    # rotated before the daemons moved would be the operator's mistake; before added it is refused
    with pytest.raises(StoreError, match="run state=added first"):
        _rotate(store, "node2", node_password("node2"), "node2-rotated-password", "rotated")

    # 2. each daemon moves to the new passwords, holding the former ones too; between the two
    # restarts the VM migrates from the moved daemon to the one not yet moved, and back
    _restart(
        cluster,
        "node1",
        password=NEW_NODES_PASSWORD,
        previous_password=NODES_PASSWORD,
        node_password=own_new,
        previous_node_password=own_old,
    )
    _migrate(cluster, store, vm, "node2")
    _migrate(cluster, store, vm, "node1")
    _restart(cluster, "node2", password=NEW_NODES_PASSWORD, previous_password=NODES_PASSWORD)

    # 3. added again: the new identity on what the daemons created with the former one meanwhile;
    # then each daemon drops its former password
    _rotate(store, NODES_USER, NODES_PASSWORD, NEW_NODES_PASSWORD, "added")
    _rotate(store, "node1", own_old, own_new, "added")
    for node in NODES:
        _restart(cluster, node, previous_password=None, previous_node_password=None)
    cluster.wait_running_on("node1", vm, timeout_s=120)

    # 4. rotated: the former passwords are taken off every znode; a second run changes nothing
    done = _rotate(store, NODES_USER, NODES_PASSWORD, NEW_NODES_PASSWORD, "rotated")
    assert done["paths"] and done["after"] == ["new"]
    assert _rotate(store, "node1", own_old, own_new, "rotated")["paths"]
    for username, old, new in ((NODES_USER, NODES_PASSWORD, NEW_NODES_PASSWORD), ("node1", own_old, own_new)):
        again = _rotate(store, username, old, new, "rotated")
        assert again["paths"] == [] and again["before"] == ["new"]
        assert _rotate(store, username, old, new, "added")["paths"] == []
    for old_id in old_ids:
        assert _nodes_that_name(store, old_id) == [], old_id

    # the former passwords read and write nothing
    for username, password in ((NODES_USER, NODES_PASSWORD), ("node1", own_old)):
        stale = ClusterStore(_tls_options(cluster, tls, password, username)).start()
        try:
            with pytest.raises(StoreError):
                stale.get(cluster.schema.node_key("node1", "daemon_state"))
            with pytest.raises(StoreError):
                stale.commit({cluster.schema.node_key("node1", "daemon_state"): "dead"})
        finally:
            stale.stop()

    # the daemons keep working on the new passwords alone: the VM moves and comes back, asked by
    # an operator's client as a module makes it (it learns the nodes' identity from the cluster)
    operator = _operator(cluster, tls, OPERATOR_PASSWORD)
    cluster.store.stop()
    cluster.store = operator
    _migrate(cluster, operator, vm, "node2")
    _migrate(cluster, operator, vm, "node1")
    for node in NODES:
        assert cluster.daemons[node].process.poll() is None, cluster.daemons[node].log()[-3000:]
    for old_id in old_ids:
        assert _nodes_that_name(operator, old_id) == [], old_id
