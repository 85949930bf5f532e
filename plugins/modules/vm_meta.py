#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: pvc.cluster developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: vm_meta
short_description: Set the migration and placement meta of a pvc.cluster VM
version_added: 0.1.0
description:
  - Sets any subset of a VM's meta; every option left out stays as it is.
  - The node daemons read the meta at every migration and flush, so a change applies to the next one.
  - Values are compared after normalisation (legacy spellings such as C(none) for V(default) count as
    the same value), so the task reports a change only when the meaning changes.
author:
  - pvc.cluster developers (!UNKNOWN)
options:
  name:
    description: The VM's name or UUID (not empty).
    type: str
    required: true
extends_documentation_fragment:
  - pvc.cluster._zk
  - pvc.cluster._vm_meta
  - pvc.cluster._attributes
  - pvc.cluster._attributes.actiongroup_all
attributes:
  check_mode:
    support: full
  diff_mode:
    support: full
  idempotent:
    support: full
seealso:
  - module: pvc.cluster.vm
  - module: pvc.cluster.vm_info
"""

EXAMPLES = r"""
- name: Pin db1 to two nodes and never let it fall back to a shutdown migration
  pvc.cluster.vm_meta:
    zk_hosts: zk1.example.net:2181
    name: db1
    node_limit: [hv1, hv2]
    migration_method: live
    migration_max_downtime_ms: 500

- name: Let the busy db2 converge by throttling its vCPUs during a live migration
  pvc.cluster.vm_meta:
    zk_hosts: zk1.example.net:2181
    name: db2
    migration_auto_converge: true

- name: Let web1 run anywhere again, placed by free memory
  pvc.cluster.vm_meta:
    zk_hosts: zk1.example.net:2181
    name: web1
    node_limit: []
    node_selector: memfree
"""

RETURN = r"""
name:
  description: The VM's name.
  returned: always
  type: str
  sample: db1
uuid:
  description: The VM's UUID.
  returned: always
  type: str
  sample: 6695eb01-f6a4-8304-79aa-97f2502e193f
meta_before:
  description: The VM's whole meta before the task.
  returned: always
  type: dict
  sample: {"migration_method": "default", "node_selector": "default", "node_limit": [], "node_autostart": false,
           "migration_max_downtime_ms": 300, "migration_auto_converge": false}
meta:
  description: The VM's whole meta after the task (in check mode, as it would be).
  returned: always
  type: dict
  sample: {"migration_method": "live", "node_selector": "default", "node_limit": ["hv1", "hv2"], "node_autostart": false,
           "migration_max_downtime_ms": 500, "migration_auto_converge": false}
changed_keys:
  description: The meta options that changed (or would change).
  returned: always
  type: list
  elements: str
  sample: [migration_method, node_limit, migration_max_downtime_ms]
"""

from ansible_collections.pvc.cluster.plugins.module_utils import _schema as S
from ansible_collections.pvc.cluster.plugins.module_utils._cluster import find_vm, node_names
from ansible_collections.pvc.cluster.plugins.module_utils._meta import VMMeta
from ansible_collections.pvc.cluster.plugins.module_utils._module import (
    META_ARGUMENT_SPEC,
    MetaPlan,
    ModuleFailure,
    build_module,
    check_before_connecting,
    check_names,
    exit_from_session,
    meta_updates,
)
from ansible_collections.pvc.cluster.plugins.module_utils._store import text_of

ARGUMENT_SPEC = dict(
    name=dict(type="str", required=True),
    **META_ARGUMENT_SPEC,
)


def run(module, session) -> dict:
    params = module.params
    store, schema = session.store, session.schema
    names = node_names(store)
    updates = meta_updates(params, node_names=names)
    uuid = find_vm(store, params["name"])
    if uuid is None:
        raise ModuleFailure(f"VM {params['name']} does not exist (give its name or UUID)")
    name = store.find_text(schema.domain(uuid))
    stored, versions = {}, {}
    for key in S.META_KEYS:
        value = store.find(schema.domain_meta(uuid, key))
        stored[key] = text_of(value)
        if value:
            versions[schema.domain_meta(uuid, key)] = value.version
    plan = MetaPlan(VMMeta.from_store(stored), updates)
    differences, writes, before, after = plan.differences, plan.writes, plan.before, plan.after
    if S.META_NODE_LIMIT in writes:
        node = store.find_text(schema.domain_key(uuid, S.DOMAIN_NODE))
        limit = after[S.META_NODE_LIMIT]
        if limit and node not in limit:
            module.warn(
                f"VM {name} is on {node}, outside its new node_limit ({', '.join(limit)}); it stays there until it is migrated"
            )
    result = {
        "changed": differences.changed,
        "name": name,
        "uuid": uuid,
        "meta_before": before,
        "meta": after if differences.changed else before,
        "changed_keys": differences.changed_keys,
    }
    if module._diff:
        result["diff"] = differences.diff()
    if writes and not module.check_mode:
        paths = {schema.domain_meta(uuid, key): text for key, text in writes.items()}
        # compare-and-set on every meta key read: a concurrent change fails the task instead of being lost
        session.commit(
            paths,
            expect_versions=versions,
            create=[path for path in paths if path not in versions],
            what=f"the meta of VM {name}",
        )
    return result


def main():
    module = build_module(ARGUMENT_SPEC, needs_lxml=False)
    check_before_connecting(module, lambda params: check_names(params, ("name",)), meta_updates)
    exit_from_session(module, run)


if __name__ == "__main__":
    main()
