# -*- coding: utf-8 -*-
# Copyright: pvc.cluster developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
#
# PRIVATE: this module is internal to the pvc.cluster collection and its node daemon.
# It may change without notice; do not import it from other collections.
"""Memory and vCPU accounting of one node: pure arithmetic, standard library only, no I/O.

All figures are MiB. A VM's memory is its configured maximum (``<memory>`` in its XML, or
libvirt's ``maxMemory()`` for a running domain), never its current balloon size, so a VM counts
the same whether it runs or not (mixing the two makes a node's figures jump when a VM starts or stops).

Rules applied by :func:`account_node` to each VM, seen from node ``N``:

==========================================  ========  =======  ===============================
VM                                          memalloc  memprov  vcpualloc, domaincount, running
==========================================  ========  =======  ===============================
running on N, assigned to N                 yes       yes      yes
stopped (any non-running state), on N       no        yes      no
running on N, assigned elsewhere            yes       no       yes
  (mid-migration away, or being stopped)
assigned to N with a reservation on N       no        no       no
  (incoming migration, not yet running)
running on N with a reservation on N        yes       no       no
  (incoming migration in progress)
assigned elsewhere, not running on N        no        no       no
==========================================  ========  =======  ===============================

* memalloc is what VMs use on this host now: every domain active here, including a paused
  incoming migration target, because its memory is already allocated.
* memprov is what placement must keep for VMs that belong here: a VM assigned here whatever its
  state, but not a VM running here that is assigned elsewhere (it is leaving, and placement treats
  it as gone), and not a VM holding an incoming-migration reservation here (the reservation
  ``/nodes/<node>/reservations/<uuid>`` already counts it, and counting both would count it twice).
  When the migration has ended, the node's keepalive counts the VM in memprov in the transaction
  that deletes the reservation (``reserved_here`` is then false), so the VM is always covered.
* vcpualloc, domaincount and running list the VMs that run here and are not incoming migrations
  still in progress (an incoming copy becomes this node's VM only when its migration is done).

Placement headroom: ``memtotal - memreserve - memprov - sum(reservations)`` (:func:`headroom_mib`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class AccountedVM:
    """One VM as the node accounting sees it.

    ``node`` is the VM's assigned node (``/domains/<uuid>/node``). ``running_here`` is true when
    libvirt on the accounting node reports the domain active (running or paused). ``reserved_here``
    is true when the accounting node holds an incoming-migration reservation for the VM.
    """

    uuid: str
    node: str
    memory_mib: int
    vcpus: int = 0
    running_here: bool = False
    reserved_here: bool = False


@dataclass(frozen=True)
class NodeAccount:
    """The accounting keys a node publishes (see _schema: memalloc, memprov, vcpualloc...)."""

    memalloc: int
    memprov: int
    vcpualloc: int
    domaincount: int
    running: tuple[str, ...]


def account_node(node: str, vms: Iterable[AccountedVM]) -> NodeAccount:
    """Account the VMs of the cluster (or any superset of those concerning ``node``) for ``node``.

    ``running`` keeps the order in which the running VMs were given. Negative memory or vCPU
    figures count as 0.
    """
    memalloc = memprov = vcpualloc = 0
    running: list[str] = []
    for vm in vms:
        memory = max(int(vm.memory_mib), 0)
        if vm.running_here:
            memalloc += memory
            if not vm.reserved_here:
                vcpualloc += max(int(vm.vcpus), 0)
                running.append(vm.uuid)
        if vm.node == node and not vm.reserved_here:
            memprov += memory
    return NodeAccount(
        memalloc=memalloc, memprov=memprov, vcpualloc=vcpualloc, domaincount=len(running), running=tuple(running)
    )


def headroom_mib(memtotal: int, memreserve: int, memprov: int, reservations_mib: int) -> int:
    """Memory still free for placement on a node, MiB; negative when the node is overcommitted."""
    return int(memtotal) - int(memreserve) - int(memprov) - int(reservations_mib)


def overcommit_mib(memtotal: int, memreserve: int, memprov: int, reservations_mib: int) -> int:
    """How far a node is overcommitted, MiB (0 when it is not)."""
    return max(0, -headroom_mib(memtotal, memreserve, memprov, reservations_mib))
