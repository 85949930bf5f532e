# -*- coding: utf-8 -*-
# Copyright: pvc.cluster developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""pvc.cluster.vm: input validation, XML normalisation and the create/update plans (no ZooKeeper)."""

from __future__ import annotations

import pytest

from ansible_collections.pvc.cluster.plugins.module_utils._module import ModuleFailure
from ansible_collections.pvc.cluster.plugins.module_utils._schema import Schema
from ansible_collections.pvc.cluster.plugins.modules import vm as module

from ansible_collections.pvc.cluster.tests.unit.plugins.modules.cluster_builders import domain_xml, make_vm

UUID = "6695eb01-f6a4-8304-79aa-97f2502e193f"


def params(**values):
    base = {"name": None, "xml": None, "state": "present", "node": None, "wait": True, "wait_timeout": 120,
            "migration_method": None, "node_selector": None, "node_limit": None, "node_autostart": None,
            "migration_max_downtime_ms": None}
    base.update(values)
    return base


# ---- input ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("values, message", [
    ({}, "give the VM's name (or UUID) in name, or its domain XML in xml"),
    ({"name": "  "}, "name must not be empty"),
    ({"name": "web1", "wait_timeout": 0}, "wait_timeout must be a positive number of seconds, not 0"),
    ({"xml": "<domain type='test'><name>web1</name>"}, "xml is not a domain XML pvc.cluster accepts: domain XML is not well-formed"),
    ({"xml": "<domain><name>web1</name></domain>"}, "xml is not a domain XML pvc.cluster accepts: <domain> has no type attribute"),
    ({"xml": "<domain type='test'><name>web1</name><memory>1</memory></domain>"}, "<uuid> is missing"),
    ({"name": "web2", "xml": domain_xml("web1")}, "name 'web2' does not match the XML, whose <name> is 'web1'"),
])
def test_bad_input_is_refused_before_connecting(values, message):
    with pytest.raises(ModuleFailure) as failure:
        module.parse_input(params(**values))
    assert message in failure.value.msg


@pytest.mark.parametrize("values", [{"name": "web1"}, {"xml": domain_xml()}, {"name": "web1", "xml": domain_xml()},
                                    {"name": UUID, "xml": domain_xml()}])
def test_good_input(values):
    info = module.parse_input(params(**values))
    assert info is None if "xml" not in values else (info.name, info.uuid) == ("web1", UUID)


@pytest.mark.parametrize("other, same", [
    ("<domain type=\"test\"><name>web1</name><uuid>u</uuid></domain>", True),
    ("<domain type='test'>\n  <!-- comment -->\n  <name>web1</name>\n  <uuid>u</uuid>\n</domain>\n", True),
    ("<?xml version='1.0'?><domain type='test'><name>web1</name><uuid>u</uuid></domain>", True),
    ("<domain id='3' type='test'><name>web1</name><uuid>u</uuid></domain>", False),
    ("<domain type='test'><name>web2</name><uuid>u</uuid></domain>", False),
    ("<domain type='test'><uuid>u</uuid><name>web1</name></domain>", False),
])
def test_normalised_xml_ignores_formatting_only(other, same):
    reference = "<domain type='test'><name>web1</name><uuid>u</uuid></domain>"
    assert (module.normalise_xml(reference) == module.normalise_xml(other)) is same


def test_attribute_order_does_not_count():
    first = "<domain type='test'><memory unit='MiB' dumpCore='off'>1</memory></domain>"
    second = "<domain type='test'><memory dumpCore='off' unit='MiB'>1</memory></domain>"
    assert module.normalise_xml(first) == module.normalise_xml(second)


# ---- create -----------------------------------------------------------------------------------------


def create(nodes, **values):
    p = params(xml=domain_xml(), **values)
    info = module.parse_input(p)
    return module.plan_create(p, info, module.meta_updates(p, node_names=nodes), nodes, None)


@pytest.mark.parametrize("values, node, state", [
    ({}, "n2", "stop"),                                 # the selector (mem): most headroom
    ({"node": "n3"}, "n3", "stop"),                     # a stopped VM may be defined on a flushed node
    ({"state": "started"}, "n2", "start"),
    ({"state": "disabled", "node": "n1"}, "n1", "disable"),
    ({"node_limit": ["n1", "n4"]}, "n1", "stop"),       # the selector within the limit
])
def test_create_places_the_vm(nodes, values, node, state):
    plan = create(nodes, **values)
    assert plan.changed and plan.action == "create"
    assert plan.values["node"] == node
    assert plan.values["state"] == state
    paths = module.plan_paths(Schema("/pvc"), plan)
    assert paths[f"/pvc/domains/{UUID}/lastnode"] == "" and paths[f"/pvc/domains/{UUID}/failedreason"] == ""
    assert paths[f"/pvc/domains/{UUID}/node"] == node and paths[f"/pvc/domains/{UUID}/state"] == state
    assert plan.after["node"] == node and plan.after["memory_mib"] == 1024
    assert plan.diff()[0] == {"before": {}, "after": plan.after}
    assert plan.diff()[1]["after"].startswith("<domain type=\"test\">")


def test_create_writes_every_meta_key(nodes):
    plan = create(nodes, migration_method="live", node_limit=["n1", "n2"])
    assert plan.values["meta/migration_method"] == "live"
    assert plan.values["meta/node_limit"] == '["n1", "n2"]'
    assert plan.values["meta/node_selector"] == "default"
    assert plan.values["meta/node_autostart"] == "false"
    assert plan.values["meta/migration_max_downtime_ms"] == "300"
    paths = module.plan_paths(Schema("/pvc"), plan)
    assert paths[f"/pvc/domains/{UUID}"] == "web1"
    assert paths[f"/pvc/domains/{UUID}/meta"] == ""
    assert paths[f"/pvc/domains/{UUID}/meta/node_limit"] == '["n1", "n2"]'
    assert paths[f"/pvc/domains/{UUID}/state"] == "stop"


@pytest.mark.parametrize("values, message", [
    ({"node": "n9"}, "node 'n9' is not a node of this cluster (nodes: n1, n2, n3, n4)"),
    ({"node": "n2", "node_limit": ["n1"]}, "node n2 is not in the node_limit of VM web1 (n1)"),
    ({"node": "n3", "state": "started"}, "cannot start VM web1 on node n3: domain state is flushed, not ready"),
    ({"node": "n4", "state": "started"}, "cannot start VM web1 on node n4: needs 1024 MiB, has 384 MiB headroom"),
    ({"node_limit": ["n3", "n4"]}, "no node can take VM web1: no target node for a VM of 1024 MiB"),
])
def test_create_refuses(nodes, values, message):
    with pytest.raises(ModuleFailure) as failure:
        create(nodes, **values)
    assert message in failure.value.msg


# ---- update -----------------------------------------------------------------------------------------


def update(current, xml=None, **values):
    values.setdefault("name", None if xml else current.name)
    p = params(xml=xml, **values)
    info = module.parse_input(p)
    return module.plan_update(p, info, module.meta_updates(p), current)


@pytest.mark.parametrize("current_state, state, written", [
    ("start", "present", None),
    ("stop", "present", None),
    ("stop", "started", "start"),
    ("start", "started", None),
    ("restart", "started", None),      # a restart in progress ends in start
    ("fail", "started", "start"),      # a failed VM is started again
    ("start", "stopped", "stop"),
    ("stop", "stopped", None),
    ("shutdown", "stopped", "stop"),   # forced, not waiting for the clean shutdown
    ("start", "shutdown", "shutdown"),
    ("shutdown", "shutdown", None),
    ("stop", "shutdown", None),        # already off
    ("disable", "shutdown", "shutdown"),
    ("start", "disabled", "disable"),
    ("disable", "disabled", None),
    ("start", "restarted", "restart"),
    ("stop", "restarted", "restart"),
    ("restart", "restarted", None),
])
def test_state_changes_only_when_not_satisfied(current_state, state, written):
    plan = update(make_vm(state=current_state), state=state)
    assert plan.values.get("state") == written
    assert plan.changed is (written is not None)
    assert plan.action == ("update" if written else "none")
    if state != "present":
        assert plan.diff()[0] == {"before": {"node": "n1", "state": current_state},
                                  "after": {"node": "n1", "state": written or current_state}}


def test_same_xml_written_differently_is_no_change():
    current = make_vm()
    plan = update(current, xml=current.xml.replace("'", '"').replace("><", ">\n  <"))
    assert not plan.changed
    assert plan.values == {}
    assert len(plan.diff()) == 1


def test_changed_xml_is_written_and_diffed():
    current = make_vm()
    plan = update(current, xml=domain_xml(memory_mib=2048))
    assert plan.changed and plan.differences.changed_keys == ["xml"]
    assert plan.values == {"xml": domain_xml(memory_mib=2048)}
    xml_diff = plan.diff()[1]
    assert "1024" in xml_diff["before"] and "2048" in xml_diff["after"]
    assert "xml" not in plan.diff()[0]["before"]


def test_rename_through_the_xml():
    plan = update(make_vm(), xml=domain_xml(name="web1-new"))
    assert plan.values["name"] == "web1-new"
    assert plan.diff()[0]["after"]["name"] == "web1-new"


def test_meta_update_and_warnings():
    plan = update(make_vm(node="n1"), node="n2", node_limit=["n2", "n3"], node_autostart=False)
    assert plan.values == {"meta/node_limit": '["n2", "n3"]'}
    assert plan.diff()[0]["before"]["meta"] == {"node_limit": [], "node_autostart": False}
    assert plan.diff()[0]["after"]["meta"] == {"node_limit": ["n2", "n3"], "node_autostart": False}
    assert any("node=n2 is only used when a VM is defined" in warning for warning in plan.warnings)
    assert any("outside its new node_limit" in warning for warning in plan.warnings)
