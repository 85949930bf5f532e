# -*- coding: utf-8 -*-
# Copyright: pvc.cluster developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The ZooKeeper options of a module or of the inventory plugin as Ansible hands them over, for
tests that build them by hand. It imports nothing of the collection, so that the unit tests
(``ansible_collections.pvc.cluster.tests.unit.plugins.zk_params``, under ansible-test) and the
pytest suite (``tests.unit.plugins.zk_params``) share it."""

from __future__ import annotations

# Every zk_* option (plugins/module_utils/_module.py ZK_ARGUMENT_SPEC) at what a task that sets
# none of them gets: its default, or None for an option without one. test_module.py checks that
# it stays so.
ZK_DEFAULTS = {
    "zk_hosts": None,
    "zk_root": "/pvc",
    "zk_timeout": 10.0,
    "zk_username": None,
    "zk_password": None,
    "zk_tls": False,
    "zk_tls_ca": None,
    "zk_tls_cert": None,
    "zk_tls_key": None,
    "zk_tls_verify": True,
}


def zk_params(**changes):
    """A new dict of every zk_* option at its default, with ``changes``."""
    return dict(ZK_DEFAULTS, **changes)
