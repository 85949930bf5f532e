"""The cluster store over TLS to a real ZooKeeper secure client port (client certificates required)."""

from __future__ import annotations

import logging

import pytest

from pvc_cluster_common._store import StoreError
from tests.support.tls import make_tls_material
from tests.support.zookeeper import ZooKeeperServer, free_port

pytestmark = pytest.mark.zk


@pytest.fixture(scope="module")
def tls_material(tmp_path_factory):
    return make_tls_material(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def zk_tls_server(tmp_path_factory, tls_material):
    """A private ZooKeeper with a plain client port and a TLS one (ssl.clientAuth=need)."""
    server = ZooKeeperServer(
        workdir=tmp_path_factory.mktemp("zookeeper-tls"),
        client_port=free_port(),
        secure_client_port=free_port(),
        tls=tls_material.zookeeper_files(),
    )
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def secure_hosts(zk_tls_server):
    return f"{zk_tls_server.client_address}:{zk_tls_server.secure_client_port}"


def test_store_works_over_tls(make_store, secure_hosts, tls_material):
    store = make_store(
        hosts=secure_hosts,
        tls=True,
        tls_ca=str(tls_material.ca_cert),
        tls_cert=str(tls_material.client_cert),
        tls_key=str(tls_material.client_key),
    )
    assert store.connected
    assert store.ensure_schema() is True
    key = store.schema.node_key("n1", "memtotal")
    store.commit({key: 2048})
    assert store.find_text(key) == "2048"
    with store.lock(store.schema.node_lock("n1")):
        pass


def test_plain_client_cannot_use_the_secure_port(make_store, secure_hosts):
    with pytest.raises(StoreError, match=f"cannot reach ZooKeeper at {secure_hosts} within 2 s"):
        make_store(hosts=secure_hosts, timeout_s=2.0)


def test_tls_client_without_certificate_is_refused(make_store, secure_hosts, tls_material):
    with pytest.raises(StoreError, match="cannot reach ZooKeeper"):
        make_store(hosts=secure_hosts, timeout_s=2.0, tls=True, tls_ca=str(tls_material.ca_cert))


def test_tls_client_rejects_a_server_it_does_not_trust(make_store, secure_hosts, tls_material, caplog):
    with caplog.at_level(logging.WARNING, logger="kazoo.client"):
        with pytest.raises(StoreError, match="cannot reach ZooKeeper"):
            make_store(
                hosts=secure_hosts,
                timeout_s=2.0,
                tls=True,
                tls_ca=str(tls_material.other_ca_cert),
                tls_cert=str(tls_material.client_cert),
                tls_key=str(tls_material.client_key),
            )
    assert "CERTIFICATE_VERIFY_FAILED" in caplog.text


def test_tls_to_the_plain_port_fails(make_store, zk_tls_server, tls_material):
    with pytest.raises(StoreError, match="cannot reach ZooKeeper"):
        make_store(
            hosts=zk_tls_server.hosts,
            timeout_s=2.0,
            tls=True,
            tls_ca=str(tls_material.ca_cert),
            tls_cert=str(tls_material.client_cert),
            tls_key=str(tls_material.client_key),
        )


def test_tls_client_checks_the_servers_host_name(make_store, tmp_path_factory, caplog):
    """A server whose certificate, signed by the trusted CA, names another host is refused."""
    material = make_tls_material(
        tmp_path_factory.mktemp("tls-other-host"), server_names=("zk.example.org",), server_ips=("192.0.2.10",)
    )
    server = ZooKeeperServer(
        workdir=tmp_path_factory.mktemp("zookeeper-other-host"),
        client_port=free_port(),
        secure_client_port=free_port(),
        tls=material.zookeeper_files(),
    )
    try:
        server.start()
        hosts = f"{server.client_address}:{server.secure_client_port}"
        files = {
            "tls_ca": str(material.ca_cert),
            "tls_cert": str(material.client_cert),
            "tls_key": str(material.client_key),
        }
        # without verification (tls_verify false, for a test bed) the server is accepted: it serves
        assert make_store(hosts=hosts, tls=True, tls_verify=False, **files).connected
        with caplog.at_level(logging.WARNING, logger="kazoo.client"):
            with pytest.raises(StoreError, match="cannot reach ZooKeeper"):
                make_store(hosts=hosts, timeout_s=2.0, tls=True, **files)
        assert "certificate verify failed: IP address mismatch, certificate is not valid for '127.0.0.1'" in caplog.text
    finally:
        server.stop()
