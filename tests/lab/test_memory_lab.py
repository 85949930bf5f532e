"""The memory invariant (docs/architecture.md, "Memory accounting") on real hosts: consistent
ZooKeeper snapshots sampled while node1 is flushed onto the others and made ready again (real
libvirtd + QEMU guests), and while node2's daemon restarts: no instant where a node's published
memprov and reservations leave out a VM assigned to it, or its VMs exceed its capacity."""

from __future__ import annotations

import pytest

from tests.daemon.invariant import MemoryInvariant, Sampler

from .daemons import lab_cluster  # noqa: F401  (fixture)

pytestmark = pytest.mark.lab


def test_memory_is_covered_at_every_instant_through_flush_ready_and_a_restart(lab_cluster):
    cluster = lab_cluster()
    cluster.start()
    vms = {cluster.define_vm(f"acct{i}", "node1"): 128 for i in range(3)}
    vms[cluster.define_vm("acct-other", "node2")] = 128
    for uuid in vms:
        cluster.wait_running_on("node1" if uuid != list(vms)[-1] else "node2", uuid)
    invariant = MemoryInvariant(cluster.store, cluster.nodes, vms)
    # the test's own definitions assign VMs with no reservation: wait for the keepalives to count them
    cluster.wait(cluster.schema.node_key("node1", "memprov"), lambda v: int(v or 0) >= 3 * 128, what="node1 memprov")
    cluster.wait(cluster.schema.node_key("node2", "memprov"), lambda v: int(v or 0) >= 128, what="node2 memprov")
    assert invariant.check_now() == []

    with Sampler(invariant) as sampler:
        cluster.set_domain_state("node1", "flush")
        cluster.wait_domain_state("node1", "flushed")
        cluster.restart("node2")
        cluster.wait_daemon_state("node2", "run")
        cluster.set_domain_state("node1", "unflush")
        cluster.wait_domain_state("node1", "ready")
        for uuid in list(vms)[:3]:
            cluster.wait_running_on("node1", uuid)
    assert sampler.findings.violations == []
    assert sampler.findings.samples >= 20, sampler.findings
    cluster.check_invariants(list(vms))
