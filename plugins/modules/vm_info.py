#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: pvc.cluster developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: vm_info
short_description: Read the VMs of a pvc.cluster
version_added: 0.1.0
description:
  - Returns every VM of the cluster (or the one named) with its state (desired, and as the daemons moved it),
    placement, where it runs, memory, meta, the migration in flight and the last finished migrations.
author:
  - pvc.cluster developers (!UNKNOWN)
options:
  name:
    description:
      - The name or UUID of one VM. Fails when there is no such VM.
      - When omitted, every VM is returned. An empty name is refused.
    type: str
  history:
    description:
      - How many finished migrations to return per VM (newest first); V(0) for none.
      - From V(0) to V(20), the number of finished migrations the cluster keeps per VM.
    type: int
    default: 5
extends_documentation_fragment:
  - pvc.cluster._zk
  - pvc.cluster._attributes
  - pvc.cluster._attributes.info_module
  - pvc.cluster._attributes.actiongroup_all
seealso:
  - module: pvc.cluster.vm
  - module: pvc.cluster.node_info
"""

EXAMPLES = r"""
- name: Read web1
  pvc.cluster.vm_info:
    zk_hosts: zk1.example.net:2181
    name: web1
  register: web1

- name: Show where it runs and how its last migration went
  ansible.builtin.debug:
    msg: "{{ web1.vms[0].running_on }} / {{ (web1.vms[0].history | first | default({})).result | default('never migrated') }}"

- name: List the VMs that failed to start
  pvc.cluster.vm_info:
    zk_hosts: zk1.example.net:2181
    history: 0
  register: all_vms

- name: Show them with their reasons
  ansible.builtin.debug:
    msg: "{{ all_vms.vms | selectattr('state', 'eq', 'fail') | items2dict(key_name='name', value_name='failedreason') }}"
"""

RETURN = r"""
vms:
  description: The VMs, sorted by name.
  returned: always
  type: list
  elements: dict
  contains:
    name:
      description: The VM's name.
      type: str
      sample: web1
    uuid:
      description: The VM's UUID.
      type: str
      sample: 6695eb01-f6a4-8304-79aa-97f2502e193f
    state:
      description:
        - The VM's state (C(start), C(restart), C(shutdown), C(stop), C(disable), C(fail)) - the operator's desired state,
          or the state a node daemon moved it to since (a restart done is C(start), a shutdown ended C(stop), a start
          that failed C(fail), a VM a flush had to shut down C(stop)) until the desired state is written again.
      type: str
      sample: start
    desired_state:
      description: The desired state as the operator (M(pvc.cluster.vm)) last wrote it; only the operator writes it.
      type: str
      sample: start
    autostart:
      description:
        - Whether the VM starts when its node becomes ready - a flush shut it down, or its C(node_autostart) meta is
          set and no ready has acted on that setting yet.
      type: bool
      sample: false
    node:
      description: The node the VM is assigned to (or being migrated to).
      type: str
      sample: hv2
    lastnode:
      description: The home node to return to after a temporary migration, or empty.
      type: str
      sample: hv1
    home:
      description: The node the VM returns to on unmigrate (C(lastnode), else C(node)).
      type: str
      sample: hv1
    running_on:
      description: The nodes whose daemons report the VM running (as of their last keepalive).
      type: list
      elements: str
      sample: [hv2]
    failedreason:
      description: libvirt's reason for the last failure to start, or empty.
      type: str
      sample: ""
    memory_mib:
      description: The configured maximum memory (what memory accounting counts), MiB.
      type: int
      sample: 2048
    vcpus:
      description: The maximum vCPU count.
      type: int
      sample: 2
    meta:
      description: The VM's meta, normalised (see M(pvc.cluster.vm_meta)).
      type: dict
      sample: {"migration_method": "default", "node_selector": "default", "node_limit": [], "node_autostart": false,
               "migration_max_downtime_ms": 300, "migration_auto_converge": false}
    meta_warnings:
      description: Stored meta values that could not be understood (their defaults apply).
      type: list
      elements: str
      sample: []
    migration:
      description: The record of the migration in flight, or null (also when the record that exists is not valid).
      type: dict
      sample: null
    migration_error:
      description:
        - Why the VM's migration record is not valid, or empty. No daemon acts on such a record and nothing else moves
          the VM until an operator clears it (M(pvc.cluster.vm_migrate) with O(pvc.cluster.vm_migrate#module:state=cleared)).
      type: str
      sample: ""
    history:
      description: The last finished migrations (audit records), newest first.
      type: list
      elements: dict
      sample: [{"id": "6f1c2a9b0d3e", "kind": "migrate", "source": "hv1", "target": "hv2", "result": "done",
                "method_used": "live", "duration_s": 2.4}]
    xml:
      description: The domain XML stored in ZooKeeper.
      type: str
      sample: <domain type='kvm'>...</domain>
    xml_error:
      description: Why the stored XML cannot be parsed, or empty.
      type: str
      sample: ""
    stats:
      description: Statistics of the running VM published by its node, or empty.
      type: dict
      sample: {}
    invalid:
      description:
        - Stored values of the VM that are not valid (garbage written to ZooKeeper), each naming its key, what was
          found and what is accepted; each reads as its default (the XML and the migration record read as none).
      type: list
      elements: str
      sample: ["/pvc/domains/6695eb01-f6a4-8304-79aa-97f2502e193f/state: 'run' is not valid; expected one of start,
               restart, shutdown, stop, disable, fail"]
"""

from ansible_collections.pvc.cluster.plugins.module_utils import _schema as S
from ansible_collections.pvc.cluster.plugins.module_utils._cluster import find_vm
from ansible_collections.pvc.cluster.plugins.module_utils._module import (
    ModuleFailure,
    build_module,
    check_before_connecting,
    check_names,
    exit_from_session,
)
from ansible_collections.pvc.cluster.plugins.module_utils._report import read_cluster, vm_history, vm_report

ARGUMENT_SPEC = dict(
    name=dict(type="str"),
    history=dict(type="int", default=5),
)


def check_input(params: dict) -> None:
    check_names(params, ("name",))
    if not 0 <= params["history"] <= S.HISTORY_KEEP:
        raise ModuleFailure(
            f"history must be from 0 to {S.HISTORY_KEEP} (the finished migrations kept per VM), not {params['history']}"
        )


def run(module, session) -> dict:
    params = module.params
    store = session.store
    uuids = None
    if params.get("name"):
        uuid = find_vm(store, params["name"])
        if uuid is None:
            raise ModuleFailure(f"VM {params['name']} does not exist (give its name or UUID, or no name for every VM)")
        uuids = [uuid]
    snapshot = read_cluster(store, vms=uuids)
    reports = [vm_report(snapshot, uuid, vm_history(store, uuid, params["history"])) for uuid in snapshot.vms]
    return {"changed": False, "vms": sorted(reports, key=lambda vm: (vm["name"], vm["uuid"]))}


def main():
    module = build_module(ARGUMENT_SPEC)
    check_before_connecting(module, check_input)
    exit_from_session(module, run)


if __name__ == "__main__":
    main()
