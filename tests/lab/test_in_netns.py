"""tests.support.zookeeper.in_netns, the one way the tests run code inside a network namespace
(the lab's controller, a host): a namespace of this test's own, no lab needed (root, iproute2)."""

from __future__ import annotations

import os
import socket
import subprocess
import uuid

import pytest

from tests.support.zookeeper import connect, in_netns

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")


@pytest.fixture
def netns():
    name = f"pvct-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=30)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True, timeout=30)
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=True, timeout=30)


def test_fn_runs_in_the_namespace_and_its_result_or_error_comes_back(netns):
    assert [name for _index, name in in_netns(netns, socket.if_nameindex)] == ["lo"]

    def fails():
        raise LookupError("inside")

    with pytest.raises(LookupError, match="inside"):
        in_netns(netns, fails)


def test_a_socket_made_inside_keeps_its_namespace(netns):
    listener = in_netns(netns, lambda: socket.create_server(("127.0.0.1", 0)))
    with listener:
        port = listener.getsockname()[1]
        with connect("127.0.0.1", port, timeout_s=10, netns=netns):  # the namespace's loopback
            accepted, _peer = listener.accept()
            accepted.close()
        with pytest.raises(OSError):
            connect("127.0.0.1", port, timeout_s=10).close()  # not this one's
