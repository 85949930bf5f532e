# -*- coding: utf-8 -*-
# Copyright: pvc.cluster developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Fixtures of the module unit tests."""

from __future__ import annotations

import pytest

from ansible_collections.pvc.cluster.tests.unit.plugins.modules.cluster_builders import make_node


@pytest.fixture
def nodes():
    """n1 (the VMs' node), n2 (most headroom), n3 (flushed), n4 (full)."""
    return {
        "n1": make_node("n1", memprov=4096),
        "n2": make_node("n2", memprov=1024),
        "n3": make_node("n3", domain_state="flushed"),
        "n4": make_node("n4", memprov=16000),
    }
