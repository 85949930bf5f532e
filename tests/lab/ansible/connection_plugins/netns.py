# -*- coding: utf-8 -*-
# Copyright: pvc.cluster developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Run tasks on the controller machine inside a Linux network namespace (and optionally a private
mount and UTS namespace): one machine becomes several Ansible hosts.

A lab helper, not part of the pvc.cluster collection: the lab (tests/lab/hostviews.py) loads it from
this directory (ANSIBLE_CONNECTION_PLUGINS) and names it ``netns`` in its inventory."""

from __future__ import annotations

DOCUMENTATION = r"""
name: netns
short_description: Run tasks inside a network namespace of the controller machine
description:
  - Like P(ansible.builtin.local#connection), but every command runs inside a Linux network namespace of the
    machine Ansible runs on, so that one machine can act as several hosts (the pvc.cluster lab does this).
  - Without O(netns_mount_namespace), commands run through C(ip netns exec), which gives them the namespace's
    view of C(/sys) but the machine's files, so a task that writes C(/etc) writes the machine's C(/etc).
  - With O(netns_mount_namespace) (a persistent mount namespace, for example one created with
    C(unshare --mount=FILE) that mounts private copies of C(/etc) and C(/var/lib)), commands run through
    C(nsenter) in that mount namespace too, and file transfers go through it, so that each host has its own
    files.
  - Needs root on the controller (entering namespaces is privileged) and the C(nsenter) and C(ip) programs.
version_added: 0.1.0
author:
  - pvc.cluster developers (!UNKNOWN)
options:
  netns_name:
    description:
      - The network namespace, as C(ip netns list) names it (a file in C(/run/netns)).
      - If not set, the host's address (C(ansible_host), else the inventory name) is used.
    type: str
    vars:
      - name: ansible_netns_name
  netns_mount_namespace:
    description:
      - A file bound to a mount namespace (for example created by C(unshare --mount=FILE)).
      - When set, commands also enter this mount namespace and files are copied through it.
    type: path
    vars:
      - name: ansible_netns_mount_namespace
  netns_uts_namespace:
    description:
      - A file bound to a UTS namespace (for example created by C(unshare --uts=FILE)), so that the host has
        its own host name.
      - Only used together with O(netns_mount_namespace).
    type: path
    vars:
      - name: ansible_netns_uts_namespace
  become_success_timeout:
    description:
      - Number of seconds to wait for become to succeed when enabled.
    type: int
    default: 10
    vars:
      - name: ansible_local_become_success_timeout
  become_strip_preamble:
    description:
      - Strip internal become output preceding command execution.
    type: bool
    default: true
    vars:
      - name: ansible_local_become_strip_preamble
extends_documentation_fragment:
  - connection_pipelining
notes:
  - The remote user is ignored; commands run as the user that runs Ansible (root).
  - The file system is shared with the machine unless O(netns_mount_namespace) is set.
"""

EXAMPLES = r"""
# inventory.yml: two hosts that are network namespaces of one machine
all:
  hosts:
    node1:
      ansible_connection: netns
      ansible_netns_name: lab-n1
      ansible_netns_mount_namespace: /tmp/lab/views/n1/mnt
      ansible_netns_uts_namespace: /tmp/lab/views/n1/uts
    node2:
      ansible_connection: netns
      ansible_netns_name: lab-n2
"""

import os
import shlex

from ansible.errors import AnsibleConnectionFailure, AnsibleError, AnsibleFileNotFound
from ansible.module_utils.common.text.converters import to_bytes, to_native
from ansible.plugins.connection.local import Connection as LocalConnection
from ansible.utils.display import Display

display = Display()

NETNS_DIR = "/run/netns"


def _is_namespace_file(path: str) -> bool:
    """Whether ``path`` is a namespace bind mount (it lives on nsfs, like /proc/self/ns/*)."""
    try:
        return os.stat(path).st_dev == os.stat("/proc/self/ns/mnt").st_dev
    except OSError:
        return False


class Connection(LocalConnection):
    """Local connection whose commands and file transfers happen inside namespaces."""

    transport = "netns"
    has_pipelining = True

    def _netns(self) -> str:
        return self.get_option("netns_name") or self._play_context.remote_addr

    def _connect(self) -> Connection:
        if not self._connected:
            netns = self._netns()
            if not netns or "/" in netns:
                raise AnsibleConnectionFailure("invalid network namespace name %r" % netns)
            if not os.path.exists(os.path.join(NETNS_DIR, netns)):
                raise AnsibleConnectionFailure(
                    "network namespace %s does not exist (no %s/%s)" % (netns, NETNS_DIR, netns)
                )
            for option in ("netns_mount_namespace", "netns_uts_namespace"):
                path = self.get_option(option)
                if path and not _is_namespace_file(path):
                    raise AnsibleConnectionFailure(
                        "%s %s is not a namespace file (create the host's namespaces first)" % (option, path)
                    )
            display.vvv("ESTABLISH NETNS CONNECTION TO %s" % netns, host=self._play_context.remote_addr)
        return super()._connect()

    def _wrap(self, cmd: str) -> str:
        """The shell command that runs ``cmd`` inside the host's namespaces."""
        netns = self._netns()
        mount_ns = self.get_option("netns_mount_namespace")
        if not mount_ns:
            return "ip netns exec %s /bin/sh -c %s" % (shlex.quote(netns), shlex.quote(cmd))
        args = ["nsenter", "--net=%s" % os.path.join(NETNS_DIR, netns), "--mount=%s" % mount_ns]
        uts_ns = self.get_option("netns_uts_namespace")
        if uts_ns:
            args.append("--uts=%s" % uts_ns)
        return "%s -- /bin/sh -c %s" % (" ".join(shlex.quote(a) for a in args), shlex.quote(cmd))

    def exec_command(self, cmd, in_data=None, sudoable=True):
        """Run ``cmd`` (a shell command line) inside the host's namespaces."""
        return super().exec_command(self._wrap(cmd), in_data=in_data, sudoable=sudoable)

    def put_file(self, in_path, out_path):
        """Copy a controller file to ``out_path`` as the host sees it."""
        display.vvv("PUT %s TO %s" % (in_path, out_path), host=self._play_context.remote_addr)
        if not self.get_option("netns_mount_namespace"):
            super().put_file(in_path, out_path)
            return
        b_in_path = to_bytes(in_path, errors="surrogate_or_strict")
        if not os.path.exists(b_in_path):
            raise AnsibleFileNotFound("file or module does not exist: %s" % to_native(in_path))
        with open(b_in_path, "rb") as handle:
            data = handle.read()
        rc, dummy, stderr = self.exec_command("cat > %s" % shlex.quote(out_path), in_data=data, sudoable=False)
        if rc != 0:
            raise AnsibleError("failed to transfer file to %s: %s" % (out_path, to_native(stderr).strip()))

    def fetch_file(self, in_path, out_path):
        """Copy ``in_path`` as the host sees it to a controller file."""
        display.vvv("FETCH %s TO %s" % (in_path, out_path), host=self._play_context.remote_addr)
        if not self.get_option("netns_mount_namespace"):
            super().fetch_file(in_path, out_path)
            return
        rc, stdout, stderr = self.exec_command("cat %s" % shlex.quote(in_path), sudoable=False)
        if rc != 0:
            raise AnsibleFileNotFound("failed to fetch %s: %s" % (in_path, to_native(stderr).strip()))
        with open(to_bytes(out_path, errors="surrogate_or_strict"), "wb") as handle:
            handle.write(stdout)
