"""playbooks/rotate_credentials.yml on the rolled-out lab, for real: the nodes' ZooKeeper password
rotated with the daemons running (each restarted one at a time from the configuration the
node_daemon role rendered), a second run that changes nothing, and the rotation back to the
inventory's password (the other rollout tests, which run before this file, use it).
docs/security.md, "Rotating credentials"."""

from __future__ import annotations

import pytest
import yaml

from pvc_cluster_common import _schema as S
from pvc_cluster_common._store import digest_id
from tests.support.identities import NODES_PASSWORD, NODES_USER

pytestmark = [pytest.mark.lab, pytest.mark.timeout(2400)]

PLAYBOOK = "playbooks/rotate_credentials.yml"
NEW_PASSWORD = "nodes-rotated-in-the-lab"


def _naming(cluster, digest: str) -> list[str]:
    """Every znode of the cluster whose ACL names ``digest``."""
    return cluster.store.replace_acl_id(digest, digest_id("nobody", "x"), keep_old=True, dry_run=True)


def _auth(cluster) -> list[dict]:
    return [
        yaml.safe_load(view.read_text("/etc/pvc/node-daemon.yaml"))["zookeeper"]["auth"] for view in cluster.views.views
    ]


def _running(cluster) -> None:
    for node in cluster.nodes():
        assert cluster.store.find_text(cluster.store.schema.node_key(node, S.NODE_DAEMON_STATE)) == "run", node
        assert cluster.store.exists(cluster.store.schema.node_key(node, S.NODE_ALIVE)), node


def test_the_nodes_password_is_rotated_with_the_daemons_running(rolled_out):
    cluster = rolled_out
    old_id, new_id = digest_id(NODES_USER, NODES_PASSWORD), digest_id(NODES_USER, NEW_PASSWORD)
    forward = {"pvc_rotate": "nodes", "pvc_rotate_new_password": NEW_PASSWORD}
    before = _auth(cluster)

    checked = cluster.playbook(PLAYBOOK, "--check", extra_vars=forward, timeout=1200)
    assert checked.returncode == 0, checked.failures()
    assert _naming(cluster, new_id) == [] and _auth(cluster) == before  # check mode changed nothing

    run = cluster.playbook(PLAYBOOK, extra_vars=forward, timeout=1800)
    assert run.returncode == 0, run.failures()
    try:
        assert _naming(cluster, old_id) == []
        assert _naming(cluster, new_id)
        for auth in _auth(cluster):
            assert auth["password"] == NEW_PASSWORD and "previous_password" not in auth
        _running(cluster)
        print(f"\nrotation: {run.duration_s:.1f} s; slowest tasks {run.slowest(5)}")

        again = cluster.playbook(PLAYBOOK, extra_vars=forward, timeout=1200)
        assert again.returncode == 0, again.failures()
        assert set(again.changed().values()) == {0}, f"changed on the second run: {again.changed_tasks()}"
    finally:
        # back to the inventory's password, the same way
        back = cluster.playbook(
            PLAYBOOK,
            extra_vars={
                "pvc_rotate": "nodes",
                "pvc_rotate_current_password": NEW_PASSWORD,
                "pvc_rotate_new_password": NODES_PASSWORD,
            },
            timeout=1800,
        )
    assert back.returncode == 0, back.failures()
    assert _naming(cluster, new_id) == []
    assert _auth(cluster) == before
    _running(cluster)
