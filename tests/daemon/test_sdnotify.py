"""Readiness for systemd (Type=notify): the sd_notify datagram, and a daemon process that sends
READY=1 once it has registered and runs, and STOPPING=1 when it begins an orderly stop."""

from __future__ import annotations

import os
import select
import socket

import pytest

from pvc_cluster_common import _schema as S
from pvc_node_daemon import sdnotify

from .harness import TestCluster


@pytest.fixture
def notify_socket(tmp_path):
    """A datagram socket standing in for systemd's: (its path, a function returning the next message)."""
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))

    def receive(timeout_s: float = 60.0) -> str:
        readable, _, _ = select.select([sock], [], [], timeout_s)
        assert readable, f"no notification within {timeout_s} s"
        return sock.recv(4096).decode()

    yield str(path), receive
    sock.close()


@pytest.fixture
def fresh_address(monkeypatch):
    sdnotify.reset()
    yield monkeypatch
    sdnotify.reset()


def test_notify_sends_one_datagram_and_takes_the_address_out_of_the_environment(notify_socket, fresh_address):
    path, receive = notify_socket
    fresh_address.setenv("NOTIFY_SOCKET", path)
    assert sdnotify.notify("READY=1", "STATUS=up")
    assert receive(5) == "READY=1\nSTATUS=up"
    assert "NOTIFY_SOCKET" not in os.environ
    assert sdnotify.notify("STOPPING=1")  # the address read first is kept
    assert receive(5) == "STOPPING=1"


def test_notify_reaches_an_abstract_socket(fresh_address):
    name = f"pvc-test-notify-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        fresh_address.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.notify("READY=1")
        assert sock.recv(100) == b"READY=1"


def test_without_a_service_manager_notify_does_nothing(fresh_address, tmp_path):
    fresh_address.delenv("NOTIFY_SOCKET", raising=False)
    assert not sdnotify.notify("READY=1")
    sdnotify.reset()
    fresh_address.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert not sdnotify.notify("READY=1")  # logged; the daemon keeps running


@pytest.mark.zk
def test_daemon_is_ready_once_registered_and_running_and_says_when_it_stops(
    zk_server, zk_root, tmp_path, notify_socket
):
    path, receive = notify_socket
    cluster = TestCluster(zk_server.hosts, zk_root, tmp_path)
    try:
        daemon = cluster.add("node1", env={"NOTIFY_SOCKET": path})
        ready = receive(60)
        assert ready.splitlines() == ["READY=1", "STATUS=node node1 running"]
        # what the daemon promises at READY=1, without waiting: registered, alive, running, figures in
        schema = cluster.schema
        assert cluster.store.find_text(schema.node_key("node1", S.NODE_DAEMON_STATE)) == "run"
        assert cluster.store.exists(schema.node_key("node1", S.NODE_ALIVE))
        assert float(cluster.store.find_text(schema.node_key("node1", S.NODE_KEEPALIVE))) > 0
        assert "node node1 running" in daemon.log()
        daemon.process.send_signal(15)
        assert receive(60).splitlines()[0] == "STOPPING=1"
        assert daemon.wait_exit(120) == 0
    finally:
        cluster.close()


@pytest.mark.zk
def test_a_daemon_that_cannot_start_reports_why_and_never_ready(zk_server, zk_root, tmp_path, notify_socket):
    path, receive = notify_socket
    cluster = TestCluster(zk_server.hosts, zk_root, tmp_path)
    try:
        daemon = cluster.add("node1", env={"NOTIFY_SOCKET": path}, libvirt={"uri": "test:///nonexistent/file.xml"})
        status = receive(60)
        assert status.startswith("STATUS=cannot start: cannot reach libvirt"), status
        assert daemon.wait_exit(60) == 1
    finally:
        cluster.close()
