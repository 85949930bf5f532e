"""Fixtures of the rollout tests: the lab (tests/conftest.py gives the session's, shared with
tests/lab), its hosts as Ansible hosts, and a cluster rolled out on them by playbooks/rollout.yml.
"""

from __future__ import annotations

from tests.lab.fixtures import lab_workdir_and_prefix
from tests.lab.lab import Lab, LabError

from .fixtures import cluster, rolled_out  # noqa: F401


def pytest_configure(config):
    """End what an interrupted earlier run of these tests left in the lab's namespaces (node
    daemons in the hosts' views, the views' mounts): the lab would refuse to come up over
    processes it did not start."""
    from tests.lab.hostviews import HostViews

    workdir, _ = lab_workdir_and_prefix()
    if (workdir / "views").exists():
        try:
            HostViews(Lab.load(workdir), log=lambda message: None).down(quiet=True)
        except LabError as exc:  # an unreadable lab.json: the lab fixture reports the lab's state
            print(f"rollout tests: could not clean up the views in {workdir}: {exc}")
