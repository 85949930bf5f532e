#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: pvc.cluster developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: cluster_credentials
short_description: Rotate the password of one of a pvc.cluster's ZooKeeper identities, as its operator
version_added: 0.1.0
description:
  - ZooKeeper keeps the SHA-1 digest of an identity's user and password in the ACL of every znode, so a new password
    is a new identity. This module rotates one identity's password on every znode of the cluster in two steps, with
    the node daemons running (C(docs/security.md), "Rotating credentials";
    C(playbooks/rotate_credentials.yml) runs the whole rotation).
  - O(state=added) gives the new password the permissions of the current one on every znode that names the current
    one; both then work while the clients (the node daemons, the modules, the inventory) move to the new one.
  - O(state=rotated) takes the current password off every znode (and puts the new one where only the current one
    was, on znodes created meanwhile), holding both identities. Afterwards ZooKeeper refuses the former password.
    It is refused unless the new password was added first.
  - The identity is the operator's (O(zk_username)), the nodes' (the user every daemon shares) or one node's own
    (its user is the node's name). The module runs as the operator, whatever identity it rotates.
  - No password, and no digest of one, is shown in the diff; O(password) and O(new_password) are C(no_log).
author:
  - pvc.cluster developers (!UNKNOWN)
options:
  username:
    description:
      - The user whose password changes - the operator (O(zk_username)), the nodes' user
        (C(node_daemon_zookeeper_username)) or a node's name (that node's own identity).
    type: str
    required: true
  password:
    description:
      - The user's current password, which O(state=rotated) takes off every znode.
    type: str
    required: true
  new_password:
    description:
      - The user's new password.
    type: str
    required: true
  state:
    description:
      - V(added) - the new password works beside the current one, on every znode the current one does.
      - V(rotated) - only the new password works; the current one is taken off every znode.
    type: str
    choices: [added, rotated]
    default: added
extends_documentation_fragment:
  - pvc.cluster._zk
  - pvc.cluster._attributes
  - pvc.cluster._attributes.actiongroup_all
attributes:
  check_mode:
    support: full
    details: In check mode the znodes that would change are counted, and none is changed.
  diff_mode:
    support: full
    details: The diff names which passwords (current, new) the identity's ACLs accept, never a password or its digest.
  idempotent:
    support: full
notes:
  - Between O(state=added) and O(state=rotated) of the operator's password, run no other module or inventory
    task - the node daemons may create znodes that name only the operator password they were configured with,
    which O(state=rotated) fixes.
  - Every znode of the cluster is read once per run - a cluster of 1,000 VMs has about 20,000.
seealso:
  - module: pvc.cluster.cluster_schema
"""

EXAMPLES = r"""
- name: Let the nodes' new password work beside the current one
  pvc.cluster.cluster_credentials:
    username: nodes
    password: "{{ vault_pvc_nodes_password }}"
    new_password: "{{ vault_pvc_nodes_new_password }}"
    state: added

# ... every node daemon moved to the new password (playbooks/rotate_credentials.yml) ...

- name: Take the nodes' former password off every znode
  pvc.cluster.cluster_credentials:
    username: nodes
    password: "{{ vault_pvc_nodes_password }}"
    new_password: "{{ vault_pvc_nodes_new_password }}"
    state: rotated
"""

RETURN = r"""
znodes_changed:
  description: How many znodes' ACLs changed (in check mode, would change).
  returned: always
  type: int
  sample: 412
paths:
  description: The first 100 of those znodes.
  returned: always
  type: list
  elements: str
  sample: [/pvc, /pvc/nodes]
passwords:
  description: Which passwords the identity's ACLs accept after the task (in check mode, would accept).
  returned: always
  type: list
  elements: str
  sample: [current, new]
new_digest_id:
  description:
    - The new password's digest id, C(username:base64(sha1(username:password))) - for the operator, what the node
      daemons' C(operator_digest) becomes (C(node_daemon_zookeeper_operator_digest)). Not the password, but keep it
      as private as a password hash.
  returned: always
  type: str
"""

from ansible_collections.pvc.cluster.plugins.module_utils._cluster import ROTATION_STATES, rotate_password
from ansible_collections.pvc.cluster.plugins.module_utils._module import (
    ModuleFailure,
    Session,
    build_module,
    check_before_connecting,
    exit_from_session,
)

ARGUMENT_SPEC = dict(
    username=dict(type="str", required=True),
    password=dict(type="str", required=True, no_log=True),
    new_password=dict(type="str", required=True, no_log=True),
    state=dict(type="str", choices=list(ROTATION_STATES), default="added"),
)

MAX_PATHS = 100


def check_input(params: dict) -> None:
    """Raise ModuleFailure for input no cluster could accept."""
    username = params.get("username") or ""
    if not username.strip() or ":" in username:
        raise ModuleFailure(f"username must be a ZooKeeper user name (not empty, no ':'), not {username!r}")
    if not params.get("password") or not params.get("new_password"):
        raise ModuleFailure("password and new_password must not be empty")
    if params["password"] == params["new_password"]:
        raise ModuleFailure("new_password is the current password: give a new one")


def run(module, session: Session) -> dict:
    params = module.params
    done = rotate_password(
        session.store,
        params["username"],
        params["password"],
        params["new_password"],
        params["state"],
        module.check_mode,
    )
    paths = done["paths"]
    if paths and not module.check_mode:
        session.wrote(f"the ACLs of {len(paths)} znodes")
    result = {
        "changed": bool(paths),
        "znodes_changed": len(paths),
        "paths": paths[:MAX_PATHS],
        "passwords": done["after"],
        "new_digest_id": done["new_digest_id"],
    }
    if module._diff:
        # which passwords work, never a password nor its digest
        result["diff"] = {
            "before": {"username": params["username"], "passwords": done["before"]},
            "after": {"username": params["username"], "passwords": done["after"]},
        }
    return result


def main():
    module = build_module(ARGUMENT_SPEC, needs_lxml=False)
    check_before_connecting(module, check_input)
    exit_from_session(module, run)


if __name__ == "__main__":
    main()
