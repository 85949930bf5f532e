#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: pvc.cluster developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: zk_write
short_description: Write raw values into the integration cluster's ZooKeeper, past every module
description:
  - A test helper of the pvc.cluster integration targets, not part of the collection.
  - Writes O(values) as they are, in one transaction, to show what the modules do with values that
    someone wrote into ZooKeeper directly (garbage included).
options:
  zk_hosts:
    description: The ZooKeeper servers; default the environment variable E(PVC_IT_ZK_HOSTS).
    type: str
  zk_root:
    description: The cluster root; default the environment variable E(PVC_IT_ZK_ROOT).
    type: str
  zk_username:
    description: The user to connect as (digest authentication); the integration cluster's operator.
    type: str
  zk_password:
    description: That user's password.
    type: str
  zk_tls:
    description: Connect over TLS (the integration cluster's client port is a TLS port).
    type: bool
    default: false
  zk_tls_ca:
    description: PEM file of the CA that signed the ZooKeeper server's certificate.
    type: str
  values:
    description: Text to write, by path below the cluster root.
    type: dict
    default: {}
  delete:
    description: Paths below the cluster root to remove (with everything below them), in the same transaction.
    type: list
    elements: str
    default: []
author:
  - pvc.cluster developers (!UNKNOWN)
"""

EXAMPLES = r"""
- name: A migration record that is no JSON object
  zk_write:
    values:
      /domains/0c000000-0000-4000-8000-000000000001/migration: "42"
"""

RETURN = r"""
written:
  description: The paths written, below the root.
  returned: always
  type: list
  elements: str
deleted:
  description: The paths asked to be removed, below the root.
  returned: always
  type: list
  elements: str
"""

import os

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.pvc.cluster.plugins.module_utils._store import ClusterStore, ConnectionOptions, StoreError


def main():
    module = AnsibleModule(
        argument_spec=dict(
            zk_hosts=dict(type="str"),
            zk_root=dict(type="str"),
            zk_username=dict(type="str"),
            zk_password=dict(type="str", no_log=True),
            zk_tls=dict(type="bool", default=False),
            zk_tls_ca=dict(type="str"),
            values=dict(type="dict", default={}),
            delete=dict(type="list", elements="str", default=[]),
        ),
        required_together=[["zk_username", "zk_password"]],
    )
    hosts = module.params["zk_hosts"] or os.environ.get("PVC_IT_ZK_HOSTS")
    root = module.params["zk_root"] or os.environ.get("PVC_IT_ZK_ROOT")
    if not hosts or not root:
        module.fail_json(msg="zk_hosts and zk_root are needed (or PVC_IT_ZK_HOSTS and PVC_IT_ZK_ROOT)")
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
    values = {store.schema.root + path: str(value) for path, value in module.params["values"].items()}
    try:
        store.start()
        if module.params["zk_username"]:
            # learns the cluster's identities from its root, so that every znode written gets the
            # ACL its rule gives it (the daemons must read what is written here)
            store.verify_cluster()
        deletes = [
            store.schema.root + path for path in module.params["delete"] if store.exists(store.schema.root + path)
        ]
        store.commit(values, delete=deletes)
    except StoreError as exc:
        module.fail_json(msg=str(exc))
    finally:
        store.stop()
    module.exit_json(changed=True, written=sorted(module.params["values"]), deleted=sorted(module.params["delete"]))


if __name__ == "__main__":
    main()
