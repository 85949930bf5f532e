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
  - The ZooKeeper options are the collection's (its modules' C(zk_*) options); the tasks give them all, the
    integration cluster's operator over TLS.
options:
  values:
    description: Text to write, by path below the cluster root.
    type: dict
    default: {}
  delete:
    description: Paths below the cluster root to remove (with everything below them), in the same transaction.
    type: list
    elements: str
    default: []
extends_documentation_fragment:
  - pvc.cluster._zk
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

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.pvc.cluster.plugins.module_utils._module import (
    ZK_REQUIRED_TOGETHER,
    argument_spec,
    connection_options,
)
from ansible_collections.pvc.cluster.plugins.module_utils._store import ClusterStore, StoreError


def main():
    module = AnsibleModule(
        argument_spec=argument_spec(
            dict(
                values=dict(type="dict", default={}),
                delete=dict(type="list", elements="str", default=[]),
            )
        ),
        required_together=ZK_REQUIRED_TOGETHER,
    )
    try:
        store = ClusterStore(connection_options(module.params))
    except ValueError as exc:
        module.fail_json(msg=str(exc))
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
