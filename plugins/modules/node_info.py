#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: pvc.cluster developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: node_info
short_description: Read the nodes of a pvc.cluster and their memory accounting
version_added: 0.1.0
description:
  - Returns every node of the cluster (or the one named) with its daemon and domain states, liveness,
    memory accounting, load, and the VMs assigned to it, running on it and away from it.
  - Also returns cluster-wide figures, among them whether the cluster could take every running VM if
    any one ready node failed.
author:
  - pvc.cluster developers (!UNKNOWN)
options:
  name:
    description:
      - The name of one node. Fails when there is no such node.
      - When omitted, every node is returned. An empty name is refused.
    type: str
extends_documentation_fragment:
  - pvc.cluster._zk
  - pvc.cluster._attributes
  - pvc.cluster._attributes.info_module
  - pvc.cluster._attributes.actiongroup_all
seealso:
  - module: pvc.cluster.node
  - module: pvc.cluster.vm_info
"""

EXAMPLES = r"""
- name: Read every node
  pvc.cluster.node_info:
    zk_hosts: zk1.example.net:2181
  register: cluster

- name: Show the memory headroom of each node
  ansible.builtin.debug:
    msg: "{{ cluster.nodes | items2dict(key_name='name', value_name='memory') }}"

- name: Warn when one more node failure could not be absorbed
  ansible.builtin.debug:
    msg: "{{ cluster.cluster.survives_node_failure.message }}"
  when: not cluster.cluster.survives_node_failure.ok
"""

RETURN = r"""
nodes:
  description: The nodes, sorted by name.
  returned: always
  type: list
  elements: dict
  contains:
    name:
      description: The node's name.
      type: str
      sample: hv1
    daemon_state:
      description:
        - The node daemon's state (C(init), C(run), C(shutdown), C(stop), C(dead), C(fencing), C(fenced),
          C(fence-failed)), as every node reads it, the node's own state or a peer's verdict about it.
        - A node writes only its own state (C(init), C(run), C(shutdown), C(stop)); C(dead), C(fencing), C(fenced) and
          C(fence-failed) are its peers' verdicts, each kept under the judging node's own keys and naming the
          version of the node's state it judged, or an operator's confirmation (C(fenced)).
        - C(fence-failed) means that the node's fence failed and none of its VMs is started elsewhere until an
          operator confirms it is off (M(pvc.cluster.node) with O(pvc.cluster.node#module:state=fenced)).
      type: str
      sample: run
    maintenance:
      description: Whether the node is in maintenance (never fenced).
      type: bool
      sample: false
    fence:
      description:
        - The record of the node's last fence, empty when it was never fenced, with C(by) (the fencing node, or
          C(operator)), C(method), C(device), C(result) (C(fencing), C(fenced), C(fence-failed)), C(detail),
          C(started), C(finished) and C(duration_s), and for a peer's record C(version) (the version of the node's own
          daemon state it judged).
        - The fencing node keeps its record under its own keys, an operator's confirmation is the node's own; this is
          the one of them that started last.
      type: dict
      sample: {"by": "hv1", "method": "ipmi", "device": "ipmi 10.0.1.2:623 (off)", "result": "fenced",
               "detail": "power off confirmed through ipmi 10.0.1.2:623 (off)", "started": 1765000000.0,
               "finished": 1765000000.2, "duration_s": 0.2}
    domain_state:
      description: The node's domain state (C(ready), C(flush), C(flushed), C(unflush)).
      type: str
      sample: ready
    flush_halted:
      description:
        - Why the node's daemon stopped its running flush (under C(require_n1), the rest of the plan would leave the
          cluster unable to survive the loss of the node it names, short by the MiB it says); the node stays
          C(flush). Null when no flush is halted (a flush or ready that starts deletes the verdict).
        - A stored verdict that is not valid reads as a text saying so (and is listed in RV(nodes[].invalid)).
        - M(pvc.cluster.node) with O(pvc.cluster.node#module:state=flushed) asks the flush again.
      type: str
      sample: "flush of hv2 halted before moving 3 more VM(s): once done, the cluster would not survive the failure
        of hv1: ... short by 2048 MiB (require_n1 is set; ...)"
    recovery_n1:
      description:
        - Set when an HA recovery made by this node's daemon (it restarted a fenced node's VMs elsewhere) left the
          cluster unable to survive the loss of one more node, naming the fenced node, the VMs restarted and the
          nodes whose loss could not be absorbed. A recovery is never held back for n-1, even under C(require_n1);
          it prefers targets that keep the cluster n-1 safe. Null when the daemon's last recovery kept n-1 (or it
          made none).
        - A stored verdict that is not valid reads as a text saying so (and is listed in RV(nodes[].invalid)).
      type: str
      sample: "recovery of fenced node hv3 (4 VM(s) restarted elsewhere) left the cluster failing n-1: the cluster
        would not survive the failure of hv1: ... short by 2048 MiB"
    libvirt:
      description:
        - The node daemon's connection to its libvirtd, as the daemon last published it.
        - C(ok); C(down) (no connection, the daemon reconnects); C(hung) (libvirtd does not answer within the call
          timeout); C(invalid) when the stored value is not valid.
        - Only a node whose libvirt is C(ok) is chosen as a migration target.
      type: str
      sample: ok
    alive:
      description: Whether the daemon's ZooKeeper session is alive (its ephemeral C(alive) key exists).
      type: bool
      sample: true
    keepalive:
      description: Unix time of the daemon's last keepalive.
      type: float
      sample: 1764190000.12
    keepalive_age_s:
      description: Seconds since the last keepalive, or null when there was none.
      type: float
      sample: 1.2
    memory:
      description: Memory accounting, MiB.
      type: dict
      contains:
        total:
          description: Host memory.
          type: int
        used:
          description: Host memory in use.
          type: int
        free:
          description: Free host memory.
          type: int
        allocated:
          description: Memory of the VMs running on the node.
          type: int
        provisioned:
          description: Memory of every VM assigned to the node whatever its state (minus incoming migrations).
          type: int
        reserve:
          description: Host memory held back from VMs.
          type: int
        reserved:
          description: Memory reserved for incoming migrations in flight.
          type: int
        reservations:
          description: The incoming-migration reservations, VM name to MiB.
          type: dict
        headroom:
          description: What placement can still give to VMs (total - reserve - provisioned - reserved); negative when overcommitted.
          type: int
      sample: {"total": 65536, "used": 20480, "free": 45056, "allocated": 16384, "provisioned": 18432, "reserve": 1024,
               "reserved": 0, "reservations": {}, "headroom": 46080}
    vcpualloc:
      description: vCPUs of the VMs running on the node.
      type: int
      sample: 12
    cputotal:
      description: The node's CPUs as libvirt counts them (published when its daemon starts); 0 when not known.
      type: int
      sample: 32
    cpuload:
      description: 1-minute load average.
      type: float
      sample: 0.8
    domaincount:
      description: Number of VMs running on the node.
      type: int
      sample: 6
    running_vms:
      description: The VMs the node reports running.
      type: list
      elements: str
      sample: [db1, web1]
    assigned_vms:
      description: The VMs assigned to the node, whatever their state.
      type: list
      elements: str
      sample: [db1, web1, web2]
    returning_vms:
      description: The VMs whose home is this node and that run elsewhere (they come back when it is made ready).
      type: list
      elements: str
      sample: []
    address:
      description:
        - How peers reach the node (an IP address or a host name); each peer builds the node's libvirt and migration
          URIs from it with its own templates. Empty for a daemon that has not published one (its name is used).
      type: str
      sample: 10.0.0.1
    libvirt_uri:
      description: How the node's own configuration reaches its libvirtd from a peer, for people to read (no peer opens it).
      type: str
      sample: qemu+tcp://hv1/system
    transport_uri:
      description: Where QEMU streams a live migration to this node, for people to read (no peer uses it).
      type: str
      sample: tcp://10.0.0.1
    invalid:
      description:
        - Stored values of the node that are not valid (garbage written to ZooKeeper), each naming its key, what
          was found and what is accepted. Such a value reads as 0 everywhere (so a garbage memory figure never makes
          the node look roomier than it is).
      type: list
      elements: str
      sample: ["/pvc/nodes/hv1/reservations/6695eb01-f6a4-8304-79aa-97f2502e193f: '1e999' is not valid; expected an
               integer from 0 to 8796093022208"]
cluster:
  description: Cluster-wide figures.
  returned: always
  type: dict
  contains:
    default_selector:
      description: The node selector that V(default) stands for.
      type: str
      sample: mem
    require_n1:
      description:
        - The cluster setting C(/config/require_n1) (false when unset or not valid); when true, M(pvc.cluster.node)
          refuses a flush and M(pvc.cluster.vm) a new running VM that the n-1 check would fail.
      type: bool
      sample: false
    schema_version:
      description: The ZooKeeper schema version of the cluster.
      type: str
      sample: "1"
    nodes:
      description: Number of nodes.
      type: int
      sample: 3
    vms:
      description: Number of VMs.
      type: int
      sample: 12
    insecure:
      description:
        - Whether the cluster is open, its root readable and writable by anyone (its daemons run with C(insecure)),
          instead of secured by ZooKeeper authentication and ACLs. A warning says so too.
      type: bool
      sample: false
    survives_node_failure:
      description:
        - Whether the other ready nodes could restart every VM of any one failed ready node (memory only).
        - C(failures) maps each node whose failure could not be absorbed to why, and C(shortfalls) to the MiB
          missing for the first of its VMs that fits nowhere.
      type: dict
      sample: {"ok": true, "message": "the cluster survives the failure of any one of 3 ready node(s)", "failures": {},
               "checked": [hv1, hv2, hv3]}
"""

import time

from ansible_collections.pvc.cluster.plugins.module_utils._module import (
    ModuleFailure,
    build_module,
    check_before_connecting,
    check_names,
    exit_from_session,
)
from ansible_collections.pvc.cluster.plugins.module_utils._report import cluster_report, node_report, read_cluster

ARGUMENT_SPEC = dict(
    name=dict(type="str"),
)


def run(module, session) -> dict:
    snapshot = read_cluster(session.store)
    name = module.params.get("name")
    if name and name not in snapshot.nodes:
        raise ModuleFailure(
            f"node {name!r} is not a node of this cluster (nodes: {', '.join(sorted(snapshot.nodes)) or 'none registered'})"
        )
    now = time.time()
    names = [name] if name else sorted(snapshot.nodes)
    cluster = cluster_report(snapshot)
    cluster["insecure"] = bool(session.store.cluster_open)
    if cluster["insecure"]:
        module.warn(
            "the cluster is insecure: anyone who reaches ZooKeeper can read and write it, and so define a VM "
            "on every node (its daemons run with insecure: true; see docs/security.md)"
        )
    return {"changed": False, "nodes": [node_report(snapshot, node, now) for node in names], "cluster": cluster}


def main():
    module = build_module(ARGUMENT_SPEC)
    check_before_connecting(module, lambda params: check_names(params, ("name",)))
    exit_from_session(module, run)


if __name__ == "__main__":
    main()
