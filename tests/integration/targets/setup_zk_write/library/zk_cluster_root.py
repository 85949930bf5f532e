#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: pvc.cluster developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: zk_cluster_root
short_description: An empty pvc.cluster root of its own in the integration ZooKeeper, secured with a user's digest ACL
description:
  - A test helper of the pvc.cluster integration targets, not part of the collection.
  - With O(state=present), creates the cluster schema (what a node daemon creates when it first starts) at
    O(zk_root), every key readable and writable by user O(username) only, as a cluster that uses
    authentication has it. It holds no node and no VM.
  - With O(state=absent), removes O(zk_root) and everything below it (as that user).
options:
  zk_hosts:
    description: The ZooKeeper servers; default the environment variable E(PVC_IT_ZK_HOSTS).
    type: str
  zk_root:
    description: The root to create or remove; it must not be the integration cluster's own root.
    type: str
    required: true
  username:
    description: The user whose digest ACL secures the root.
    type: str
    required: true
  password:
    description: That user's password.
    type: str
    required: true
  state:
    description: Whether the root is there.
    type: str
    choices: [present, absent]
    default: present
author:
  - pvc.cluster developers (!UNKNOWN)
"""

EXAMPLES = r"""
- name: A cluster root that only user operator may use
  zk_cluster_root:
    zk_root: "{{ pvc_zk_root }}-secured"
    username: operator
    password: s3cret
"""

RETURN = r"""
root:
  description: The root created or removed.
  returned: always
  type: str
"""

import os

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.pvc.cluster.plugins.module_utils._store import ClusterStore, ConnectionOptions, StoreError


def main():
    module = AnsibleModule(
        argument_spec=dict(
            zk_hosts=dict(type="str"),
            zk_root=dict(type="str", required=True),
            username=dict(type="str", required=True),
            password=dict(type="str", required=True, no_log=True),
            state=dict(type="str", choices=["present", "absent"], default="present"),
        )
    )
    hosts = module.params["zk_hosts"] or os.environ.get("PVC_IT_ZK_HOSTS")
    root = module.params["zk_root"]
    if not hosts:
        module.fail_json(msg="zk_hosts is needed (or PVC_IT_ZK_HOSTS)")
    if root == os.environ.get("PVC_IT_ZK_ROOT"):
        module.fail_json(msg=f"{root} is the integration cluster's own root; name another one")
    # a client with credentials creates every key with a digest ACL for its user only (_store.py)
    store = ClusterStore(
        ConnectionOptions(
            hosts=hosts,
            root=root,
            timeout_s=30,
            auth_username=module.params["username"],
            auth_password=module.params["password"],
        )
    )
    try:
        store.start()
        if module.params["state"] == "present":
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
