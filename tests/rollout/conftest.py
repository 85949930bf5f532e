"""Fixtures of the rollout tests: the lab (the session's, shared with tests/lab), its hosts as
Ansible hosts, and a cluster rolled out on them by playbooks/rollout.yml.

The ``lab`` fixture of tests/lab is a session fixture of *that* directory: importing it here would
make pytest create a second instance (same namespaces, same workdir) for the tests here. So the
``lab`` here reuses the lab this pytest process already brought up (its ZooKeeper JVMs are our
children), and brings one up (and down) itself only when there is none, e.g. for
``pytest tests/rollout`` alone.

PVC_ROLLOUT_LAB_PREFIX (development): a lab of these tests' own with that namespace prefix, in
/tmp/pvc-cluster/rollout-<prefix>, so that they can run while another lab is up.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.lab.fixtures import DEFAULT_WORKDIR, VM_BRIDGE
from tests.lab.lab import Lab, LabError, proc_ppid

from .fixtures import cluster, rolled_out  # noqa: F401


def _workdir_and_prefix() -> tuple[Path, str]:
    prefix = os.environ.get("PVC_ROLLOUT_LAB_PREFIX")
    if prefix:
        return Path(f"/tmp/pvc-cluster/rollout-{prefix}"), prefix
    return Path(os.environ.get("PVC_LAB_WORKDIR", DEFAULT_WORKDIR)), "lab"


def _ours(workdir: Path) -> Lab | None:
    """The lab in ``workdir`` if this pytest process brought it up and it is healthy."""
    if not (workdir / "lab.json").exists():
        return None
    try:
        lab = Lab.load(workdir)
    except LabError:
        return None
    mine = [r for r in lab.recorded_pids() if r.role == "zookeeper" and r.alive() and proc_ppid(r.pid) == os.getpid()]
    return lab if mine and lab.healthy() else None


@pytest.fixture(scope="session")
def lab():
    workdir, prefix = _workdir_and_prefix()
    shared = _ours(workdir)
    if shared is not None:
        yield shared            # tests/lab's fixture owns it and takes it down at the end
        return
    try:
        Lab.preflight()
    except LabError as exc:
        pytest.fail(f"{exc}. The rollout tests need a root Debian machine set up by `make setup`.", pytrace=False)
    own = Lab(workdir, hosts=3, prefix=prefix, vm_bridge=VM_BRIDGE)
    try:
        own.up()
    except LabError as exc:
        pytest.fail(f"lab up failed: {exc}", pytrace=False)
    try:
        yield own
    finally:
        own.down()


def pytest_configure(config):
    """End what an interrupted earlier run of these tests left in the lab's namespaces (node
    daemons in the hosts' views, the views' mounts): the lab would refuse to come up over
    processes it did not start."""
    from tests.lab.hostviews import HostViews

    workdir, _ = _workdir_and_prefix()
    if (workdir / "views").exists():
        try:
            HostViews(Lab.load(workdir), log=lambda message: None).down(quiet=True)
        except LabError as exc:   # an unreadable lab.json: the lab fixture reports the lab's state
            print(f"rollout tests: could not clean up the views in {workdir}: {exc}")
