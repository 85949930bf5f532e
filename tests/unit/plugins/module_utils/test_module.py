# -*- coding: utf-8 -*-
# Copyright: pvc.cluster developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The module glue without a cluster: option merging, connection options, meta plans, diffs."""

from __future__ import annotations


import pytest
import yaml

from ansible_collections.pvc.cluster.plugins.doc_fragments._vm_meta import ModuleDocFragment as MetaFragment
from ansible_collections.pvc.cluster.plugins.doc_fragments._zk import ModuleDocFragment as ZKFragment
from ansible_collections.pvc.cluster.plugins.module_utils._meta import VMMeta
from ansible_collections.pvc.cluster.plugins.module_utils._module import (
    META_ARGUMENT_SPEC,
    ZK_ARGUMENT_SPEC,
    Differences,
    MetaPlan,
    ModuleFailure,
    argument_spec,
    connection_options,
    meta_updates,
)
from ansible_collections.pvc.cluster.tests.unit.plugins.zk_params import ZK_DEFAULTS, zk_params


def test_argument_spec_merges_the_zookeeper_options_without_changing_either():
    spec = argument_spec({"name": {"type": "str", "required": True}})
    assert set(spec) == set(ZK_ARGUMENT_SPEC) | {"name"}
    spec["zk_hosts"]["type"] = "changed"
    assert ZK_ARGUMENT_SPEC["zk_hosts"]["type"] == "str"


def test_argument_spec_refuses_a_clash():
    with pytest.raises(ValueError, match="zk_root"):
        argument_spec({"zk_root": {"type": "str"}})


@pytest.mark.parametrize(
    "fragment, spec",
    [
        (ZKFragment.DOCUMENTATION, ZK_ARGUMENT_SPEC),
        (ZKFragment.PLUGIN, ZK_ARGUMENT_SPEC),
        (MetaFragment.DOCUMENTATION, META_ARGUMENT_SPEC),
    ],
)
def test_the_doc_fragments_document_the_argument_specs(fragment, spec):
    documented = yaml.safe_load(fragment)["options"]
    assert set(documented) == set(spec)
    for name, option in documented.items():
        assert option["type"] == spec[name]["type"], name
        assert option.get("default") == spec[name].get("default"), name
        assert option.get("choices") == spec[name].get("choices"), name


def test_the_plugin_fragment_names_the_environment_variables_of_the_fallbacks():
    documented = yaml.safe_load(ZKFragment.PLUGIN)["options"]
    for name, option in documented.items():
        assert [entry["name"] for entry in option["env"]] == ZK_ARGUMENT_SPEC[name]["fallback"][1]


def test_the_tests_zookeeper_options_are_the_argument_specs_defaults():
    assert {name: spec.get("default") for name, spec in ZK_ARGUMENT_SPEC.items()} == ZK_DEFAULTS


def test_secrets_are_not_logged():
    assert ZK_ARGUMENT_SPEC["zk_password"]["no_log"] is True


BASE = zk_params(zk_hosts="zk1:2181,zk2:2181")


@pytest.mark.parametrize(
    "changes, message",
    [
        (
            {"zk_hosts": None},
            "no ZooKeeper servers given: set zk_hosts on the task, through module_defaults (group/pvc.cluster.all), "
            "or in the environment variable PVC_ZK_HOSTS",
        ),
        ({"zk_hosts": "  "}, "no ZooKeeper servers given"),
        ({"zk_hosts": "zk1:99999"}, "zk_hosts entry 'zk1:99999' has no valid port"),
        ({"zk_root": "pvc"}, "zk_root must be an absolute znode path like /pvc, not 'pvc'"),
        # an empty root is not the default /pvc: a template that renders empty must not reach another cluster
        ({"zk_root": ""}, "zk_root must be an absolute znode path like /pvc, not ''"),
        ({"zk_timeout": 0.0}, "zk_timeout must be a number of seconds from 0.1 to 3600, not 0.0"),
        ({"zk_timeout": 1e10}, "zk_timeout must be a number of seconds from 0.1 to 3600, not 10000000000.0"),
        ({"zk_timeout": float("inf")}, "zk_timeout must be a number of seconds from 0.1 to 3600, not inf"),
        ({"zk_root": "/pvc/../x"}, "zk_root '/pvc/../x' has a '.' or '..' component, which ZooKeeper refuses"),
        ({"zk_root": "/pvc/"}, "zk_root '/pvc/' has an empty path component"),
        ({"zk_root": "/pv\x00c"}, "contains the character U+0000, which ZooKeeper refuses in a path"),
        ({"zk_root": "/" + "p" * 1024}, "zk_root must be at most 1024 characters long, not 1025"),
        ({"zk_username": "admin"}, "zk_username is set but zk_password is not"),
        ({"zk_username": "a:b", "zk_password": "x"}, "zk_username must not contain ':'"),
        ({"zk_tls_ca": "/etc/ca.pem"}, "zk_tls_ca is set but zk_tls is false"),
        ({"zk_tls_cert": "/c", "zk_tls_key": "/k"}, "zk_tls_cert, zk_tls_key are set but zk_tls is false"),
        (
            {"zk_tls": True, "zk_tls_ca": "/nonexistent/hosts/ca.pem"},
            "zk_tls_ca file /nonexistent/hosts/ca.pem does not exist",
        ),
    ],
)
def test_bad_connection_options_name_the_module_options(changes, message):
    with pytest.raises(ValueError) as failure:
        connection_options(dict(BASE, **changes))
    assert message in str(failure.value)


def test_connection_options_map_every_option(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    options = connection_options(
        dict(
            BASE,
            zk_root="/other",
            zk_timeout=2.5,
            zk_username="u",
            zk_password="s3cret",
            zk_tls=True,
            zk_tls_ca=str(ca),
            zk_tls_verify=False,
        )
    )
    assert (options.hosts, options.root, options.timeout_s) == ("zk1:2181,zk2:2181", "/other", 2.5)
    assert (options.auth_username, options.auth_password) == ("u", "s3cret")
    assert (options.tls, options.tls_ca, options.tls_verify) == (True, str(ca), False)
    assert "s3cret" not in repr(options)


@pytest.mark.parametrize(
    "params, expected",
    [
        ({}, {}),
        ({"migration_method": "live"}, {"migration_method": "live"}),
        ({"node_limit": ["n1", "n2", "n1"]}, {"node_limit": '["n1", "n2"]'}),
        ({"node_limit": []}, {"node_limit": "[]"}),
        ({"node_autostart": False}, {"node_autostart": "false"}),
        (
            {"migration_max_downtime_ms": 500, "node_selector": "default"},
            {"migration_max_downtime_ms": "500", "node_selector": "default"},
        ),
    ],
)
def test_meta_updates_leave_omitted_options_out(params, expected):
    assert meta_updates(params, node_names=["n1", "n2"]) == expected


@pytest.mark.parametrize(
    "params, message",
    [
        (
            {"migration_max_downtime_ms": 0},
            "invalid value 0 for migration_max_downtime_ms: accepted values are an integer "
            "number of milliseconds from 1 to 2000000 (QEMU's limit, 2000 s)",
        ),
        ({"migration_max_downtime_ms": 3000000}, "invalid value 3000000 for migration_max_downtime_ms"),
        ({"migration_max_downtime_ms": 10**30}, f"invalid value {10**30} for migration_max_downtime_ms"),
        (
            {"node_limit": [""]},
            "invalid value [''] for node_limit: accepted values are a list of node names, none of them "
            "empty ([] for any node)",
        ),
        ({"node_limit": ["n 1"]}, "invalid value ['n 1'] for node_limit"),
        ({"node_limit": ["n1", "n9"]}, "node_limit names n9, which is not a node of this cluster (nodes: n1, n2)"),
        ({"node_limit": ["n8", "n9"]}, "node_limit names n8, n9, which are not a node of this cluster"),
    ],
)
def test_meta_updates_refuse_bad_values(params, message):
    with pytest.raises(ModuleFailure) as failure:
        meta_updates(params, node_names=["n1", "n2"])
    assert message in failure.value.msg


DEFAULT_META = {
    "migration_method": "default",
    "node_selector": "default",
    "node_limit": [],
    "node_autostart": False,
    "migration_max_downtime_ms": 300,
    "migration_auto_converge": False,
}


@pytest.mark.parametrize(
    "stored, updates, writes, changed_keys",
    [
        # nothing given: nothing to do
        ({}, {}, {}, []),
        # a value equal to the (implicit) default is no change
        ({}, {"migration_method": "default"}, {}, []),
        # legacy spellings mean the same value
        (
            {"migration_method": "none", "node_selector": "memprov"},
            {"migration_method": "default", "node_selector": "mem"},
            {},
            [],
        ),
        ({"node_limit": "n1,n2"}, {"node_limit": '["n1", "n2"]'}, {}, []),
        # a real change, and a key left out stays as it is
        ({"node_limit": '["n1"]'}, {"migration_method": "live"}, {"migration_method": "live"}, ["migration_method"]),
        ({"node_limit": '["n1"]'}, {"node_limit": "[]"}, {"node_limit": "[]"}, ["node_limit"]),
        # an unreadable stored value is replaced even by the value it reads as
        (
            {"migration_max_downtime_ms": "soon"},
            {"migration_max_downtime_ms": "300"},
            {"migration_max_downtime_ms": "300"},
            ["migration_max_downtime_ms"],
        ),
    ],
)
def test_meta_plan(stored, updates, writes, changed_keys):
    plan = MetaPlan(VMMeta.from_store(stored), updates)
    assert plan.writes == writes
    assert plan.differences.changed_keys == changed_keys
    assert plan.differences.changed == bool(changed_keys)
    assert set(plan.differences.before()) == set(updates)


def test_meta_plan_before_and_after_are_whole():
    plan = MetaPlan(VMMeta.from_store({}), {"node_autostart": "true"})
    assert plan.before == DEFAULT_META
    assert plan.after == dict(DEFAULT_META, node_autostart=True)
    assert plan.differences.diff() == {"before": {"node_autostart": False}, "after": {"node_autostart": True}}


def test_differences_changed_comes_from_the_diff_entries():
    differences = Differences()
    differences.add("state", "stop", "stop")
    assert not differences.changed
    assert differences.diff() == {"before": {"state": "stop"}, "after": {"state": "stop"}}
    differences.add("node", "n1", "n2")
    assert differences.changed
    assert differences.changed_keys == ["node"]
