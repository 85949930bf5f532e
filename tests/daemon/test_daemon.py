"""Node daemons as real processes, a real ZooKeeper, the libvirt test driver."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from pvc_cluster_common import _schema as S
from pvc_cluster_common._cluster import read_history, read_vm
from pvc_cluster_common._requests import request_vm

from .harness import REPO, TestCluster, domain_xml

pytestmark = pytest.mark.zk


@pytest.fixture
def cluster(zk_server, zk_root, tmp_path):
    c = TestCluster(zk_server.hosts, zk_root, tmp_path)
    yield c
    c.close()


def ready_nodes(cluster, *nodes):
    for node in nodes:
        cluster.add(node)
    for node in nodes:
        cluster.wait_node_state(node, "run")
        # new nodes start flushed; an operator makes them ready
        cluster.set_domain_state(node, "unflush")
    for node in nodes:
        cluster.wait_domain_state(node, "ready")


def request(cluster, uuid, kind, target=None, force_live=False):
    return request_vm(cluster.store, uuid, kind, "test", target=target, force_live=force_live)


def test_registration_states_and_orderly_stop(cluster):
    daemon = cluster.add("node1")
    cluster.wait_node_state("node1", "run")
    schema = cluster.schema
    assert cluster.store.find_text(schema.node_key("node1", S.NODE_DOMAIN_STATE)) == "flushed"
    assert cluster.store.exists(schema.node_key("node1", S.NODE_ALIVE))
    assert float(cluster.store.find_text(schema.node_key("node1", S.NODE_KEEPALIVE))) > 0
    assert cluster.store.find_text(schema.node_key("node1", S.NODE_LIBVIRT_URI)).startswith("qemu+tls://node1")
    # what the modules check a VM's vCPUs against: the host XML's 1 socket x 4 cores x 2 threads
    assert cluster.store.find_text(schema.node_key("node1", S.NODE_CPUTOTAL)) == "8"
    assert cluster.store.find_text(schema.node_key("node1", S.NODE_ADDRESS)) == "node1"
    assert daemon.stop() == 0
    assert cluster.store.find_text(schema.node_key("node1", S.NODE_DAEMON_STATE)) == "stop"
    assert not cluster.store.exists(schema.node_key("node1", S.NODE_ALIVE))
    assert "shutting down" in daemon.log()


def wait_for_line(path, text, daemon, timeout_s=30.0):
    """Lines about a state are written after the state itself: wait for one (a file gives no
    event to wait on), bounded."""
    deadline = time.monotonic() + timeout_s
    while text not in (path.read_text() if path.exists() else ""):
        assert time.monotonic() < deadline, f"no {text!r} in {path}: {daemon.log()[-2000:]}"
        time.sleep(0.05)


def test_the_log_file_that_logrotate_renamed_is_reopened_and_sighup_is_harmless(cluster, tmp_path):
    log_file = tmp_path / "pvc" / "node-daemon.log"
    daemon = cluster.add("node1", log={"stdout": False, "file": str(log_file)})
    cluster.wait_node_state("node1", "run")
    wait_for_line(log_file, "node node1 running", daemon)
    rotated = log_file.with_name("node-daemon.log.1")
    log_file.rename(rotated)  # logrotate without copytruncate: the daemon still holds the old file
    daemon.process.send_signal(signal.SIGHUP)  # what a reload sends: it must not end the daemon
    cluster.set_domain_state("node1", "unflush")
    cluster.wait_domain_state("node1", "ready")
    wait_for_line(log_file, "node node1 is ready", daemon)
    assert "node node1 is ready" not in rotated.read_text()
    assert daemon.process.poll() is None
    assert daemon.stop() == 0
    assert "shutting down" in log_file.read_text()


def test_peer_marks_a_killed_daemon_dead_and_it_comes_back(cluster):
    ready_nodes(cluster, "node1", "node2")
    cluster.daemons["node2"].kill()
    # marked dead, then (no fence device configured for it) fence-failed: nothing recovered
    cluster.wait_node_state("node2", "fence-failed")
    cluster.daemons["node2"].start()
    cluster.wait_node_state("node2", "run")


def test_vm_lifecycle_follows_zookeeper(cluster):
    ready_nodes(cluster, "node1")
    uuid, xml = domain_xml("web1")
    cluster.define_vm(xml, uuid, "web1", "node1", state="start")
    cluster.wait_running_on("node1", uuid)
    cluster.store.commit({cluster.schema.domain_key(uuid, S.DOMAIN_STATE): "shutdown"})
    cluster.wait_vm_state(uuid, "stop")  # the daemon records the end of the shutdown
    cluster.wait_running_on("node1", uuid, running=False)
    cluster.store.commit({cluster.schema.domain_key(uuid, S.DOMAIN_STATE): "start"})
    cluster.wait_running_on("node1", uuid)
    cluster.store.commit({cluster.schema.domain_key(uuid, S.DOMAIN_STATE): "restart"})
    cluster.wait_vm_state(uuid, "start")  # the restart ends in start
    cluster.store.commit({cluster.schema.domain_key(uuid, S.DOMAIN_STATE): "stop"})
    cluster.wait_running_on("node1", uuid, running=False)


def test_bad_xml_fails_with_the_libvirt_reason(cluster):
    ready_nodes(cluster, "node1")
    uuid, xml = domain_xml("broken")
    xml = xml.replace("<os><type>hvm</type></os>", "<os><type>no-such-os-type</type></os>")
    cluster.define_vm(xml, uuid, "broken", "node1", state="start")
    cluster.wait_vm_state(uuid, "fail")
    assert cluster.store.find_text(cluster.schema.domain_key(uuid, S.DOMAIN_FAILEDREASON))


def test_restarted_daemon_converges_its_vms(cluster):
    ready_nodes(cluster, "node1")
    running, xml1 = domain_xml("keep-running")
    stopped, xml2 = domain_xml("keep-stopped")
    cluster.define_vm(xml1, running, "keep-running", "node1", state="start")
    cluster.define_vm(xml2, stopped, "keep-stopped", "node1", state="stop")
    cluster.wait_running_on("node1", running)
    # the test driver's VMs die with the daemon's process, like a host's with the host
    cluster.daemons["node1"].kill()
    cluster.daemons["node1"].start()
    cluster.wait_node_state("node1", "run")
    cluster.wait_running_on("node1", running)
    runningdomains = json.loads(cluster.store.find_text(cluster.schema.node_key("node1", S.NODE_RUNNINGDOMAINS)))
    assert stopped not in runningdomains


def test_migration_default_falls_back_to_shutdown_on_the_test_driver(cluster):
    ready_nodes(cluster, "node1", "node2")
    uuid, xml = domain_xml("mover", memory="1", unit="GiB")
    cluster.define_vm(xml, uuid, "mover", "node1")
    cluster.wait_running_on("node1", uuid)
    record = request(cluster, uuid, "migrate", target="node2")
    assert record.step == "requested"
    assert cluster.store.find_text(cluster.schema.node_reservation("node2", uuid)) == "1024"
    cluster.wait_no_migration(uuid)
    cluster.wait_running_on("node2", uuid)
    cluster.wait_running_on("node1", uuid, running=False)
    final = read_history(cluster.store, uuid)[-1]
    assert final["result"] == "done"
    assert final["method"] == "default"
    assert final["method_used"] == "shutdown"
    assert "migrat" in final["fallback_reason"].lower()  # libvirt's "not supported" for the test driver
    assert set(final["steps"]) >= {"requested", "prepared", "transferring", "transferred", "done"}
    vm = read_vm(cluster.store, uuid)
    assert (vm.node, vm.lastnode) == ("node2", "node1")
    # node2's keepalive counts the VM in memprov and deletes the reservation in one transaction
    cluster.wait_no_reservations("node2")
    assert int(cluster.store.find_text(cluster.schema.node_key("node2", S.NODE_MEMPROV))) >= 1024


def test_live_only_migration_aborts_and_keeps_the_vm_on_its_source(cluster):
    ready_nodes(cluster, "node1", "node2")
    uuid, xml = domain_xml("live-only")
    cluster.define_vm(xml, uuid, "live-only", "node1", meta={S.META_MIGRATION_METHOD: "live"})
    cluster.wait_running_on("node1", uuid)
    request(cluster, uuid, "migrate", target="node2")
    cluster.wait_no_migration(uuid)
    final = read_history(cluster.store, uuid)[-1]
    assert final["result"] == "aborted"
    assert "live" in final["reason"]
    vm = read_vm(cluster.store, uuid)
    assert (vm.node, vm.lastnode) == ("node1", "")
    assert not cluster.store.exists(cluster.schema.node_reservation("node2", uuid))
    cluster.wait_no_reservations("node1")  # the abort's reservation on node1, folded into its memprov
    runningdomains = json.loads(cluster.store.find_text(cluster.schema.node_key("node1", S.NODE_RUNNINGDOMAINS)))
    assert uuid in runningdomains


def test_bad_config_exits_2_with_one_line(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text(
        "node: node1\ninsecure: true\nzookeeper:\n  hosts: 127.0.0.1:1\nintervals:\n  keepalive_s: fast\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "pvc_node_daemon", "--config", str(config)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "intervals.keepalive_s" in lines[0] and "accepted" in lines[0]


def test_metrics_endpoint_serves_node_figures_and_migrations(cluster):
    import urllib.request

    from tests.support.zookeeper import free_port

    ports = {node: free_port() for node in ("node1", "node2")}
    for node in ports:
        cluster.add(node, metrics={"enabled": True, "address": "127.0.0.1", "port": ports[node]})
    for node in ports:
        cluster.wait_node_state(node, "run")
        cluster.set_domain_state(node, "unflush")
    for node in ports:
        cluster.wait_domain_state(node, "ready")
    uuid, xml = domain_xml("metered", memory="512")
    cluster.define_vm(xml, uuid, "metered", "node1", meta={S.META_MIGRATION_METHOD: "shutdown"})
    cluster.wait_running_on("node1", uuid)
    request(cluster, uuid, "migrate", target="node2")
    cluster.wait_no_migration(uuid)
    cluster.wait_running_on("node2", uuid)
    # the target counts the VM it took at its next keepalive (a migration's end promises no
    # earlier instant): that keepalive publishes memprov, then sets the endpoint's figures
    cluster.wait(
        cluster.schema.node_key("node2", S.NODE_MEMPROV),
        lambda value: value is not None and int(value) == 512,
        60,
        "node2's keepalive to count the VM it took",
    )
    deadline = time.monotonic() + 30
    while True:
        text = urllib.request.urlopen(f"http://127.0.0.1:{ports['node2']}/metrics", timeout=30).read().decode()
        if 'pvc_node_memory_mib{kind="provisioned"} 512.0' in text or time.monotonic() > deadline:
            break
        time.sleep(0.05)  # the endpoint has no change event; the ZooKeeper figure above came first
    assert 'pvc_node_memory_mib{kind="provisioned"} 512.0' in text
    assert 'pvc_migrations_total{method="shutdown",result="done",role="target"} 1.0' in text
    assert "pvc_keepalive_duration_seconds_count" in text
    assert 'pvc_node_vms{state="start"} 1.0' in text
