# -*- coding: utf-8 -*-
# Copyright: pvc.cluster developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The lab's netns connection plugin (tests/lab/ansible/connection_plugins/netns.py): which command
lines it runs, and how files cross into the host. No lab needed."""

from __future__ import annotations

import shlex

import pytest

from ansible.errors import AnsibleConnectionFailure
from ansible.playbook.play_context import PlayContext
from ansible.plugins.connection.local import Connection as LocalConnection
from ansible.plugins.loader import connection_loader

from .hostviews import LAB_CONNECTION_PLUGINS

connection_loader.add_directory(str(LAB_CONNECTION_PLUGINS))


@pytest.fixture
def make():
    def build(**options):
        play_context = PlayContext()
        play_context.remote_addr = "node1"
        conn = connection_loader.get("netns", play_context)
        conn.set_options(direct=options)
        return conn

    return build


@pytest.fixture
def calls(monkeypatch):
    """Every command line the plugin hands to the local connection, with its stdin."""
    seen = []

    def fake_exec(self, cmd, in_data=None, sudoable=True):
        seen.append((cmd, in_data))
        return 0, b"content", b""

    monkeypatch.setattr(LocalConnection, "exec_command", fake_exec)
    return seen


def test_without_a_mount_namespace_commands_run_through_ip_netns_exec(make, calls):
    conn = make(netns_name="lab-n1")
    conn.exec_command("echo 'a b'")
    cmd = shlex.split(calls[0][0])
    assert cmd == ["ip", "netns", "exec", "lab-n1", "/bin/sh", "-c", "echo 'a b'"]


def test_the_namespace_defaults_to_the_host_address(make, calls):
    conn = make()
    conn.exec_command("true")
    assert shlex.split(calls[0][0])[:4] == ["ip", "netns", "exec", "node1"]


def test_with_a_mount_namespace_commands_enter_all_three_namespaces(make, calls):
    conn = make(netns_name="lab-n2", netns_mount_namespace="/v/n2/mnt.ns", netns_uts_namespace="/v/n2/uts.ns")
    conn.exec_command("cat /etc/hostname")
    assert shlex.split(calls[0][0]) == [
        "nsenter",
        "--net=/run/netns/lab-n2",
        "--mount=/v/n2/mnt.ns",
        "--uts=/v/n2/uts.ns",
        "--",
        "/bin/sh",
        "-c",
        "cat /etc/hostname",
    ]


def test_files_cross_through_the_mount_namespace(make, calls, tmp_path):
    conn = make(netns_name="lab-n1", netns_mount_namespace="/v/n1/mnt.ns")
    source = tmp_path / "module.py"
    source.write_bytes(b"payload\x00bytes")
    conn.put_file(str(source), "/root/.ansible/tmp/x/module.py")
    cmd, data = calls[0]
    assert shlex.split(cmd)[-1] == "cat > /root/.ansible/tmp/x/module.py"
    assert data == b"payload\x00bytes"
    target = tmp_path / "fetched"
    conn.fetch_file("/etc/pvc/node-daemon.yaml", str(target))
    assert shlex.split(calls[1][0])[-1] == "cat /etc/pvc/node-daemon.yaml"
    assert target.read_bytes() == b"content"


def test_a_missing_namespace_is_a_connection_failure(make):
    conn = make(netns_name="pvc-no-such-namespace")
    with pytest.raises(AnsibleConnectionFailure, match="does not exist"):
        conn._connect()


def test_a_regular_file_is_not_a_mount_namespace(make, tmp_path, monkeypatch):
    monkeypatch.setattr("os.path.exists", lambda path: True)
    not_a_namespace = tmp_path / "mnt.ns"
    not_a_namespace.touch()
    conn = make(netns_name="lab-n1", netns_mount_namespace=str(not_a_namespace))
    with pytest.raises(AnsibleConnectionFailure, match="not a namespace file"):
        conn._connect()


def test_a_namespace_name_cannot_be_a_path(make):
    conn = make(netns_name="../etc")
    with pytest.raises(AnsibleConnectionFailure, match="invalid network namespace name"):
        conn._connect()
