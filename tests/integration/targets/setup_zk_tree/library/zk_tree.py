#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: pvc.cluster developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: zk_tree
short_description: The whole ZooKeeper tree of the integration cluster, to show that a task wrote nothing
description:
  - A test helper of the pvc.cluster integration targets, not part of the collection.
  - Reads every znode below the cluster root (its data and its ACL) and returns them as O(tree).
  - With O(unchanged_since) (the O(tree) of an earlier run), fails when the tree differs from it,
    naming every path added, removed or changed.
  - The figures that the node daemons rewrite on their own are left out of the comparison (O(volatile)).
  - The ZooKeeper options are the collection's (its modules' C(zk_*) options); the tasks give them all, the
    integration cluster's operator over TLS.
options:
  unchanged_since:
    description: A tree returned earlier; the task fails unless the tree is the same now.
    type: dict
  volatile:
    description:
      - Regular expressions of paths (below the root) that are neither read nor compared.
      - By default every node key that its daemon rewrites (all but C(daemon_state), C(domain_state) and the
        reservations) and the statistics of running VMs.
    type: list
    elements: str
extends_documentation_fragment:
  - pvc.cluster._zk
author:
  - pvc.cluster developers (!UNKNOWN)
"""

EXAMPLES = r"""
- name: Read the tree before a task that must write nothing
  zk_tree:
  register: before

- name: Fail unless the tree is still the same
  zk_tree:
    unchanged_since: "{{ before.tree }}"
"""

RETURN = r"""
tree:
  description: Every znode below the root that is not volatile, by path below the root, with its data and ACL.
  returned: always
  type: dict
differences:
  description: What changed since O(unchanged_since) (C(added), C(removed), C(changed) paths).
  returned: when O(unchanged_since) is given
  type: dict
"""

import re

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.pvc.cluster.plugins.module_utils._module import (
    ZK_REQUIRED_TOGETHER,
    argument_spec,
    connection_options,
)
from ansible_collections.pvc.cluster.plugins.module_utils._store import ClusterStore, StoreError

# what the daemons write on their own (keepalive figures, liveness, URIs at a restart; VM statistics)
DEFAULT_VOLATILE = [
    r"^/nodes/[^/]+/(?!(daemon_state|domain_state|reservations)(/|$))[^/]+$",
    r"^/domains/[^/]+/runtime/stats$",
]


def read_tree(client, root: str, volatile) -> dict:
    """{path below root: {"data": text, "acl": ["scheme:id:perms", ...]}} for every znode not volatile,
    read level by level with all the requests of a level in flight together."""
    tree = {}
    level = [""]
    while level:
        reads = [
            (
                path,
                client.get_async(root + path or "/"),
                client.get_acls_async(root + path or "/"),
                client.get_children_async(root + path or "/"),
            )
            for path in level
        ]
        level = []
        for path, data, acls, children in reads:
            value, _stat = data.get(timeout=30)
            acl_list, _stat = acls.get(timeout=30)
            tree[path or "/"] = {
                "data": (value or b"").decode("utf-8", errors="replace"),
                "acl": sorted(f"{acl.id.scheme}:{acl.id.id}:{acl.perms}" for acl in acl_list),
            }
            for child in children.get(timeout=30):
                below = f"{path}/{child}"
                if not any(pattern.search(below) for pattern in volatile):
                    level.append(below)
    return tree


def compare(before: dict, after: dict) -> dict:
    return {
        "added": sorted(set(after) - set(before)),
        "removed": sorted(set(before) - set(after)),
        "changed": sorted(path for path in set(before) & set(after) if before[path] != after[path]),
    }


def main():
    module = AnsibleModule(
        argument_spec=argument_spec(
            dict(
                unchanged_since=dict(type="dict"),
                volatile=dict(type="list", elements="str"),
            )
        ),
        supports_check_mode=True,
        required_together=ZK_REQUIRED_TOGETHER,
    )
    volatile = [re.compile(pattern) for pattern in (module.params["volatile"] or DEFAULT_VOLATILE)]
    try:
        store = ClusterStore(connection_options(module.params))
    except ValueError as exc:
        module.fail_json(msg=str(exc))
    try:
        store.start()
        tree = read_tree(store.client, store.schema.root, volatile)
    except StoreError as exc:
        module.fail_json(msg=str(exc))
    finally:
        store.stop()
    result = {"changed": False, "tree": tree}
    if module.params["unchanged_since"] is not None:
        differences = compare(module.params["unchanged_since"], tree)
        result["differences"] = differences
        if any(differences.values()):
            shown = "; ".join(
                f"{kind}: {', '.join(paths[:10])}" + (f" (and {len(paths) - 10} more)" if len(paths) > 10 else "")
                for kind, paths in differences.items()
                if paths
            )
            module.fail_json(msg=f"the ZooKeeper tree changed: {shown}", **result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
