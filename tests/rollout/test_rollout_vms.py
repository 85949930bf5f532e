"""playbooks/vm_meta.yml and playbooks/maintenance.yml on the rolled-out lab cluster: VMs declared
in inventory variables, a rolling maintenance that does real migrations but leaves every VM where
it was, and a rolling maintenance that stops at the first node that cannot be flushed."""

from __future__ import annotations

import time

import pytest
import yaml

from pvc_cluster_common import _schema as S
from pvc_cluster_common._cluster import find_vm, read_history, read_vm, wait_for_key
from tests.lab.daemons import RunningMonitor

# a rollout takes a minute or two on a quiet 2-core machine, several on a busy one
pytestmark = [pytest.mark.lab, pytest.mark.timeout(1200)]

# name, home, meta
VMS = [
    ("rt-live", "node2", {"migration_method": "live"}),
    ("rt-shutdown", "node2", {"migration_method": "shutdown"}),
    ("rt-limited", "node2", {"node_limit": ["node2", "node3"]}),
    ("rt-default", "node1", {}),
]


def _vm_vars(guests, tmp_path, downtime_ms: int = 300):
    """The VMs of VMS as pvc_vms: real guests (tests/lab/guests.py), the same XML every time."""
    vms = []
    for name, node, meta in VMS:
        vms.append(
            {
                "name": name,
                "xml": guests.xml(name, memory_mib=128, bridge="vmbr0"),
                "node": node,
                "state": "started",
                "migration_max_downtime_ms": downtime_ms,
                **meta,
            }
        )
    path = tmp_path / f"vms-{downtime_ms}.yml"
    path.write_text(yaml.safe_dump({"pvc_vms": vms}))
    return path


def _placement(cluster) -> dict[str, tuple[str, list[str]]]:
    """VM name -> (its node in ZooKeeper, the hosts where libvirt runs it)."""
    running = {h.name: h.domains() for h in cluster.lab.hosts}
    result = {}
    for name, _, _ in VMS:
        vm = read_vm(cluster.store, find_vm(cluster.store, name))
        result[name] = (vm.node, sorted(h for h, doms in running.items() if name in doms))
    return result


def _wait_placement(cluster, expected, timeout_s: float = 60):
    deadline = time.monotonic() + timeout_s
    while True:
        current = _placement(cluster)
        if current == expected or time.monotonic() > deadline:
            return current
        time.sleep(0.2)  # libvirt has no cross-host watch


@pytest.fixture(scope="module")
def vms(rolled_out, lab_guests, tmp_path_factory):
    """The VMs of VMS, defined and started by playbooks/vm_meta.yml (first run kept)."""
    lab_guests.prepare()
    path = _vm_vars(lab_guests, tmp_path_factory.mktemp("vms"))
    run = rolled_out.playbook("playbooks/vm_meta.yml", "--extra-vars", f"@{path}")
    assert run.returncode == 0, run.failures()
    return rolled_out, run


def test_vm_meta_defines_and_starts_the_inventory_vms(vms):
    cluster, run = vms
    assert run.changed() == {"localhost": 1}
    expected = {name: (node, [node]) for name, node, _ in VMS}
    assert _wait_placement(cluster, expected) == expected
    meta = {name: read_vm(cluster.store, find_vm(cluster.store, name)).meta for name, _, _ in VMS}
    assert meta["rt-live"].migration_method == "live"
    assert meta["rt-shutdown"].migration_method == "shutdown"
    assert list(meta["rt-limited"].node_limit) == ["node2", "node3"]


def test_vm_meta_second_run_changes_nothing_and_a_change_is_applied(vms, lab_guests, tmp_path):
    cluster, _ = vms
    same = cluster.playbook("playbooks/vm_meta.yml", "--extra-vars", f"@{_vm_vars(lab_guests, tmp_path)}")
    assert same.returncode == 0, same.failures()
    assert same.changed() == {"localhost": 0}, same.changed_tasks()
    changed = cluster.playbook(
        "playbooks/vm_meta.yml", "--extra-vars", f"@{_vm_vars(lab_guests, tmp_path, downtime_ms=500)}"
    )
    assert changed.returncode == 0, changed.failures()
    assert changed.changed() == {"localhost": 1}
    for name, _, _ in VMS:
        assert read_vm(cluster.store, find_vm(cluster.store, name)).meta.migration_max_downtime_ms == 500
    again = cluster.playbook(
        "playbooks/vm_meta.yml", "--extra-vars", f"@{_vm_vars(lab_guests, tmp_path, downtime_ms=500)}"
    )
    assert again.changed() == {"localhost": 0}, again.changed_tasks()


def test_rolling_maintenance_moves_vms_and_brings_them_home(vms):
    cluster, _ = vms
    before = _placement(cluster)
    assert before == {name: (node, [node]) for name, node, _ in VMS}
    started = time.time()
    run = cluster.playbook("playbooks/maintenance.yml", timeout=1200)
    assert run.returncode == 0, run.failures()
    # one node at a time, in inventory order, each flushed and made ready
    flushes = run.task_results("Flush the node (its VMs migrate to the other nodes)")
    assert sorted(flushes) == cluster.nodes() and all(r["changed"] for r in flushes.values())
    assert _wait_placement(cluster, before) == before, "a VM did not come back where it was"
    for node in cluster.nodes():
        assert cluster.store.find_text(cluster.store.schema.node_key(node, S.NODE_DOMAIN_STATE)) == "ready"
    # real migrations happened, with each VM's method
    methods = {}
    for name, _, _ in VMS:
        records = [
            r
            for r in read_history(cluster.store, find_vm(cluster.store, name), last=S.HISTORY_KEEP)
            if r["steps"]["requested"] >= started
        ]
        assert records, f"{name} never moved"
        assert all(r["result"] == "done" for r in records), records
        methods[name] = {r["method_used"] for r in records}
    assert methods["rt-live"] == {"live"}
    assert methods["rt-shutdown"] == {"shutdown"}
    assert methods["rt-limited"] <= {"live", "shutdown"}
    # the node-limited VM only ever went to node3 (node2 was its home, node1 is not allowed)
    limited = read_history(cluster.store, find_vm(cluster.store, "rt-limited"), last=S.HISTORY_KEEP)
    assert {r["target"] for r in limited if r["steps"]["requested"] >= started} <= {"node2", "node3"}
    print(f"\nrolling maintenance of 3 nodes: {run.duration_s:.1f} s")


def test_rolling_maintenance_stops_at_a_node_that_cannot_flush(vms):
    cluster, _ = vms
    views, lab = cluster.views, cluster.lab
    before = _placement(cluster)
    node1 = lab.host(1)
    views.stop_services("node-daemon", node1.netns)
    state_path = cluster.store.schema.node_key("node1", S.NODE_DAEMON_STATE)
    assert wait_for_key(cluster.store, state_path, lambda v: v != "run", 30)
    try:
        run = cluster.playbook("playbooks/maintenance.yml", timeout=600)
        assert run.returncode != 0
        # the plan (the node module in check mode) already refuses a node whose daemon is not
        # running, so the maintenance stops before it writes anything, and no flush is tried
        plans = run.task_results("Plan the flush")
        assert list(plans) == ["node1"] and plans["node1"].get("failed"), plans
        assert "not run" in plans["node1"]["msg"], plans["node1"]["msg"]
        assert not run.task_results("Flush the node (its VMs migrate to the other nodes)")
        # the nodes after it were not touched
        for node in ("node2", "node3"):
            assert cluster.store.find_text(cluster.store.schema.node_key(node, S.NODE_DOMAIN_STATE)) == "ready"
        assert not run.task_results("Make the node ready again (the VMs whose home it is come back)")
        assert _placement(cluster) == before
    finally:
        assert views.start_daemon(node1) == "started"
        assert wait_for_key(cluster.store, state_path, lambda v: v == "run", 60)


# A migration there and back through the module, as an operator makes it (with the inventory's
# pvc_zk_options: the operator's identity over TLS).
THERE_AND_BACK = """
- name: Migrate a VM there and back
  hosts: localhost
  gather_facts: false
  module_defaults:
    group/pvc.cluster.all: "{{ {'zk_hosts': pvc_zk_hosts, 'zk_root': pvc_zk_root | default('/pvc')}
                               | combine(pvc_zk_options | default({})) }}"
  tasks:
    - name: Migrate rt-live to node3
      pvc.cluster.vm_migrate:
        name: rt-live
        target_node: node3
    - name: Bring it home
      pvc.cluster.vm_migrate:
        name: rt-live
        state: unmigrated
"""


def test_a_rollout_that_changes_libvirts_configuration_costs_no_vm(vms, tmp_path):
    """A configuration change makes the libvirt role restart libvirtd (here the lab's hook does
    what the role's handler does under systemd) on every node while the VMs run and the daemons
    are up (issue #12): no guest stops, no VM runs twice, no daemon restarts, every node publishes
    libvirt ok again, and migrations work afterwards. The configuration is then set back, which
    restarts every libvirtd once more."""
    cluster, _ = vms
    views, lab, store = cluster.views, cluster.lab, cluster.store
    before = _placement(cluster)
    assert before == {name: (node, [node]) for name, node, _ in VMS}
    qemus = sorted(r.pid for r in lab.qemu_processes())
    daemons = {r["host"]: r["pid"] for r in views.services() if r["role"] == "node-daemon"}
    assert len(daemons) == len(cluster.nodes())
    with RunningMonitor(lab.hosts) as monitor:
        for level in ("2", "3"):  # libvirtd's log level changed, then set back
            libvirtds = {r.host: r.pid for r in lab.recorded_pids() if r.role == "libvirtd"}
            run = cluster.playbook(
                "playbooks/rollout.yml",
                timeout=1200,
                extra_vars={"libvirt_log_outputs": f"{level}:file:/var/log/libvirt/libvirtd.log"},
            )
            assert run.returncode == 0, run.failures()
            restarted = {r.host: r.pid for r in lab.recorded_pids() if r.role == "libvirtd"}
            assert set(restarted) == set(libvirtds) and all(restarted[h] != libvirtds[h] for h in libvirtds)
            for node in cluster.nodes():
                assert wait_for_key(store, store.schema.node_key(node, S.NODE_LIBVIRT), lambda v: v == "ok", 60), node
        assert _placement(cluster) == before
        assert sorted(r.pid for r in lab.qemu_processes()) == qemus  # the same QEMU processes: no guest stopped
        assert {r["host"]: r["pid"] for r in views.services() if r["role"] == "node-daemon"} == daemons
        uuid = find_vm(store, "rt-live")
        started = time.time()
        playbook = tmp_path / "there_and_back.yml"
        playbook.write_text(THERE_AND_BACK)
        run = cluster.playbook(playbook, timeout=600)
        assert run.returncode == 0, run.failures()
        records = [r for r in read_history(store, uuid, last=S.HISTORY_KEEP) if r["steps"]["requested"] >= started]
        assert [(r["target"], r["result"]) for r in records] == [("node3", "done"), ("node2", "done")], records
        assert _wait_placement(cluster, before) == before
    assert monitor.violations() == []
