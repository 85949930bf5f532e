# -*- coding: utf-8 -*-
# Copyright: pvc.cluster developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
#
# PRIVATE: this doc fragment is internal to the pvc.cluster collection.
# It may change without notice; do not use it from other collections.
"""The VM meta options, shared by pvc.cluster.vm and pvc.cluster.vm_meta (argument spec:
``META_ARGUMENT_SPEC`` in ``plugins/module_utils/_module.py``)."""

from __future__ import annotations


class ModuleDocFragment:
    DOCUMENTATION = r"""
options:
  migration_method:
    description:
      - How the VM moves between nodes.
      - V(default) migrates live and falls back to a shutdown migration when the live migration fails;
        V(live) migrates live only and aborts (the VM keeps running where it is) when that fails;
        V(shutdown) always shuts the VM down, moves it and starts it on the target.
      - Left unchanged when not given.
    type: str
    choices: [default, live, shutdown]
  node_selector:
    description:
      - How a target node is chosen for the VM when none is named (definition, migration, flush).
      - V(mem) most memory headroom (total - reserve - provisioned - reservations);
        V(memfree) most free host memory; V(load) lowest load average; V(vcpus) fewest allocated vCPUs;
        V(vms) fewest running VMs; V(fit) packs and balances (a node the VM fills to within 1 GiB first;
        on a cluster with less than 12% of its capacity left, the node the VM fits most tightly, which
        keeps the largest gaps for large VMs; otherwise the node with the largest share of its memory
        free); V(default) the cluster default (itself V(mem) unless configured).
      - Left unchanged when not given.
    type: str
    choices: [default, mem, memfree, load, vcpus, vms, fit]
  node_limit:
    description:
      - The nodes the VM may run on; an empty list means any node.
      - Every name must be a node of the cluster; an empty name (as in V([""])) is refused.
      - Left unchanged when not given.
    type: list
    elements: str
  node_autostart:
    description:
      - Start the VM again when its node becomes ready (set by a flush that had to shut the VM down).
      - Left unchanged when not given.
    type: bool
  migration_max_downtime_ms:
    description:
      - The longest pause of the VM at the switch-over of a live migration, in milliseconds.
      - From V(1) to V(2000000) (2000 s, the most QEMU accepts). V(300) when never set.
      - Left unchanged when not given.
    type: int
  migration_auto_converge:
    description:
      - Let a live migration of the VM throttle its vCPUs, more at every pass that sends memory again, until what is
        left to send fits into O(migration_max_downtime_ms) (QEMU's auto-converge). For a VM that writes to its memory
        faster than the network moves it, which otherwise never converges.
      - Without it such a migration runs until the node daemon's completion timeout, which aborts it; the VM keeps
        running on its source (and under O(migration_method=default) is then moved by a shutdown migration).
      - Post-copy migration is not offered; a network failure during post-copy loses the VM.
      - V(false) when never set. Left unchanged when not given.
    type: bool
"""
