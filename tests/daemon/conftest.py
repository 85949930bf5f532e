"""Fixtures for the node daemon's tests: a private libvirt test-driver "host" per test."""

from __future__ import annotations

import uuid as uuidlib

import pytest

from pvc_node_daemon.hypervisor import Hypervisor

# A test-driver host with no domains: 4 CPUs, 8 GiB. Each connection to this file gets a private
# state (see docs: environment.md §3), so one Hypervisor = one isolated host.
NODE_XML = """<node>
  <cpu>
    <nodes>1</nodes><sockets>1</sockets><cores>2</cores><threads>2</threads>
    <active>4</active><mhz>2000</mhz><model>x86_64</model>
  </cpu>
  <memory>8388608</memory>
</node>
"""


@pytest.fixture
def node_uri(tmp_path):
    path = tmp_path / "node.xml"
    path.write_text(NODE_XML)
    return f"test://{path}"


@pytest.fixture
def hv(node_uri):
    with Hypervisor(node_uri, call_timeout_s=10.0) as driver:
        yield driver


@pytest.fixture
def make_domain_xml():
    """make_domain_xml(name, memory='512', unit='MiB', ...) -> (uuid, xml) for the test driver."""

    def make(
        name: str = "vm1",
        memory: str = "512",
        unit: str | None = "MiB",
        current: str | None = None,
        vcpus: int = 2,
        vcpus_current: int | None = None,
        bridges: tuple[str, ...] = (),
        uuid: str | None = None,
    ) -> tuple[str, str]:
        uuid = uuid or str(uuidlib.uuid4())
        unit_attr = f" unit='{unit}'" if unit else ""
        current_elem = f"<currentMemory{unit_attr}>{current}</currentMemory>" if current else ""
        vcpu_attr = f" current='{vcpus_current}'" if vcpus_current else ""
        ifaces = "".join(f"<interface type='bridge'><source bridge='{b}'/></interface>" for b in bridges)
        xml = (
            f"<domain type='test'><name>{name}</name><uuid>{uuid}</uuid>"
            f"<memory{unit_attr}>{memory}</memory>{current_elem}<vcpu{vcpu_attr}>{vcpus}</vcpu>"
            f"<os><type>hvm</type></os><devices>{ifaces}</devices></domain>"
        )
        return uuid, xml

    return make


@pytest.fixture
def store(zk_server, zk_root):
    """The operator's store on the session server, this test's root, the cluster created:
    the daemons' tests run a secured cluster (each daemon is the nodes and itself)."""
    from pvc_cluster_common._store import ClusterStore
    from tests.support.identities import operator_options

    store = ClusterStore(operator_options(zk_server.hosts, zk_root)).start()
    try:
        store.ensure_schema()
        yield store
    finally:
        store.stop()
