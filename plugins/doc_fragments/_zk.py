# -*- coding: utf-8 -*-
# Copyright: pvc.cluster developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
#
# PRIVATE: this doc fragment is internal to the pvc.cluster collection.
# It may change without notice; do not use it from other collections.
"""How every pvc.cluster plugin reaches ZooKeeper.

``DOCUMENTATION`` is for the modules (argument spec: ``plugins/module_utils/_module.py``,
``ZK_ARGUMENT_SPEC``); ``PLUGIN`` documents the same options for the inventory plugin, which reads
them from its configuration file or the same environment variables.
"""

from __future__ import annotations


class ModuleDocFragment:
    DOCUMENTATION = r"""
options:
  zk_hosts:
    description:
      - The ZooKeeper servers of the cluster, as C(host:port) entries separated by commas (ports from 1 to 65535).
      - Required. If not set on the task, the environment variable E(PVC_ZK_HOSTS) of the managed node
        is used.
      - Set it once for a whole play with C(module_defaults) and the action group C(group/pvc.cluster.all).
    type: str
  zk_root:
    description:
      - The znode below which the cluster keeps its state.
      - It must hold a pvc.cluster (its C(schema/version), created by the node daemons); the task fails
        before reading or writing anything otherwise, so that a mistyped root is not read as an empty cluster.
      - An absolute path without C(.) or C(..) components, at most 1024 characters.
      - If not set, the environment variable E(PVC_ZK_ROOT), else V(/pvc).
    type: str
    default: /pvc
  zk_timeout:
    description:
      - Seconds to wait for the connection to ZooKeeper, and then for each answer.
      - From V(0.1) to V(3600). An unreachable ZooKeeper makes the task fail after this long.
      - If not set, the environment variable E(PVC_ZK_TIMEOUT), else V(10).
    type: float
    default: 10
  zk_username:
    description:
      - User name for ZooKeeper digest authentication. Needs O(zk_password).
      - Checked against the cluster before use, as the ACL of O(zk_root) says how it is secured. A cluster
        open to anyone refuses credentials (keys created with them would be readable by that user only);
        a cluster that uses authentication needs them.
      - If not set, the environment variable E(PVC_ZK_USERNAME).
    type: str
  zk_password:
    description:
      - Password for ZooKeeper digest authentication. Needs O(zk_username).
      - If not set, the environment variable E(PVC_ZK_PASSWORD).
    type: str
  zk_tls:
    description:
      - Connect to ZooKeeper's TLS client port.
      - If not set, the environment variable E(PVC_ZK_TLS), else V(false).
    type: bool
    default: false
  zk_tls_ca:
    description:
      - PEM file of the certificate authority that signed the ZooKeeper server certificates. Needs O(zk_tls=true).
      - If not set, the environment variable E(PVC_ZK_TLS_CA).
    type: path
  zk_tls_cert:
    description:
      - PEM client certificate, for servers that require client authentication. Needs O(zk_tls_key).
      - If not set, the environment variable E(PVC_ZK_TLS_CERT).
    type: path
  zk_tls_key:
    description:
      - PEM private key of O(zk_tls_cert).
      - If not set, the environment variable E(PVC_ZK_TLS_KEY).
    type: path
  zk_tls_verify:
    description:
      - Verify the server certificate against O(zk_tls_ca).
      - If not set, the environment variable E(PVC_ZK_TLS_VERIFY), else V(true).
    type: bool
    default: true
notes:
  - The modules run on the managed node (often C(localhost)), which needs the Python libraries C(kazoo)
    and C(lxml) and network access to ZooKeeper.
requirements:
  - kazoo >= 2.9
  - lxml
"""

    PLUGIN = r"""
options:
  zk_hosts:
    description:
      - The ZooKeeper servers of the cluster, as C(host:port) entries separated by commas (ports from 1 to 65535).
    type: str
    required: true
    env:
      - name: PVC_ZK_HOSTS
  zk_root:
    description:
      - The znode below which the cluster keeps its state; it must hold a pvc.cluster (its C(schema/version)),
        or parsing fails.
      - An absolute path without C(.) or C(..) components, at most 1024 characters.
    type: str
    default: /pvc
    env:
      - name: PVC_ZK_ROOT
  zk_timeout:
    description: Seconds to wait for the connection to ZooKeeper, and then for each answer; from V(0.1) to V(3600).
    type: float
    default: 10
    env:
      - name: PVC_ZK_TIMEOUT
  zk_username:
    description:
      - User name for ZooKeeper digest authentication. Needs O(zk_password).
      - Refused by a cluster open to anyone; needed by a cluster that uses authentication (the ACL of O(zk_root) says which).
    type: str
    env:
      - name: PVC_ZK_USERNAME
  zk_password:
    description: Password for ZooKeeper digest authentication. Needs O(zk_username).
    type: str
    env:
      - name: PVC_ZK_PASSWORD
  zk_tls:
    description: Connect to ZooKeeper's TLS client port.
    type: bool
    default: false
    env:
      - name: PVC_ZK_TLS
  zk_tls_ca:
    description: PEM file of the certificate authority that signed the ZooKeeper server certificates.
    type: path
    env:
      - name: PVC_ZK_TLS_CA
  zk_tls_cert:
    description: PEM client certificate. Needs O(zk_tls_key).
    type: path
    env:
      - name: PVC_ZK_TLS_CERT
  zk_tls_key:
    description: PEM private key of O(zk_tls_cert).
    type: path
    env:
      - name: PVC_ZK_TLS_KEY
  zk_tls_verify:
    description: Verify the server certificate against O(zk_tls_ca).
    type: bool
    default: true
    env:
      - name: PVC_ZK_TLS_VERIFY
requirements:
  - kazoo >= 2.9 (on the controller)
  - lxml (on the controller)
"""
