#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: pvc.cluster developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: cluster_schema
short_description: Create a pvc.cluster's root and schema in ZooKeeper, secured, as its operator
version_added: 0.1.0
description:
  - Creates the cluster's root znode, its base znodes and C(schema/version), each with the ACL of its rule
    (C(docs/security.md)) - the operator (O(zk_username)) may do everything, the nodes' identity
    (O(nodes_username)) what the daemons need. The node daemons cannot create a secured cluster themselves
    (their identity may not create the base znodes), so a rollout runs this before it starts them.
  - On an existing cluster it checks that the credentials fit how the cluster is secured, creates the base
    znodes that are missing, and secures those left open to anyone (a cluster pre-created by someone else);
    base znodes secured for other identities are refused with the ACL found and the one expected.
  - An open cluster (no credentials, anyone may read and write it) is created only with O(insecure=true).
author:
  - pvc.cluster developers (!UNKNOWN)
options:
  nodes_username:
    description:
      - The user every node daemon shares (the node_daemon role's C(node_daemon_zookeeper_username)).
      - Required with O(zk_username), unless O(insecure) is true.
    type: str
  nodes_password:
    description:
      - Its password (C(node_daemon_zookeeper_password)); only its digest id is written into the ACLs.
    type: str
  insecure:
    description:
      - Create an open cluster when no O(zk_username) is given. Anyone who reaches ZooKeeper can then define a
        VM on every node; for test beds only.
    type: bool
    default: false
extends_documentation_fragment:
  - pvc.cluster._zk
  - pvc.cluster._attributes
  - pvc.cluster._attributes.actiongroup_all
attributes:
  check_mode:
    support: full
    details: In check mode an existing cluster's credentials are checked, and nothing is created or repaired.
  diff_mode:
    support: full
  idempotent:
    support: full
seealso:
  - module: pvc.cluster.node_info
"""

EXAMPLES = r"""
- name: Create the cluster before the node daemons start
  pvc.cluster.cluster_schema:
    zk_hosts: zk1.example.net:2281,zk2.example.net:2281,zk3.example.net:2281
    zk_tls: true
    zk_tls_ca: /srv/pvc/ca/ca.pem
    zk_username: operator
    zk_password: "{{ vault_operator_password }}"
    nodes_username: nodes
    nodes_password: "{{ vault_nodes_password }}"
"""

RETURN = r"""
root:
  description: The cluster's root znode.
  returned: always
  type: str
  sample: /pvc
schema_version:
  description: The cluster's schema version (in check mode, as it would be).
  returned: always
  type: str
  sample: "2"
created:
  description: Whether the cluster's schema did not exist before the task (in check mode, whether it would be created).
  returned: always
  type: bool
secured:
  description: Whether the cluster uses authentication (false - an open cluster, O(insecure)).
  returned: always
  type: bool
"""

import dataclasses

from ansible_collections.pvc.cluster.plugins.module_utils._module import (
    ModuleFailure,
    build_module,
    connection_options,
)
from ansible_collections.pvc.cluster.plugins.module_utils._schema import SCHEMA_VERSION
from ansible_collections.pvc.cluster.plugins.module_utils._store import (
    ClusterStore,
    MissingError,
    StoreError,
    digest_id,
)

ARGUMENT_SPEC = dict(
    nodes_username=dict(type="str"),
    nodes_password=dict(type="str", no_log=True),
    insecure=dict(type="bool", default=False),
)


def check_input(params: dict) -> None:
    """Credentials that fit a secured cluster, or an explicit open one. Raises ModuleFailure."""
    if params.get("zk_username"):
        if not params.get("nodes_username") or not params.get("nodes_password"):
            raise ModuleFailure(
                "nodes_username and nodes_password are required with zk_username: the cluster's ACLs "
                "let the node daemons' identity read and write what they need (docs/security.md)"
            )
        if params["nodes_username"] == params["zk_username"]:
            raise ModuleFailure(
                f"nodes_username must be another user than zk_username ({params['zk_username']}): "
                "the nodes must not be the operator"
            )
    elif not params.get("insecure"):
        raise ModuleFailure(
            "no zk_username and zk_password: the cluster would be open to anyone who reaches ZooKeeper; "
            "give the operator's credentials and nodes_username/nodes_password, or insecure: true for "
            "an open test cluster"
        )
    elif params.get("nodes_username") or params.get("nodes_password"):
        raise ModuleFailure(
            "nodes_username and nodes_password are for a secured cluster: give zk_username and "
            "zk_password too, or leave them out for an open cluster (insecure: true)"
        )


def run(module, store: ClusterStore) -> dict:
    schema = store.schema
    try:
        stored = store.get(schema.schema_version())[0]
    except MissingError:
        stored = None
    if stored is not None:
        store.verify_cluster()  # the credentials fit how the existing cluster is secured
    created = stored is None
    changed = created
    if not module.check_mode:
        changed = store.ensure_schema()
    result = {
        "changed": changed,
        "root": schema.root or "/",
        "schema_version": stored or SCHEMA_VERSION,
        "created": created,
        "secured": bool(module.params.get("zk_username")),
    }
    if module._diff:
        result["diff"] = {"before": {"schema_version": stored}, "after": {"schema_version": stored or SCHEMA_VERSION}}
    return result


def main():
    module = build_module(ARGUMENT_SPEC, needs_lxml=False, required_together=[("nodes_username", "nodes_password")])
    params = module.params
    try:
        check_input(params)
        options = connection_options(params)
    except ModuleFailure as exc:
        module.fail_json(msg=exc.msg)
    except ValueError as exc:
        module.fail_json(msg=str(exc))
    if params.get("zk_username"):
        options = dataclasses.replace(
            options, nodes_digest=digest_id(params["nodes_username"], params["nodes_password"])
        )
    try:
        store = ClusterStore(options)
    except StoreError as exc:
        module.fail_json(msg=str(exc))
    try:
        store.start()
        result = run(module, store)
    except StoreError as exc:
        module.fail_json(msg=str(exc))
    finally:
        store.stop()
    module.exit_json(**result)


if __name__ == "__main__":
    main()
