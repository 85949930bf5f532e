"""Fixtures of the rollout tests: the lab (shared with tests/lab), its hosts as Ansible hosts, and
a cluster rolled out on them by playbooks/rollout.yml.

PVC_ROLLOUT_LAB_PREFIX (development only): run these tests on a lab of their own with that
namespace prefix (workdir /tmp/pvc-cluster/rollout-<prefix>) instead of the session's shared lab,
so that they can run while another lab is up.
"""
from __future__ import annotations

import os

import pytest

if os.environ.get("PVC_ROLLOUT_LAB_PREFIX"):
    from tests.lab.fixtures import VM_BRIDGE
    from tests.lab.lab import Lab

    @pytest.fixture(scope="session")
    def lab():
        prefix = os.environ["PVC_ROLLOUT_LAB_PREFIX"]
        the_lab = Lab(f"/tmp/pvc-cluster/rollout-{prefix}", hosts=3, prefix=prefix, vm_bridge=VM_BRIDGE)
        the_lab.up()
        try:
            yield the_lab
        finally:
            the_lab.down()
else:
    from tests.lab.fixtures import lab  # noqa: F401  (the session's lab)

from .fixtures import cluster, rolled_out  # noqa: E402,F401


def pytest_configure(config):
    """End what an interrupted earlier run of these tests left in the session lab's namespaces
    (node daemons in the hosts' views, the views' mounts): the lab would refuse to come up over
    processes it did not start."""
    from pathlib import Path

    from tests.lab.fixtures import DEFAULT_WORKDIR
    from tests.lab.hostviews import HostViews
    from tests.lab.lab import Lab, LabError

    workdir = Path(os.environ.get("PVC_LAB_WORKDIR", DEFAULT_WORKDIR))
    if (workdir / "views").exists():
        try:
            HostViews(Lab.load(workdir), log=lambda message: None).down(quiet=True)
        except LabError:
            pass
