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
options:
  zk_hosts:
    description: The ZooKeeper servers; default the environment variable E(PVC_IT_ZK_HOSTS).
    type: str
  zk_root:
    description: The root to create or remove; it must not be the integration cluster's own root.
    type: str
    required: true
  zk_username:
    description: The user to connect as (digest authentication).
    type: str
    required: true
  zk_password:
    description: That user's password.
    type: str
    required: true
  zk_tls:
    description: Connect over TLS.
    type: bool
    default: false
  zk_tls_ca:
    description: PEM file of the CA that signed the ZooKeeper server's certificate.
    type: str
  state:
    description: Whether the root is there.
    type: str
    choices: [present, absent]
    default: present
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

from ansible_collections.pvc.cluster.plugins.module_utils._store import (
    ACL,
    PERM_ALL,
    ClusterStore,
    ConnectionOptions,
    Id,
    StoreError,
)


def main():
    module = AnsibleModule(
        argument_spec=dict(
            zk_hosts=dict(type="str"),
            zk_root=dict(type="str", required=True),
            zk_username=dict(type="str", required=True),
            zk_password=dict(type="str", required=True, no_log=True),
            zk_tls=dict(type="bool", default=False),
            zk_tls_ca=dict(type="str"),
            state=dict(type="str", choices=["present", "absent"], default="present"),
        )
    )
    hosts = module.params["zk_hosts"] or os.environ.get("PVC_IT_ZK_HOSTS")
    root = module.params["zk_root"]
    if not hosts:
        module.fail_json(msg="zk_hosts is needed (or PVC_IT_ZK_HOSTS)")
    if root == os.environ.get("PVC_IT_ZK_ROOT"):
        module.fail_json(msg=f"{root} is the integration cluster's own root; name another one")
    store = ClusterStore(
        ConnectionOptions(
            hosts=hosts,
            root=root,
            timeout_s=30,
            auth_username=module.params["zk_username"],
            auth_password=module.params["zk_password"],
            tls=module.params["zk_tls"],
            tls_ca=module.params["zk_tls_ca"],
        )
    )
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
