"""Property: whatever is written into every key of one VM and of one node, the daemons keep serving
(docs/security.md). Daemons as real processes, a real ZooKeeper, the libvirt test driver.

Each example writes arbitrary bytes or arbitrary JSON into every key of VM ``victim`` and of node
``node3``, then migrates VM ``mover`` between node1 and node2 and waits for it to arrive. After
all examples: every daemon still runs, none logged a traceback, and a daemon restarted on all that
garbage comes back. PVC_POISON_EXAMPLES sets the number of examples (12: make test's budget).
"""

from __future__ import annotations

import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pvc_cluster_common import _schema as S

from .harness import TestCluster, domain_xml
from .test_daemon import ready_nodes, request, wait_for_line

pytestmark = pytest.mark.zk

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
# The values test_poison.py names among them, so that every run sees them (examples are random otherwise).
garbage = st.one_of(
    st.sampled_from(
        [b"42", b"[1, 2]", b'"mail"', b'{"id": "6f1c", "vm": "', b"1e999", b"", b"\xff\xfe", b"NaN", b"-1"]
    ),
    st.integers(min_value=1, max_value=50_000).map(lambda depth: b"[" * depth),
    st.binary(max_size=300),
    json_values.map(lambda value: json.dumps(value).encode()),
)

VM_KEYS = (
    S.DOMAIN_XML,
    S.DOMAIN_STATE,
    S.DOMAIN_NODE,
    S.DOMAIN_LASTNODE,
    S.DOMAIN_FAILEDREASON,
    S.DOMAIN_STATS,
    S.DOMAIN_MIGRATION,
    S.DOMAIN_RUNSTATE,
)
NODE_KEYS = tuple(key for key in S.NODE_DEFAULTS if key != S.NODE_ALIVE)


@pytest.fixture(scope="module")
def poisoned(zk_server, tmp_path_factory):
    """Three ready nodes; VM victim on node3 and VM mover on node1, both running."""
    import uuid as uuidlib

    c = TestCluster(zk_server.hosts, f"/test-poison-{uuidlib.uuid4().hex[:12]}", tmp_path_factory.mktemp("poison"))
    try:
        ready_nodes(c, "node1", "node2", "node3")
        victim, victim_xml = domain_xml("victim", memory="64")
        mover, mover_xml = domain_xml("mover", memory="64")
        c.define_vm(victim_xml, victim, "victim", "node3")
        c.define_vm(mover_xml, mover, "mover", "node1")
        c.wait_running_on("node3", victim)
        c.wait_running_on("node1", mover)
        yield c, victim, mover
    finally:
        c.close()


# kazoo's threads draw from the global random module (retry jitter) while hypothesis draws
@pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisDeprecationWarning")
@settings(
    max_examples=int(os.environ.get("PVC_POISON_EXAMPLES", "12")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    vm_values=st.fixed_dictionaries({key: garbage for key in VM_KEYS}),
    meta_values=st.fixed_dictionaries({key: garbage for key in S.META_KEYS}),
    node_values=st.fixed_dictionaries({key: garbage for key in NODE_KEYS}),
    name=garbage,
    history=garbage,
    reservation=garbage,
)
def test_garbage_in_every_key_of_a_vm_and_a_node_stops_nothing(
    poisoned, vm_values, meta_values, node_values, name, history, reservation
):
    cluster, victim, mover = poisoned
    schema = cluster.schema
    values = {
        schema.domain(victim): name,
        schema.domain_history(victim) + "/000000000000001-x": history,
        schema.node_reservation("node3", victim): reservation,
    }
    values.update({schema.domain_key(victim, key): value for key, value in vm_values.items()})
    values.update({schema.domain_meta(victim, key): value for key, value in meta_values.items()})
    values.update({schema.node_key("node3", key): value for key, value in node_values.items()})
    cluster.store.commit(values)

    # Meanwhile another VM migrates, there and back, between two healthy nodes.
    where = "node2" if cluster.store.find_text(schema.domain_key(mover, S.DOMAIN_NODE)) == "node1" else "node1"
    assert request(cluster, mover, "migrate", target=where) is not None
    cluster.wait_no_migration(mover)
    cluster.wait_running_on(where, mover)
    for name_, daemon in cluster.daemons.items():
        assert daemon.process.poll() is None, f"{name_} stopped:\n{daemon.log()[-4000:]}"


def test_after_the_garbage_every_daemon_serves_and_a_restart_comes_back(poisoned):
    # runs after the property above (same module-scoped cluster)
    cluster, _victim, mover = poisoned
    for name, daemon in cluster.daemons.items():
        assert daemon.process.poll() is None, name
        assert "Traceback" not in daemon.log(), f"{name}:\n{daemon.log()[-4000:]}"
    node2 = cluster.daemons["node2"]
    node2.stop()
    offset = node2.log_path.stat().st_size
    node2.start()
    wait_for_line(node2.log_path, "node node2 running", node2)
    cluster.wait_node_state("node2", "run")
    assert "Traceback" not in node2.log_path.read_bytes()[offset:].decode(errors="replace")
    where = "node2" if cluster.store.find_text(cluster.schema.domain_key(mover, S.DOMAIN_NODE)) == "node1" else "node1"
    assert request(cluster, mover, "migrate", target=where) is not None
    cluster.wait_no_migration(mover)
    cluster.wait_running_on(where, mover)
