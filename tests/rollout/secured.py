"""What a secured ZooKeeper ensemble (the zookeeper role's defaults) gives a client, checked from the
lab's controller namespace: TLS whose certificates name each member's own host only, nothing at all
without credentials (enforce.auth), and nothing the operator secured to a wrong password."""

from __future__ import annotations

import ssl
from collections.abc import Callable

import pytest
from kazoo.client import KazooClient
from kazoo.exceptions import KazooException, NoAuthError

from tests.support.zookeeper import in_netns
from tests.lab.lab import Lab
from tests.support.identities import OPERATOR_USER
from tests.support.zookeeper import connect


def check_host_names(lab: Lab, members: list[tuple[str, int]], ca: str) -> None:
    """Each member's certificate (from the CA) names its own address, and not another member's: a
    client that checks host names, as ClusterStore does, refuses it for any other."""
    context = ssl.create_default_context(cafile=ca)
    for index, (address, port) in enumerate(members):
        with context.wrap_socket(connect(address, port, 10, lab.ctl_netns), server_hostname=address):
            pass
        other = members[(index + 1) % len(members)][0]
        with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
            context.wrap_socket(connect(address, port, 10, lab.ctl_netns), server_hostname=other).close()


def check_client_access(lab: Lab, hosts: str, ca: str, readable: str, writable: str, parent: str) -> None:
    """``readable``, ``writable`` (existing keys, secured by the operator) and ``parent`` (a secured
    znode) give a client without credentials nothing, not even a listing of ``/``, and a client
    with a wrong password (digest: any password authenticates, as another identity) neither their
    content nor any write: no set, no delete, no create under either."""

    def client(auth) -> KazooClient:
        return KazooClient(
            hosts=hosts, use_ssl=True, ca=ca, verify_certs=True, check_hostname=True, auth_data=auth, timeout=10
        )

    def attempts(zk: KazooClient) -> list[Callable]:
        return [
            lambda: zk.get(readable),
            lambda: zk.get_children(parent),
            lambda: zk.set(writable, b"changed"),
            lambda: zk.delete(writable),
            lambda: zk.create(writable + "/child", b"x"),
            lambda: zk.create(parent + "/other", b"x"),
        ]

    def without_credentials() -> list[str]:
        zk = client([])
        refused = []
        try:
            zk.start(60)  # the TLS session is made; its first request ends it (enforce.auth)
            for attempt in [lambda: zk.get_children("/")] + attempts(zk):
                try:
                    attempt()
                except KazooException as exc:
                    refused.append(type(exc).__name__)
        finally:
            zk.stop()
            zk.close()
        return refused

    def wrong_password() -> list[str]:
        zk = client([("digest", f"{OPERATOR_USER}:not-the-password")])
        zk.start(60)
        refused = []
        try:
            for attempt in attempts(zk):
                with pytest.raises(NoAuthError):
                    attempt()
                refused.append("NoAuthError")
        finally:
            zk.stop()
            zk.close()
        return refused

    assert len(in_netns(lab.ctl_netns, without_credentials)) == 7
    assert in_netns(lab.ctl_netns, wrong_password) == ["NoAuthError"] * 6
