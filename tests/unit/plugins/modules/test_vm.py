# -*- coding: utf-8 -*-
# Copyright: pvc.cluster developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""pvc.cluster.vm: input validation, XML normalisation and the create/update plans (no ZooKeeper)."""

from __future__ import annotations

import pytest

from ansible_collections.pvc.cluster.plugins.module_utils._domain_xml import DomainXMLError, normalise_domain_xml
from ansible_collections.pvc.cluster.plugins.module_utils._module import ModuleFailure
from ansible_collections.pvc.cluster.plugins.module_utils._schema import Schema
from ansible_collections.pvc.cluster.plugins.modules import vm as module

from ansible_collections.pvc.cluster.tests.unit.plugins.modules.cluster_builders import domain_xml, make_node, make_vm

UUID = "6695eb01-f6a4-8304-79aa-97f2502e193f"


def params(**values):
    base = {
        "name": None,
        "xml": None,
        "state": "present",
        "node": None,
        "wait": True,
        "wait_timeout": 120,
        "migration_method": None,
        "node_selector": None,
        "node_limit": None,
        "node_autostart": None,
        "migration_max_downtime_ms": None,
        "migration_auto_converge": None,
    }
    base.update(values)
    return base


# ---- input ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "values, message",
    [
        ({}, "give the VM's name (or UUID) in name, or its domain XML in xml"),
        ({"name": "  "}, "name must not be empty"),
        (
            {"name": "web1", "wait_timeout": 0},
            "wait_timeout must be a number of seconds from 1 to 604800 (7 days), not 0",
        ),
        (
            {"xml": "<domain type='test'><name>web1</name>"},
            "xml is not a domain XML pvc.cluster accepts: domain XML is not well-formed",
        ),
        (
            {"xml": "<domain><name>web1</name></domain>"},
            "xml is not a domain XML pvc.cluster accepts: <domain> has no type attribute",
        ),
        ({"xml": "<domain type='test'><name>web1</name><memory>1</memory></domain>"}, "<uuid> is missing"),
        ({"name": "web2", "xml": domain_xml("web1")}, "name 'web2' does not match the XML, whose <name> is 'web1'"),
        (
            {"name": "web1", "wait_timeout": 604801},
            "wait_timeout must be a number of seconds from 1 to 604800 (7 days), not 604801",
        ),
        (
            {"name": "web1", "wait_timeout": 99999999999},
            "wait_timeout must be a number of seconds from 1 to 604800 (7 days)",
        ),
        ({"xml": domain_xml(), "node": ""}, "node must not be empty"),
        ({"xml": domain_xml(), "node": " "}, "node must not be empty"),
        # XML that lxml parses but that cannot be compared or kept as given: refused, never a traceback
        (
            {"xml": "<?xml version='1.0' encoding='UTF-16'?>" + domain_xml()},
            "xml is not a domain XML pvc.cluster accepts: the XML declaration names the encoding 'UTF-16'",
        ),
        (
            {"xml": domain_xml().replace("<devices/>", "<devices/><metadata><x:a xmlns:x='relative/uri'/></metadata>")},
            "namespace URI 'relative/uri' is relative; give namespaces an absolute URI",
        ),
        (
            {"xml": domain_xml().replace("<devices/>", "<description>" + "x" * 1_000_000 + "</description><devices/>")},
            "domain XML is 1000203 bytes long (UTF-8); a cluster keeps domain XML of at most 1000000 bytes",
        ),
        (
            {"xml": domain_xml().replace("<devices/>", "<description>\ud800</description><devices/>")},
            "domain XML holds a character that is not Unicode text ('\\ud800' at position",
        ),
    ],
)
def test_bad_input_is_refused_before_connecting(values, message):
    with pytest.raises(ModuleFailure) as failure:
        module.parse_input(params(**values))
    assert message in failure.value.msg


@pytest.mark.parametrize(
    "values",
    [
        {"name": "web1"},
        {"xml": domain_xml()},
        {"name": "web1", "xml": domain_xml()},
        {"name": UUID, "xml": domain_xml()},
    ],
)
def test_good_input(values):
    info = module.parse_input(params(**values))
    assert info is None if "xml" not in values else (info.name, info.uuid) == ("web1", UUID)


@pytest.mark.parametrize(
    "text",
    [
        "<?xml version='1.0' encoding='UTF-16'?><domain type='test'/>",
        "<?xml version='1.0' encoding='latin-1'?><domain type='test'/>",
        "<?xml version='1.0' encoding='no-such-encoding'?><domain type='test'/>",
        "<domain type='test' xmlns:x='relative/uri'><x:a/></domain>",
        "<domain type='test' xmlns='rel'><name/></domain>",
        "<domain type='test'><name>\ud800</name></domain>",
        "<domain type='test'>&#1114111;</domain>",
        "<domain type='test'><![CDATA[<x>]]></domain>",
        "<?xml version='1.0' encoding='utf8'?><domain type='test' xmlns:x='urn:x' xml:base='rel'/>",
        "<domain type='test' b='&#10;&#9;'/>",
        "<domain",
        "",
    ],
)
def test_normalising_either_succeeds_or_says_why(text):
    try:
        normalised = normalise_domain_xml(text)
    except DomainXMLError as exc:
        assert str(exc)
    else:
        assert normalise_domain_xml(normalised) == normalised


@pytest.mark.parametrize(
    "other, same",
    [
        ('<domain type="test"><name>web1</name><uuid>u</uuid></domain>', True),
        ("<domain type='test'>\n  <!-- comment -->\n  <name>web1</name>\n  <uuid>u</uuid>\n</domain>\n", True),
        ("<?xml version='1.0'?><domain type='test'><name>web1</name><uuid>u</uuid></domain>", True),
        ("<domain id='3' type='test'><name>web1</name><uuid>u</uuid></domain>", False),
        ("<domain type='test'><name>web2</name><uuid>u</uuid></domain>", False),
        ("<domain type='test'><uuid>u</uuid><name>web1</name></domain>", False),
    ],
)
def test_normalised_xml_ignores_formatting_only(other, same):
    reference = "<domain type='test'><name>web1</name><uuid>u</uuid></domain>"
    assert (normalise_domain_xml(reference) == normalise_domain_xml(other)) is same


def test_attribute_order_does_not_count():
    first = "<domain type='test'><memory unit='MiB' dumpCore='off'>1</memory></domain>"
    second = "<domain type='test'><memory dumpCore='off' unit='MiB'>1</memory></domain>"
    assert normalise_domain_xml(first) == normalise_domain_xml(second)


# ---- create -----------------------------------------------------------------------------------------


def create(nodes, **values):
    p = params(xml=domain_xml(), **values)
    info = module.parse_input(p)
    return module.plan_create(p, info, module.meta_updates(p, node_names=nodes), nodes, None)


@pytest.mark.parametrize(
    "values, node, state",
    [
        ({}, "n2", "stop"),  # the selector (mem): most headroom
        ({"node": "n3"}, "n3", "stop"),  # a stopped VM may be defined on a flushed node
        ({"state": "started"}, "n2", "start"),
        ({"state": "disabled", "node": "n1"}, "n1", "disable"),
        ({"node_limit": ["n1", "n4"]}, "n1", "stop"),  # the selector within the limit
    ],
)
def test_create_places_the_vm(nodes, values, node, state):
    plan = create(nodes, **values)
    assert plan.changed and plan.action == "create"
    assert plan.values["node"] == node
    assert plan.values["state"] == state
    paths = module.plan_paths(Schema("/pvc"), plan)
    assert paths[f"/pvc/domains/{UUID}/lastnode"] == "" and paths[f"/pvc/domains/{UUID}/failedreason"] == ""
    assert paths[f"/pvc/domains/{UUID}/node"] == node and paths[f"/pvc/domains/{UUID}/state"] == state
    # covered by a reservation on its node until the node's keepalive counts it in memprov
    assert paths[f"/pvc/nodes/{node}/reservations/{UUID}"] == 1024
    assert f"/pvc/nodes/{node}/reservations" in paths
    assert plan.after["node"] == node and plan.after["memory_mib"] == 1024
    assert plan.diff()[0] == {"before": {}, "after": plan.after}
    assert plan.diff()[1]["after"].startswith('<domain type="test">')


def test_create_writes_every_meta_key(nodes):
    plan = create(nodes, migration_method="live", node_limit=["n1", "n2"])
    assert plan.values["meta/migration_method"] == "live"
    assert plan.values["meta/node_limit"] == '["n1", "n2"]'
    assert plan.values["meta/node_selector"] == "default"
    assert plan.values["meta/node_autostart"] == "false"
    assert plan.values["meta/migration_max_downtime_ms"] == "300"
    assert plan.values["meta/migration_auto_converge"] == "false"
    paths = module.plan_paths(Schema("/pvc"), plan)
    assert paths[f"/pvc/domains/{UUID}"] == "web1"
    assert paths[f"/pvc/domains/{UUID}/meta"] == ""
    assert paths[f"/pvc/domains/{UUID}/meta/node_limit"] == '["n1", "n2"]'
    assert paths[f"/pvc/domains/{UUID}/state"] == "stop"


@pytest.mark.parametrize(
    "values, message",
    [
        ({"node": "n9"}, "node 'n9' is not a node of this cluster (nodes: n1, n2, n3, n4)"),
        ({"node": "n2", "node_limit": ["n1"]}, "node n2 is not in the node_limit of VM web1 (n1)"),
        ({"node": "n3", "state": "started"}, "cannot start VM web1 on node n3: domain state is flushed, not ready"),
        ({"node": "n4", "state": "started"}, "cannot start VM web1 on node n4: needs 1024 MiB, has 384 MiB headroom"),
        ({"node_limit": ["n3", "n4"]}, "no node can take VM web1: no target node for a VM of 1024 MiB"),
    ],
)
def test_create_refuses(nodes, values, message):
    with pytest.raises(ModuleFailure) as failure:
        create(nodes, **values)
    assert message in failure.value.msg


@pytest.mark.parametrize(
    "memory_mib, vcpus, node, message",
    [
        # 100 PiB on a 16 GiB node: refused instead of driving its headroom to minus 100 PiB
        (
            100 * 1024**3,
            2,
            "n3",
            "cannot define VM web1 on node n3: the VM needs 107374182400 MiB, more than node n3 can ever "
            "give VMs (16384 MiB total - 0 MiB reserve = 16384 MiB)",
        ),
        (16385, 2, "n1", "the VM needs 16385 MiB, more than node n1 can ever give VMs"),
        (1024, 9, "n1", "cannot define VM web1 on node n1: the VM has 9 vCPUs, more than the 8 CPUs of node n1"),
    ],
)
def test_create_refuses_a_vm_the_node_could_never_hold(nodes, memory_mib, vcpus, node, message):
    p = params(xml=domain_xml(memory_mib=memory_mib, vcpus=vcpus), node=node)
    with pytest.raises(ModuleFailure) as failure:
        module.plan_create(p, module.parse_input(p), {}, nodes, None, {name: 8 for name in nodes})
    assert message in failure.value.msg


def test_create_on_a_node_without_figures_or_headroom(nodes):
    # no memory figure published yet (memtotal 0): not checked; a stopped VM beyond the headroom: a warning
    nodes["n5"] = make_node("n5", memtotal=0)
    p = params(xml=domain_xml(memory_mib=4096), node="n5")
    assert module.plan_create(p, module.parse_input(p), {}, nodes, None).values["node"] == "n5"
    p = params(xml=domain_xml(memory_mib=4096), node="n4")
    plan = module.plan_create(p, module.parse_input(p), {}, nodes, None)
    assert plan.values["node"] == "n4"
    assert plan.warnings == [
        "node n4 has 384 MiB headroom and VM web1 needs 4096 MiB: the node is overcommitted while the VM "
        "is assigned there, and the VM cannot start there until other VMs leave"
    ]


def test_the_selector_skips_nodes_with_too_few_cpus(nodes):
    p = params(xml=domain_xml(vcpus=4))
    plan = module.plan_create(p, module.parse_input(p), {}, nodes, None, {"n1": 8, "n2": 2, "n4": 0})
    assert plan.values["node"] == "n1"  # n2 has the most headroom but 2 CPUs; n1 is next
    with pytest.raises(ModuleFailure) as failure:
        module.plan_create(p, module.parse_input(p), {}, nodes, None, {"n1": 2, "n2": 2, "n3": 2, "n4": 2})
    assert "n1: has 2 CPUs, the VM has 4 vCPUs; n2: has 2 CPUs, the VM has 4 vCPUs" in failure.value.msg


# ---- update -----------------------------------------------------------------------------------------


def update(current, xml=None, nodes=None, cpus=None, **values):
    values.setdefault("name", None if xml else current.name)
    p = params(xml=xml, **values)
    info = module.parse_input(p)
    return module.plan_update(p, info, module.meta_updates(p), current, nodes, cpus)


@pytest.mark.parametrize(
    "current_state, state, written",
    [
        ("start", "present", None),
        ("stop", "present", None),
        ("stop", "started", "start"),
        ("start", "started", None),
        ("restart", "started", None),  # a restart in progress ends in start
        ("fail", "started", "start"),  # a failed VM is started again
        ("start", "stopped", "stop"),
        ("stop", "stopped", None),
        ("shutdown", "stopped", "stop"),  # forced, not waiting for the clean shutdown
        ("start", "shutdown", "shutdown"),
        ("shutdown", "shutdown", None),
        ("stop", "shutdown", None),  # already off
        ("disable", "shutdown", "shutdown"),
        ("start", "disabled", "disable"),
        ("disable", "disabled", None),
        ("start", "restarted", "restart"),
        ("stop", "restarted", "restart"),
        ("restart", "restarted", None),
    ],
)
def test_state_changes_only_when_not_satisfied(current_state, state, written):
    plan = update(make_vm(state=current_state), state=state)
    assert plan.values.get("state") == written
    assert plan.changed is (written is not None)
    assert plan.action == ("update" if written else "none")
    if state != "present":
        assert plan.diff()[0] == {
            "before": {"node": "n1", "state": current_state},
            "after": {"node": "n1", "state": written or current_state},
        }


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


@pytest.mark.parametrize("state", ["started", "restarted"])
@pytest.mark.parametrize(
    "node, reason",
    [
        ("n3", "the domain state of node n3 is flushed, not ready"),
        ("n5", "the daemon state of node n5 is dead, not run"),
    ],
)
def test_an_existing_vm_is_not_started_on_a_node_that_is_not_ready(nodes, state, node, reason):
    nodes["n5"] = make_node("n5", daemon_state="dead")
    with pytest.raises(ModuleFailure) as failure:
        update(make_vm(state="stop", node=node), nodes=nodes, state=state)
    assert failure.value.msg == (
        f"cannot start VM web1 on node {node}: {reason}; make the node ready (pvc.cluster.node) "
        "or move the VM to a ready node (pvc.cluster.vm_migrate)"
    )


def test_a_vm_already_started_on_a_flushed_node_is_left_alone(nodes):
    # nothing to write: no refusal either (a flush in progress moves it)
    plan = update(make_vm(state="start", node="n3"), nodes=nodes, state="started")
    assert not plan.changed
    # stopping it there is always allowed
    assert update(make_vm(state="start", node="n3"), nodes=nodes, state="stopped").values == {"state": "stop"}


def test_an_update_must_fit_the_vms_node(nodes):
    # n4: 16384 total, 16000 provisioned (the VM's 1024 among them), 384 MiB headroom
    current = make_vm(node="n4", memory_mib=1024)
    assert update(current, xml=domain_xml(memory_mib=1408), nodes=nodes).values["xml"]  # grows by 384: fits
    with pytest.raises(ModuleFailure) as failure:
        update(current, xml=domain_xml(memory_mib=1409), nodes=nodes)
    assert failure.value.msg == (
        "VM web1 would grow from 1024 to 1409 MiB, but node n4 has 384 MiB headroom; move the VM to "
        "a node with room first (pvc.cluster.vm_migrate), or make room on this one"
    )
    assert update(current, xml=domain_xml(memory_mib=512), nodes=nodes).values["xml"]  # shrinking always fits
    with pytest.raises(ModuleFailure) as failure:
        update(current, xml=domain_xml(memory_mib=100 * 1024**3), nodes=nodes)
    assert (
        "cannot give VM web1 this XML on node n4: the VM needs 107374182400 MiB, more than node n4 can ever"
        in failure.value.msg
    )
    with pytest.raises(ModuleFailure) as failure:
        update(current, xml=domain_xml(vcpus=16), nodes=nodes, cpus={"n4": 8})
    assert "the VM has 16 vCPUs, more than the 8 CPUs of node n4" in failure.value.msg


def test_a_uuid_clash_is_an_update_and_checked_like_one(nodes):
    # the XML names another VM but the uuid of web1: web1 is renamed and gets the XML, within its node's headroom
    current = make_vm(node="n4", memory_mib=1024)
    plan = update(current, xml=domain_xml(name="other", memory_mib=1024), nodes=nodes)
    assert plan.values["name"] == "other"
    with pytest.raises(ModuleFailure) as failure:
        update(current, xml=domain_xml(name="other", memory_mib=4096), nodes=nodes)
    assert "would grow from 1024 to 4096 MiB, but node n4 has 384 MiB headroom" in failure.value.msg


def test_a_vm_on_a_node_that_is_gone(nodes):
    with pytest.raises(ModuleFailure) as failure:
        update(make_vm(node="n9"), nodes=nodes, state="started")
    assert (
        "VM web1 is assigned to node 'n9', which is not a node of this cluster (nodes: n1, n2, n3, n4)"
        in failure.value.msg
    )


# ---- the domain XML policy --------------------------------------------------------------------------


def policed_xml(devices="", extra="", os=""):
    return (
        f"<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'><name>web1</name>"
        f"<uuid>{UUID}</uuid><memory unit='MiB'>512</memory><os><type>hvm</type>{os}</os>{extra}"
        f"<devices><emulator>/usr/bin/qemu-system-x86_64</emulator>{devices}</devices></domain>"
    )


@pytest.mark.parametrize(
    "xml, message",
    [
        (
            policed_xml(extra="<qemu:commandline><qemu:arg value='-x'/></qemu:commandline>"),
            "<qemu:commandline>: elements of",
        ),
        (
            policed_xml(extra="<seclabel type='none'/>"),
            "<seclabel type='none'>: security label overrides are not accepted",
        ),
        (
            policed_xml("<hostdev mode='subsystem' type='pci'/>"),
            "<hostdev mode='subsystem' type='pci'>: this device is not",
        ),
        (
            policed_xml("<filesystem type='mount'><source dir='/'/><target dir='r'/></filesystem>"),
            "<filesystem type='mount'>",
        ),
        (
            policed_xml(os="<kernel>/boot/vmlinuz</kernel>"),
            "<kernel>: file '/boot/vmlinuz' is not under a storage root",
        ),
        (
            policed_xml("<disk type='block'><source dev='/dev/sda'/><target dev='vda'/></disk>"),
            "'/dev/sda' is not under a",
        ),
        (policed_xml("<interface type='ethernet'/>"), "interfaces of type 'ethernet' are not accepted"),
        (policed_xml().replace("/usr/bin/qemu-system-x86_64", "/tmp/qemu"), "<emulator>/tmp/qemu</emulator> is not an"),
    ],
)
def test_the_module_refuses_what_the_domain_policy_refuses(xml, message):
    with pytest.raises(ModuleFailure) as failure:
        module.parse_input(params(xml=xml))
    assert failure.value.msg.startswith("xml is refused: ") and message in failure.value.msg
    assert "of the domain XML policy" in failure.value.msg


def test_the_module_takes_the_operators_policy():
    xml = policed_xml(os="<kernel>/srv/boot/vmlinuz</kernel>")
    assert module.parse_input(params(xml=xml, domain_policy={"storage_roots": ["/srv/boot"]})).name == "web1"
    with pytest.raises(ModuleFailure, match="domain_policy.storage_roots: 'x' is not a list"):
        module.parse_input(params(xml=xml, domain_policy={"storage_roots": "x"}))
