"""The ZooKeeper identities of a secured test cluster (docs/security.md): the operator, the nodes'
shared identity, and each node's own. Test passwords: they protect nothing but test data."""

from __future__ import annotations

from pvc_cluster_common._store import ConnectionOptions, digest_id

OPERATOR_USER = "operator"
OPERATOR_PASSWORD = "operator-test-password"
NODES_USER = "nodes"
NODES_PASSWORD = "nodes-test-password"


def node_password(node: str) -> str:
    return f"{node}-test-password"


def operator_digest() -> str:
    return digest_id(OPERATOR_USER, OPERATOR_PASSWORD)


def nodes_digest() -> str:
    return digest_id(NODES_USER, NODES_PASSWORD)


def node_auth(node: str) -> dict:
    """The ``zookeeper.auth`` section of node ``node``'s daemon configuration."""
    return {
        "username": NODES_USER,
        "password": NODES_PASSWORD,
        "node_password": node_password(node),
        "operator_digest": operator_digest(),
    }


def operator_options(hosts: str, root: str, **fields) -> ConnectionOptions:
    """The operator's connection (it may create the cluster: it knows the nodes' digest id)."""
    return ConnectionOptions(
        hosts=hosts,
        root=root,
        auth_username=OPERATOR_USER,
        auth_password=OPERATOR_PASSWORD,
        nodes_digest=nodes_digest(),
        **fields,
    )


def node_options(node: str, hosts: str, root: str, **fields) -> ConnectionOptions:
    """A node daemon's connection."""
    return ConnectionOptions(
        hosts=hosts,
        root=root,
        auth_username=NODES_USER,
        auth_password=NODES_PASSWORD,
        node_name=node,
        node_password=node_password(node),
        operator_digest=operator_digest(),
        **fields,
    )
