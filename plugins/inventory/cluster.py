# -*- coding: utf-8 -*-
# Copyright: pvc.cluster developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
name: cluster
short_description: The nodes and VMs of a pvc.cluster as inventory hosts
version_added: 0.1.0
description:
  - Reads the cluster from its ZooKeeper and makes every node and every VM a host.
  - Groups C(pvc_nodes) and C(pvc_vms); C(node_<node>) with the VMs assigned to that node;
    C(vm_state_<state>) by the VM's state (the desired state, or what a daemon moved it to since);
    C(node_domain_<state>) and C(node_daemon_<state>) by the node's domain and daemon state. Names that are not valid group names are made safe.
  - Node and VM figures (states, memory accounting, meta, placement) become host variables prefixed
    C(pvc_); use O(compose), O(groups) and O(keyed_groups) for more.
  - A VM with the same name as a node is left out, with a warning.
  - The configuration file name must end with C(pvc.yml) or C(pvc.yaml). Options the plugin does not know
    are named in a warning (Ansible would ignore them silently).
author:
  - pvc.cluster developers (!UNKNOWN)
options:
  plugin:
    description: The name of this plugin; must be V(pvc.cluster.cluster).
    type: str
    required: true
    choices: [pvc.cluster.cluster]
extends_documentation_fragment:
  - constructed
  - pvc.cluster._zk.plugin
"""

EXAMPLES = r"""
# inventory/cluster.pvc.yml
plugin: pvc.cluster.cluster
zk_hosts: zk1.example.net:2181,zk2.example.net:2181,zk3.example.net:2181
# Reach the nodes by name through SSH, and group the VMs by the node they belong to
compose:
  ansible_host: inventory_hostname if pvc_type == 'node' else omit
keyed_groups:
  - key: pvc_meta.migration_method
    prefix: migrate
    parent_group: pvc_vms
groups:
  tight_nodes: pvc_type == 'node' and pvc_memory.headroom < 4096

# Then, for example:
#   ansible-inventory -i inventory/cluster.pvc.yml --graph
#   ansible node_domain_ready -i inventory/cluster.pvc.yml --list-hosts
"""

import logging

from ansible.errors import AnsibleParserError
from ansible.plugins.inventory import BaseInventoryPlugin, Constructable

from ansible_collections.pvc.cluster.plugins.module_utils._module import option_names
from ansible_collections.pvc.cluster.plugins.module_utils._report import node_report, read_cluster, vm_report
from ansible_collections.pvc.cluster.plugins.module_utils._store import (
    ClusterStore,
    ConnectionOptions,
    StoreError,
    quiet_client_logging,
)

# vm_report keys that become host variables (pvc_<key>); the XML and statistics are left out
VM_VARS = (
    "uuid",
    "state",
    "desired_state",
    "autostart",
    "node",
    "lastnode",
    "home",
    "running_on",
    "failedreason",
    "memory_mib",
    "vcpus",
    "meta",
    "meta_warnings",
    "migration",
)
NODE_VARS = (
    "daemon_state",
    "domain_state",
    "alive",
    "keepalive",
    "keepalive_age_s",
    "memory",
    "vcpualloc",
    "cputotal",
    "cpuload",
    "domaincount",
    "running_vms",
    "assigned_vms",
    "returning_vms",
    "libvirt_uri",
    "transport_uri",
)


class InventoryModule(BaseInventoryPlugin, Constructable):
    NAME = "pvc.cluster.cluster"

    def verify_file(self, path):
        return super().verify_file(path) and path.endswith(("pvc.yml", "pvc.yaml"))

    def _connection_options(self) -> ConnectionOptions:
        def opt(name):
            value = self.get_option(name)
            return value if value not in ("", None) else None

        hosts = opt("zk_hosts")
        if not hosts:
            raise AnsibleParserError(
                "pvc.cluster.cluster: no ZooKeeper servers given: set zk_hosts in the inventory file "
                "or the environment variable PVC_ZK_HOSTS"
            )
        tls_files = [name for name in ("zk_tls_ca", "zk_tls_cert", "zk_tls_key") if opt(name)]
        if tls_files and not self.get_option("zk_tls"):
            raise AnsibleParserError(
                f"pvc.cluster.cluster: {', '.join(tls_files)} set but zk_tls is false: "
                "set zk_tls to true to connect with TLS"
            )
        # an empty zk_root is refused by the store's path rules: it never means the default silently
        root = self.get_option("zk_root")
        options = ConnectionOptions(
            hosts=str(hosts),
            root="/pvc" if root is None else root,
            timeout_s=float(self.get_option("zk_timeout")),
            auth_username=opt("zk_username"),
            auth_password=opt("zk_password"),
            tls=bool(self.get_option("zk_tls")),
            tls_ca=opt("zk_tls_ca"),
            tls_cert=opt("zk_tls_cert"),
            tls_key=opt("zk_tls_key"),
            tls_verify=bool(self.get_option("zk_tls_verify")),
        )
        try:
            options.validate()
        except ValueError as exc:
            raise AnsibleParserError(f"pvc.cluster.cluster: {option_names(str(exc))}") from None
        return options

    def _read(self, options: ConnectionOptions):
        log = logging.getLogger("ansible_collections.pvc.cluster.inventory")
        log.propagate = False
        if not log.handlers:  # the store's failures reach the parser error as StoreError, not stderr
            log.addHandler(logging.NullHandler())
        quiet_client_logging()
        try:
            store = ClusterStore(options, logger=log)
            try:
                store.start()
                store.verify_cluster()  # a pvc.cluster at zk_root, and credentials that fit it
                # a read that fails raises: no inventory is made from what could not be read
                snapshot = read_cluster(store)
            finally:
                store.stop()
        except StoreError as exc:
            raise AnsibleParserError(f"pvc.cluster.cluster: {exc}") from None
        return snapshot

    def _group(self, name: str) -> str:
        return self.inventory.add_group(self._sanitize_group_name(name))

    def _add(self, host: str, group: str, variables: dict) -> None:
        self.inventory.add_host(host, group=group)
        for key, value in variables.items():
            self.inventory.set_variable(host, key, value)
        strict = self.get_option("strict")
        self._set_composite_vars(self.get_option("compose"), variables, host, strict=strict)
        self._add_host_to_composed_groups(self.get_option("groups"), variables, host, strict=strict)
        self._add_host_to_keyed_groups(self.get_option("keyed_groups"), variables, host, strict=strict)

    def parse(self, inventory, loader, path, cache=True):
        super().parse(inventory, loader, path, cache)
        config = self._read_config_data(path)
        unknown = sorted(str(key) for key in config if key not in self._options)
        if unknown:
            # Ansible ignores them without a word: a misspelt option would silently take its default
            self.display.warning(
                f"pvc.cluster.cluster: {path}: unknown option{'s' if len(unknown) > 1 else ''} "
                f"{', '.join(unknown)} ignored (options: {', '.join(sorted(self._options))})"
            )
        self._populate(self._read(self._connection_options()))

    def _populate(self, snapshot) -> None:
        """Hosts, groups and variables from a cluster snapshot (``_report.read_cluster``)."""
        nodes_group = self._group("pvc_nodes")
        vms_group = self._group("pvc_vms")
        for name in sorted(snapshot.nodes):
            report = node_report(snapshot, name)
            variables = {"pvc_type": "node", "pvc_name": name}
            variables.update({f"pvc_{key}": report[key] for key in NODE_VARS})
            self._add(name, nodes_group, variables)
            self.inventory.add_child(self._group(f"node_domain_{report['domain_state']}"), name)
            self.inventory.add_child(self._group(f"node_daemon_{report['daemon_state']}"), name)
        for uuid in sorted(snapshot.vms, key=lambda u: (snapshot.vms[u].name, u)):
            report = vm_report(snapshot, uuid)
            name = report["name"]
            if name in snapshot.nodes:
                self.display.warning(f"pvc.cluster.cluster: VM {name} ({uuid}) has the name of a node; it is left out")
                continue
            variables = {"pvc_type": "vm", "pvc_name": name}
            variables.update({f"pvc_{key}": report[key] for key in VM_VARS})
            self._add(name, vms_group, variables)
            if report["node"]:
                self.inventory.add_child(self._group(f"node_{report['node']}"), name)
            if report["state"]:
                self.inventory.add_child(self._group(f"vm_state_{report['state']}"), name)
