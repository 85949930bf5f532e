# -*- coding: utf-8 -*-
# Copyright: pvc.cluster developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The pvc.cluster.cluster inventory plugin on a cluster snapshot built by hand (no ZooKeeper)."""

from __future__ import annotations

import json

import pytest

from ansible.errors import AnsibleParserError
from ansible.inventory.data import InventoryData
from ansible.parsing.dataloader import DataLoader
from ansible.template import Templar

try:
    from ansible.template import trust_as_template
except ImportError:  # ansible-core before 2.19 has no data tagging: any string may be a template

    def trust_as_template(value):
        return value


from ansible_collections.pvc.cluster.plugins.module_utils._cluster import VMRecord
from ansible_collections.pvc.cluster.plugins.module_utils._meta import VMMeta
from ansible_collections.pvc.cluster.plugins.inventory.cluster import InventoryModule
from ansible_collections.pvc.cluster.plugins.module_utils._report import ClusterSnapshot
from ansible_collections.pvc.cluster.tests.unit.plugins.zk_params import zk_params


def vm(name, uuid, node, state="start", lastnode="", meta=None):
    return VMRecord(
        uuid=uuid,
        name=name,
        state=state,
        node=node,
        lastnode=lastnode,
        xml="",
        meta=VMMeta.from_store(meta or {}),
        memory_mib=1024,
        vcpus=2,
    )


def raw_node(domain_state="ready", running=()):
    return {
        "daemon_state": "run",
        "domain_state": domain_state,
        "memtotal": "8192",
        "memprov": "2048",
        "memalloc": "1024",
        "memfree": "6000",
        "memused": "2192",
        "memreserve": "512",
        "runningdomains": json.dumps(list(running)),
    }


# stored UUIDs are decoded: they must be UUIDs
U1, U2, U3 = (f"6695eb01-f6a4-8304-79aa-97f2502e193{digit}" for digit in "123")


def snapshot():
    result = ClusterSnapshot()
    result.nodes = {"hv-1": raw_node(running=[U1]), "hv-2": raw_node("flushed")}
    result.reservations = {"hv-1": {}, "hv-2": {U2: 1024}}
    result.alive = {"hv-1": True, "hv-2": True}
    result.vms = {
        U1: vm("web1", U1, "hv-1", meta={"migration_method": "live"}),
        U2: vm("db1", U2, "hv-1", state="stop", lastnode="hv-2"),
        U3: vm("hv-2", U3, "hv-1"),
    }
    return result


OPTIONS = {
    "plugin": "pvc.cluster.cluster",
    **zk_params(zk_hosts="zk1:2181"),
    "strict": False,
    "compose": {},
    "use_extra_vars": False,
    "leading_separator": True,
    # expressions from an inventory file are trusted templates; these are too
    "keyed_groups": [
        {"key": trust_as_template("pvc_meta.migration_method | default('none')"), "prefix": "method", "separator": "_"}
    ],
    "groups": {"home_elsewhere": trust_as_template("pvc_type == 'vm' and pvc_lastnode != ''")},
}


def make_plugin(strict=True, **options):
    plugin = InventoryModule()
    plugin.inventory = InventoryData()
    plugin.templar = Templar(loader=DataLoader())
    plugin._options = dict(OPTIONS, strict=strict, **options)
    return plugin


def populated(**options):
    plugin = make_plugin(**options)
    plugin._populate(snapshot())
    return plugin.inventory


def test_verify_file(tmp_path):
    plugin = make_plugin()
    for name, accepted in (("cluster.pvc.yml", True), ("pvc.yaml", True), ("cluster.yml", False)):
        (tmp_path / name).write_text("plugin: pvc.cluster.cluster\n")
        assert plugin.verify_file(str(tmp_path / name)) is accepted


def test_nodes_and_vms_become_grouped_hosts():
    inventory = populated()
    groups = {name: sorted(host.name for host in group.hosts) for name, group in inventory.groups.items()}
    assert groups["pvc_nodes"] == ["hv-1", "hv-2"]
    assert groups["pvc_vms"] == ["db1", "web1"]  # the VM named like a node is left out
    assert groups["node_hv_1"] == ["db1", "web1"]  # group names made safe
    assert groups["vm_state_start"] == ["web1"]
    assert groups["vm_state_stop"] == ["db1"]
    assert groups["node_domain_ready"] == ["hv-1"]
    assert groups["node_domain_flushed"] == ["hv-2"]
    assert groups["node_daemon_run"] == ["hv-1", "hv-2"]
    assert groups["method_live"] == ["web1"]
    assert groups["home_elsewhere"] == ["db1"]


def test_figures_become_host_variables():
    inventory = populated(
        compose={"pvc_free_gib": trust_as_template("pvc_memory.headroom // 1024 if pvc_type == 'node' else none")}
    )
    web1 = inventory.get_host("web1").vars
    assert web1["pvc_type"] == "vm"
    assert web1["pvc_node"] == "hv-1"
    assert web1["pvc_running_on"] == ["hv-1"]
    assert web1["pvc_meta"]["migration_method"] == "live"
    assert "pvc_xml" not in web1
    hv2 = inventory.get_host("hv-2").vars
    assert hv2["pvc_memory"] == {
        "total": 8192,
        "used": 2192,
        "free": 6000,
        "allocated": 1024,
        "provisioned": 2048,
        "reserve": 512,
        "reserved": 1024,
        "reservations": {"db1": 1024},
        "headroom": 4608,
    }
    assert hv2["pvc_returning_vms"] == ["db1"]
    # ansible-core 2.19 keeps a composed value's type; earlier versions render it to text
    assert str(hv2["pvc_free_gib"]) == "4"
    assert web1["pvc_free_gib"] in (None, "")


@pytest.mark.parametrize(
    "options, message",
    [
        (
            {"zk_hosts": None},
            "no ZooKeeper servers given: set zk_hosts in the inventory file or the environment variable PVC_ZK_HOSTS",
        ),
        ({"zk_tls_ca": "/etc/ca.pem"}, "zk_tls_ca set but zk_tls is false"),
        ({"zk_timeout": -1.0}, "zk_timeout must be a number of seconds from 0.1 to 3600, not -1.0"),
        ({"zk_username": "admin"}, "zk_username is set but zk_password is not"),
        ({"zk_timeout": 1e10}, "zk_timeout must be a number of seconds from 0.1 to 3600, not 10000000000.0"),
        ({"zk_root": "/pvc/../x"}, "zk_root '/pvc/../x' has a '.' or '..' component, which ZooKeeper refuses"),
        ({"zk_root": ""}, "zk_root must be an absolute znode path like /pvc, not ''"),
    ],
)
def test_bad_options_are_parser_errors(options, message):
    with pytest.raises(AnsibleParserError) as failure:
        make_plugin(**options)._connection_options()
    assert str(failure.value).startswith("pvc.cluster.cluster: ")
    assert message in str(failure.value)


def test_good_options():
    options = make_plugin(zk_root="/other", zk_timeout=3.0)._connection_options()
    assert (options.hosts, options.root, options.timeout_s, options.tls) == ("zk1:2181", "/other", 3.0, False)
