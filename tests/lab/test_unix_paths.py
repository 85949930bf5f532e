"""Unix socket paths under the lab's workdir, which a lab prefix (PVC_LAB_PREFIX) makes longer:
connect_unix/bind_unix reach a socket whatever the length of its path, and the notify socket a
service is handed does not depend on the workdir. No lab needed."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.lab.hostviews import NotifySocket
from tests.lab.lab import UNIX_PATH_MAX, bind_unix, connect_unix


def test_a_socket_whose_path_is_too_long_for_an_address_is_bound_and_reached(tmp_path):
    directory = tmp_path / ("d" * 60) / ("e" * 60)
    directory.mkdir(parents=True)
    path = directory / "qmp.sock"
    assert len(str(path)) > UNIX_PATH_MAX
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as plain, pytest.raises(OSError):
        plain.bind(str(path))  # what the lab did before
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        bind_unix(server, path)
        server.listen(1)
        assert path.exists()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(30)
            connect_unix(client, path)
            accepted, _ = server.accept()
            with accepted:
                accepted.sendall(b"pong\n")
                assert client.recv(16) == b"pong\n"


def test_the_notify_socket_is_short_whatever_the_workdir_and_hears_ready():
    notify = NotifySocket("node-daemon-n3.sock")
    try:
        assert len(str(notify.path)) <= UNIX_PATH_MAX and notify.path.parent.parent == Path("/tmp")
        # the service sends READY=1 to the path in $NOTIFY_SOCKET, as the node daemon does
        child = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import os, socket, sys\n"
                "with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:\n"
                "    s.sendto(b'STATUS=up\\nREADY=1', os.environ['NOTIFY_SOCKET'])\n"
                "sys.stdin.read()\n",  # alive until the test closes its stdin
            ],
            env=dict(os.environ, NOTIFY_SOCKET=str(notify.path)),
            stdin=subprocess.PIPE,
        )
        try:
            notify.wait_ready(child.pid, 60, what="the child")
        finally:
            child.stdin.close()
            child.wait(60)
    finally:
        notify.close()
    assert not notify.path.parent.exists()
