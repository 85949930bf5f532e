"""Memory accounting: memalloc / memprov / vcpualloc / domaincount for every kind of VM, and headroom."""

from __future__ import annotations

import pytest

from pvc_cluster_common._memory import AccountedVM, NodeAccount, account_node, headroom_mib, overcommit_mib

HERE = "node1"

# (description, VM, expected contribution on HERE as (memalloc, memprov, vcpualloc, domaincount))
KINDS = [
    ("running here, assigned here", AccountedVM("a", HERE, 1024, 2, running_here=True), (1024, 1024, 2, 1)),
    ("stopped, assigned here", AccountedVM("b", HERE, 2048, 4, running_here=False), (0, 2048, 0, 0)),
    (
        "running here, assigned elsewhere (migrating away)",
        AccountedVM("c", "node2", 512, 1, running_here=True),
        (512, 0, 1, 1),
    ),
    (
        "assigned here, reservation here, not running yet (incoming)",
        AccountedVM("d", HERE, 4096, 2, False, reserved_here=True),
        (0, 0, 0, 0),
    ),
    (
        "running here with a reservation here (incoming, in progress)",
        AccountedVM("e", HERE, 8192, 8, True, reserved_here=True),
        (8192, 0, 0, 0),
    ),
    ("assigned elsewhere, not running here", AccountedVM("f", "node3", 256, 1, running_here=False), (0, 0, 0, 0)),
    ("negative figures count as 0", AccountedVM("g", HERE, -5, -3, running_here=True), (0, 0, 0, 1)),
]


@pytest.mark.parametrize("description,vm,expected", KINDS, ids=[k[0] for k in KINDS])
def test_each_kind_alone(description, vm, expected):
    account = account_node(HERE, [vm])
    assert (account.memalloc, account.memprov, account.vcpualloc, account.domaincount) == expected, description
    assert account.running == ((vm.uuid,) if expected[3] else ())


def test_mix_is_the_sum_and_running_keeps_order():
    vms = [kind[1] for kind in KINDS]
    account = account_node(HERE, vms)
    assert account == NodeAccount(
        memalloc=1024 + 512 + 8192,
        memprov=1024 + 2048,
        vcpualloc=2 + 1,
        domaincount=3,
        running=("a", "c", "g"),
    )


def test_running_and_stopped_vm_count_the_same_in_memprov():
    running = account_node(HERE, [AccountedVM("a", HERE, 3000, 2, running_here=True)])
    stopped = account_node(HERE, [AccountedVM("a", HERE, 3000, 2, running_here=False)])
    assert running.memprov == stopped.memprov == 3000


def test_migration_seen_from_both_sides_counts_once_for_placement():
    # VM x (2048 MiB) migrates from node1 to node2: node = node2, still running on node1,
    # node2 holds a reservation. Placement must count it exactly once (on node2, via the reservation).
    source = account_node("node1", [AccountedVM("x", "node2", 2048, 2, running_here=True)])
    target = account_node("node2", [AccountedVM("x", "node2", 2048, 2, running_here=False, reserved_here=True)])
    assert (source.memalloc, source.memprov) == (2048, 0)
    assert (target.memalloc, target.memprov) == (0, 0)
    reservation = 2048
    assert headroom_mib(16384, 0, target.memprov, reservation) == 16384 - 2048
    # once it has arrived and the reservation is released, memprov takes over
    done = account_node("node2", [AccountedVM("x", "node2", 2048, 2, running_here=True)])
    assert (done.memalloc, done.memprov, done.domaincount) == (2048, 2048, 1)
    assert headroom_mib(16384, 0, done.memprov, 0) == 16384 - 2048


def test_empty():
    assert account_node(HERE, []) == NodeAccount(0, 0, 0, 0, ())


@pytest.mark.parametrize(
    "memtotal,memreserve,memprov,reservations,expected",
    [
        (16384, 1024, 4096, 0, 11264),
        (16384, 1024, 4096, 2048, 9216),
        (16384, 0, 0, 0, 16384),
        (8192, 1024, 8192, 512, -1536),
        ("8192", "0", "1024", "0", 7168),
    ],
)
def test_headroom(memtotal, memreserve, memprov, reservations, expected):
    assert headroom_mib(memtotal, memreserve, memprov, reservations) == expected
    assert overcommit_mib(memtotal, memreserve, memprov, reservations) == max(0, -expected)
