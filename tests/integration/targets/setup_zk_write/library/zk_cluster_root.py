#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: pvc.cluster developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: zk_cluster_root
short_description: An empty pvc.cluster root of its own in the integration ZooKeeper, open to anyone
description:
  - A test helper of the pvc.cluster integration targets, not part of the collection.
  - The integration cluster is secured (authentication and ACLs); this root is the other case, a cluster
    whose daemons would run with C(insecure) true, for the checks that credentials are refused there.
  - With O(state=present), creates the cluster schema (what a node daemon creates when it first starts) at
    O(zk_root), every key open to anyone (ACL C(world:anyone)). It holds no node and no VM.
    The server enforces authentication, so the helper itself connects as O(zk_username).
  - With O(state=absent), removes O(zk_root) and everything below it.
  - The ZooKeeper options are the collection's (its modules' C(zk_*) options); O(zk_root) (not the
    integration cluster's own root) and the credentials are needed.
options:
  state:
    description: Whether the root is there.
    type: str
    choices: [present, absent]
    default: present
extends_documentation_fragment:
  - pvc.cluster._zk
author:
  - pvc.cluster developers (!UNKNOWN)
"""

EXAMPLES = r"""
- name: A cluster root open to anyone
  zk_cluster_root:
    zk_root: "{{ pvc_zk_root }}-open"
    zk_username: operator
    zk_password: s3cret
"""

RETURN = r"""
root:
  description: The root created or removed.
  returned: always
  type: str
"""

import os

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.pvc.cluster.plugins.module_utils._module import (
    ZK_REQUIRED_TOGETHER,
    argument_spec,
    connection_options,
)
from ansible_collections.pvc.cluster.plugins.module_utils._store import ACL, PERM_ALL, ClusterStore, Id, StoreError


def main():
    module = AnsibleModule(
        argument_spec=argument_spec(dict(state=dict(type="str", choices=["present", "absent"], default="present"))),
        required_together=ZK_REQUIRED_TOGETHER,
    )
    root = module.params["zk_root"]
    if root == os.environ.get("PVC_IT_ZK_ROOT"):
        module.fail_json(msg=f"{root} is the integration cluster's own root; name another one")
    if not module.params["zk_username"]:
        # the server enforces authentication
        module.fail_json(msg="zk_username and zk_password are needed")
    try:
        store = ClusterStore(connection_options(module.params))
    except ValueError as exc:
        module.fail_json(msg=str(exc))
    try:
        store.start()
        if module.params["state"] == "present":
            # a client that knows no cluster identities creates keys with its default ACL: open it
            store.client.default_acl = [ACL(PERM_ALL, Id("world", "anyone"))]
            changed = store.ensure_schema()
        else:
            changed = store.client.exists(root) is not None
            if changed:
                store.client.delete(root, recursive=True)
    except StoreError as exc:
        module.fail_json(msg=str(exc))
    finally:
        store.stop()
    module.exit_json(changed=changed, root=root)


if __name__ == "__main__":
    main()
