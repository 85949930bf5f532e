"""One bad key harms nobody but itself (docs/security.md): daemons as real processes, a real ZooKeeper.

Each case here crashed every daemon at start-up, or blocked a flush for ever, before values read
from ZooKeeper were decoded with bounds: migration records that are no object, truncated JSON, 50,000 nested ``[``,
and a VM whose XML is empty.
"""

from __future__ import annotations

import json
import time

import pytest

from pvc_cluster_common import _schema as S
from pvc_cluster_common._cluster import read_history, read_vm
from pvc_cluster_common._requests import RequestError

from .harness import TestCluster, domain_xml
from .test_daemon import ready_nodes, request, wait_for_line

pytestmark = pytest.mark.zk

BAD_RECORDS = {
    "int": "42",
    "list": "[1, 2]",
    "string": '"mail"',
    "truncated": '{"id": "6f1c2a9b0d3e", "vm": "',
    "nested": "[" * 50_000,
}


@pytest.fixture
def cluster(zk_server, zk_root, tmp_path):
    c = TestCluster(zk_server.hosts, zk_root, tmp_path)
    yield c
    c.close()


def log_since(daemon, offset: int) -> str:
    return daemon.log_path.read_bytes()[offset:].decode(errors="replace")


def test_bad_migration_records_stop_no_daemon_and_no_other_vm_and_an_operator_clears_them(cluster):
    ready_nodes(cluster, "node1", "node2")
    schema, store = cluster.schema, cluster.store
    bad = {}
    for label, value in BAD_RECORDS.items():
        uuid, xml = domain_xml(f"bad-{label}", memory="64")
        cluster.define_vm(xml, uuid, f"bad-{label}", "node1")
        bad[uuid] = value
    good, good_xml = domain_xml("good", memory="64")
    cluster.define_vm(good_xml, good, "good", "node1")
    for uuid in [*bad, good]:
        cluster.wait_running_on("node1", uuid)
    store.commit({schema.domain_migration(uuid): value for uuid, value in bad.items()})

    # A restart reads every record at start-up (it used to crash there, and systemd restarted it
    # into the same crash). node2 runs nothing: the test driver's VMs would die with node1's process.
    node1, node2 = cluster.daemons["node1"], cluster.daemons["node2"]
    node2.kill()
    offset = node2.log_path.stat().st_size
    node2.start()
    # the restarted process's line (the killed one wrote the same): its `run` is written before it
    deadline = time.monotonic() + 30
    while "node node2 running" not in log_since(node2, offset):
        assert time.monotonic() < deadline, node2.log()[-2000:]
        time.sleep(0.05)  # a file gives no event to wait on

    # The other VM still migrates, both ways, while the bad records sit there.
    assert request(cluster, good, "migrate", target="node2") is not None
    cluster.wait_no_migration(good)
    cluster.wait_running_on("node2", good)
    assert request(cluster, good, "unmigrate") is not None
    cluster.wait_no_migration(good)
    cluster.wait_running_on("node1", good)
    assert node1.process.poll() is None and node2.process.poll() is None

    # Each bad record is reported once per version by each daemon process (however many passes
    # read it since), and shown; nothing acts on it.
    text = log_since(node2, offset)
    for uuid in bad:
        line = f"invalid value in ZooKeeper: {schema.domain_migration(uuid)}"
        assert text.count(line) == 1 and log_since(node1, 0).count(line) == 1, text[-4000:]
        vm = read_vm(store, uuid)
        assert vm.migration is None and "is not valid" in vm.migration_error
        with pytest.raises(RequestError, match="has a migration record that is not valid"):
            request(cluster, uuid, "migrate", target="node2")
    assert "Traceback" not in text + log_since(node1, 0)

    # A flush moves what it can, then waits for the operator instead of spinning.
    cluster.set_domain_state("node1", "flush")
    cluster.wait_running_on("node2", good)
    wait_for_line(node1.log_path, "waits for an operator", node1)
    assert store.find_text(schema.node_key("node1", S.NODE_DOMAIN_STATE)) == "flush"
    # The operator clears the records (as pvc.cluster.vm_migrate state=cleared does): the flush ends.
    for uuid in bad:
        path = schema.domain_migration(uuid)
        store.commit({}, expect_versions={path: store.find(path)[1]}, delete=[path])
    cluster.wait_domain_state("node1", "flushed", timeout_s=120)
    for uuid in bad:
        cluster.wait_running_on("node2", uuid)


def test_a_vm_whose_xml_is_empty_is_neither_started_nor_migrated(cluster):
    ready_nodes(cluster, "node1", "node2")
    schema, store = cluster.schema, cluster.store
    running, xml = domain_xml("hollow", memory="64")
    cluster.define_vm(xml, running, "hollow", "node1")
    cluster.wait_running_on("node1", running)
    store.commit({schema.domain_key(running, S.DOMAIN_XML): ""})
    # it used to migrate with a 0 MiB reservation
    with pytest.raises(RequestError, match="neither started nor migrated: its domain XML is not valid"):
        request(cluster, running, "migrate", target="node2")

    # A new VM without a memory size is refused by the daemon, which says why.
    stopped, _ = domain_xml("memoryless")
    memoryless = (
        f"<domain type='test'><name>memoryless</name><uuid>{stopped}</uuid><os><type>hvm</type></os><devices/></domain>"
    )
    cluster.define_vm(memoryless, stopped, "memoryless", "node1")
    cluster.wait_vm_state(stopped, "fail")  # the refused VM
    reason = store.find_text(schema.domain_key(stopped, S.DOMAIN_FAILEDREASON))
    assert reason.startswith("refused to start:") and "<memory> is missing" in reason
    assert stopped not in json.loads(store.get(schema.node_key("node1", S.NODE_RUNNINGDOMAINS)).value)


QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
# Each element the domain XML policy refuses (tests/common/test_domain_policy.py has them all),
# written to ZooKeeper directly, past the vm module: (devices, other elements, <os> children).
REFUSED = {
    "qemu-commandline": (
        "",
        f"<qemu:commandline xmlns:qemu='{QEMU_NS}'><qemu:arg value='-x'/></qemu:commandline>",
        "",
        "rule namespace",
    ),
    "seclabel": ("", "<seclabel type='none'/>", "", "rule seclabel"),
    "hostdev": ("<hostdev mode='subsystem' type='pci'/>", "", "", "rule devices"),
    "filesystem": (
        "<filesystem type='mount'><source dir='/'/><target dir='root'/></filesystem>",
        "",
        "",
        "rule devices",
    ),
    "kernel": ("", "", "<kernel>/boot/vmlinuz</kernel>", "rule host-path"),
    "disk-sda": ("<disk type='block'><source dev='/dev/sda'/><target dev='vda'/></disk>", "", "", "rule host-path"),
    "ethernet": ("<interface type='ethernet'/>", "", "", "rule interface"),
    "emulator": ("<emulator>/tmp/qemu</emulator>", "", "", "rule emulator"),
}


def refused_xml(name: str, uuid: str, devices: str, extra: str, os: str) -> str:
    return (
        f"<domain type='test'><name>{name}</name><uuid>{uuid}</uuid><memory unit='MiB'>64</memory>"
        f"<os><type>hvm</type>{os}</os>{extra}<devices>{devices}</devices></domain>"
    )


def test_a_vm_the_policy_refuses_is_neither_started_nor_migrated(cluster):
    ready_nodes(cluster, "node1", "node2")
    schema, store = cluster.schema, cluster.store
    vms = {}
    for label, (devices, extra, os, rule) in REFUSED.items():
        uuid, _ = domain_xml(label)
        cluster.define_vm(refused_xml(label, uuid, devices, extra, os), uuid, label, "node1")
        vms[uuid] = rule
    # an XML whose <uuid> is another VM's, and one whose <name> is not the VM's
    other, _ = domain_xml("other")
    impostor, _ = domain_xml("impostor")
    cluster.define_vm(refused_xml("impostor", other, "", "", ""), impostor, "impostor", "node1")
    vms[impostor] = "rule identity"
    renamed, _ = domain_xml("renamed")
    cluster.define_vm(refused_xml("web1", renamed, "", "", ""), renamed, "renamed", "node1")
    vms[renamed] = "rule identity"
    for uuid, rule in vms.items():
        cluster.wait_vm_state(uuid, "fail")  # refused
        reason = store.find_text(schema.domain_key(uuid, S.DOMAIN_FAILEDREASON))
        assert reason.startswith("refused to start:") and rule in reason, reason
    running = json.loads(store.get(schema.node_key("node1", S.NODE_RUNNINGDOMAINS)).value)
    assert not set(vms) & set(running)

    # A running VM whose XML is replaced by one the policy refuses is not migrated: the source
    # (or the target, whichever sees the request first) aborts it, and the VM keeps running where
    # it is.
    mover, xml = domain_xml("mover", memory="64")
    cluster.define_vm(xml, mover, "mover", "node1")
    cluster.wait_running_on("node1", mover)
    store.commit({schema.domain_key(mover, S.DOMAIN_XML): refused_xml("mover", mover, *REFUSED["hostdev"][:3])})
    record = request(cluster, mover, "migrate", target="node2")
    cluster.wait_no_migration(mover)
    final = read_history(store, mover)[-1]
    assert final["id"] == record.id and final["result"] == "aborted"
    assert (
        "source node1 does not migrate the VM: its domain XML is refused" in final["reason"]
        or "target node2 does not take the VM: its domain XML is refused" in final["reason"]
    )
    assert "rule devices" in final["reason"]
    assert mover in json.loads(store.get(schema.node_key("node1", S.NODE_RUNNINGDOMAINS)).value)
