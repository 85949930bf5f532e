# -*- coding: utf-8 -*-
# Copyright: pvc.cluster developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""pvc.cluster.cluster_schema: which credentials create which cluster (no ZooKeeper)."""

from __future__ import annotations

import pytest

from ansible_collections.pvc.cluster.plugins.module_utils._module import ModuleFailure
from ansible_collections.pvc.cluster.plugins.modules import cluster_schema as module


@pytest.mark.parametrize(
    "params",
    [
        {"zk_username": "operator", "nodes_username": "nodes", "nodes_password": "x", "insecure": False},
        {"zk_username": None, "nodes_username": None, "nodes_password": None, "insecure": True},
    ],
)
def test_accepted(params):
    module.check_input(params)


@pytest.mark.parametrize(
    "params, message",
    [
        (
            {"zk_username": "operator", "nodes_username": None, "nodes_password": None, "insecure": False},
            "nodes_username and nodes_password are required with zk_username",
        ),
        (
            {"zk_username": "operator", "nodes_username": "operator", "nodes_password": "x", "insecure": False},
            "nodes_username must be another user than zk_username (operator)",
        ),
        (
            {"zk_username": None, "nodes_username": None, "nodes_password": None, "insecure": False},
            "the cluster would be open to anyone who reaches ZooKeeper",
        ),
        (
            {"zk_username": None, "nodes_username": "nodes", "nodes_password": "x", "insecure": True},
            "nodes_username and nodes_password are for a secured cluster",
        ),
    ],
)
def test_refused(params, message):
    with pytest.raises(ModuleFailure) as failure:
        module.check_input(params)
    assert message in failure.value.msg
