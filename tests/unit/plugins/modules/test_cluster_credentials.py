# -*- coding: utf-8 -*-
# Copyright: pvc.cluster developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""pvc.cluster.cluster_credentials: the input refused before anything connects (no ZooKeeper; the
rotation itself: tests/daemon/test_rotation.py and the integration target)."""

from __future__ import annotations

import pytest

from ansible_collections.pvc.cluster.plugins.module_utils._module import ModuleFailure
from ansible_collections.pvc.cluster.plugins.modules import cluster_credentials as module


def test_accepted():
    module.check_input({"username": "nodes", "password": "a", "new_password": "b", "state": "added"})


@pytest.mark.parametrize(
    "params, message",
    [
        ({"username": "", "password": "a", "new_password": "b"}, "username must be a ZooKeeper user name"),
        ({"username": "a:b", "password": "a", "new_password": "b"}, "username must be a ZooKeeper user name"),
        ({"username": "nodes", "password": "", "new_password": "b"}, "must not be empty"),
        ({"username": "nodes", "password": "a", "new_password": "a"}, "new_password is the current password"),
    ],
)
def test_refused(params, message):
    with pytest.raises(ModuleFailure) as failure:
        module.check_input(params)
    assert message in failure.value.msg


def test_no_password_option_is_logged():
    assert module.ARGUMENT_SPEC["password"]["no_log"] is True
    assert module.ARGUMENT_SPEC["new_password"]["no_log"] is True
