#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: pvc.cluster developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: vm
short_description: Define, update, start, stop or remove a VM of a pvc.cluster
version_added: 0.1.0
description:
  - Defines a VM in the cluster from its libvirt domain XML, updates its XML, meta or desired state,
    or removes it.
  - The module writes the desired state to ZooKeeper; the node daemon of the VM's node makes libvirt
    follow it. With O(wait=true) the module waits until the daemon reports the result.
  - The VM's UUID and name come from the XML (C(<uuid>) and C(<name>), both required).
  - To move an existing VM to another node use M(pvc.cluster.vm_migrate); O(node) only places a new VM.
author:
  - pvc.cluster developers (!UNKNOWN)
options:
  name:
    description:
      - The VM's name or UUID (not empty).
      - When O(xml) is given too, it must be the C(<name>) (or the C(<uuid>)) of that XML.
      - One of O(name) and O(xml) is required.
    type: str
  xml:
    description:
      - The libvirt domain XML of the VM, as a string. Needed to define a new VM.
      - For a file on the controller use C(lookup('ansible.builtin.file', 'web1.xml')) or
        C(lookup('ansible.builtin.template', 'web1.xml.j2')).
      - For an existing VM the XML is replaced when it differs from the stored XML once both are
        normalised (comments, blank text, attribute order and quoting do not count as differences).
        A running VM gets the new XML at its next start.
      - Renaming a VM (a new C(<name>) with the same C(<uuid>)) is an update.
      - At most 1,000,000 bytes of UTF-8 (ZooKeeper refuses requests over 1 MiB by default). An XML
        declaration may name no other encoding than UTF-8, and namespace URIs must be absolute.
      - The VM's C(<memory>) must fit on its node (or, for a new VM without O(node), on some node of the
        cluster) once that node's reserve is taken off, and its C(<vcpu>) count must not exceed the CPUs
        of that node. A larger C(<memory>) for an existing VM must also fit in its node's headroom, checked
        again when it is written; the update reserves the new size on the node at once (until the node's
        daemon counts it), so that nothing else is placed into that memory meanwhile.
    type: str
  state:
    description:
      - V(present) defines the VM or updates it without changing its desired state; a new VM is
        defined stopped.
      - V(started) runs it (ZooKeeper state C(start)); V(stopped) stops it at once (C(stop), forced);
        V(shutdown) shuts it down cleanly, forced after the daemon's shutdown timeout (C(shutdown),
        which the daemon turns into C(stop)); V(disabled) shuts it down and keeps it off (C(disable));
        V(restarted) restarts it (C(restart), which the daemon turns back into C(start)).
      - V(absent) removes it. A VM that may still run is first stopped (state C(stop)); with O(wait=true)
        the module waits until no node reports it running, then deletes its keys. With O(wait=false)
        the keys are deleted at once and the daemon force-stops a VM whose keys are gone.
        A VM with a migration in flight is not removed.
    type: str
    choices: [present, absent, started, stopped, shutdown, disabled, restarted]
    default: present
  node:
    description:
      - The node a new VM is defined on. It must be a node of the cluster and inside O(node_limit);
        for O(state=started) or O(state=restarted) it must also be ready (daemon C(run), domain state
        C(ready)) and have the memory headroom for the VM.
      - When omitted, the VM's O(node_selector) chooses among the ready nodes with enough headroom.
      - Ignored (with a warning when it differs) for an existing VM.
      - An empty name is refused (leave the option out to let the selector choose).
    type: str
  require_n1:
    description:
      - For a new VM defined to run (O(state=started) or O(state=restarted)), refuse it when, with the VM
        running on its node, the cluster could no longer restart every running VM after the loss of any one
        node (memory only); the message names each node whose loss could not be absorbed and by how much.
        Nothing is written, in check mode the task fails too.
      - When not given, the cluster setting C(/config/require_n1) decides (C(true)/C(false); false when unset).
    type: bool
  wait:
    description:
      - Wait until the node daemon has brought the VM to the requested state (running on its node,
        or running nowhere), and fail if it could not (for example C(fail) with the libvirt error).
      - Not used for O(state=present) or in check mode.
    type: bool
    default: true
  wait_timeout:
    description:
      - Seconds to wait when O(wait=true).
      - From V(1) to V(604800) (7 days).
    type: int
    default: 120
  domain_policy:
    description:
      - The domain XML policy O(xml) must meet (the collection's C(docs/security.md)); each key given replaces
        its default. The node daemons check the XML against their own policy (their C(domain_policy)
        configuration) before they define, start or migrate the VM, and refuse it otherwise; give the same
        policy here, e.g. once for the play in C(module_defaults) of C(pvc.cluster.vm) (not of the group,
        whose other modules do not take it).
      - C(storage_roots) (list of absolute paths) holds every host path the XML may name (disks, kernels,
        firmware, serial logs); C(emulators) the accepted C(<emulator>) paths; C(devices) the accepted device
        elements (by default no C(hostdev), C(filesystem), C(shmem), C(smartcard), C(lease) or C(pstore));
        C(interface_types) the accepted C(<interface>) types (default V(bridge) and V(network), so no
        V(ethernet)); C(disk_protocols) the accepted network disk protocols (default V(rbd));
        C(namespaces) the XML namespaces accepted outside C(<metadata>) (default none, so no
        C(qemu:commandline)); C(seclabel) (bool) whether C(<seclabel>) overrides are accepted (default no).
    type: dict
extends_documentation_fragment:
  - pvc.cluster._zk
  - pvc.cluster._vm_meta
  - pvc.cluster._attributes
  - pvc.cluster._attributes.actiongroup_all
attributes:
  check_mode:
    support: full
  diff_mode:
    support: full
    details:
      - The diff shows the VM's name, state, node and the meta options given; a changed XML follows as
        a second diff of the normalised XML.
  idempotent:
    support: partial
    details:
      - V(restarted) restarts the VM on every run (unless a restart is already in progress).
seealso:
  - module: pvc.cluster.vm_meta
  - module: pvc.cluster.vm_migrate
  - module: pvc.cluster.vm_info
"""

EXAMPLES = r"""
# These tasks take the ZooKeeper options from their play, set once for every pvc.cluster module:
#   module_defaults:
#     group/pvc.cluster.all:
#       zk_hosts: zk1.example.net:2181,zk2.example.net:2181,zk3.example.net:2181
- name: Define web1 from its XML on the controller, running, on the best node
  pvc.cluster.vm:
    xml: "{{ lookup('ansible.builtin.template', 'web1.xml.j2') }}"
    state: started
    node_limit: [hv1, hv2]
    migration_method: live

- name: Define db1 stopped on hv3
  pvc.cluster.vm:
    xml: "{{ lookup('ansible.builtin.file', 'db1.xml') }}"
    node: hv3
    node_autostart: true

- name: Shut web1 down cleanly
  pvc.cluster.vm:
    name: web1
    state: shutdown

- name: Restart db1 without waiting for it
  pvc.cluster.vm:
    name: db1
    state: restarted
    wait: false

- name: Remove web1 (stopped first)
  pvc.cluster.vm:
    name: web1
    state: absent
"""

RETURN = r"""
vm:
  description:
    - The VM as it is after the task (in check mode, as it would be). Empty after O(state=absent).
  returned: always
  type: dict
  contains:
    name:
      description: The VM's name.
      type: str
      sample: web1
    uuid:
      description: The VM's UUID.
      type: str
      sample: 6695eb01-f6a4-8304-79aa-97f2502e193f
    state:
      description:
        - The VM's state (C(start), C(stop), C(shutdown), C(disable), C(restart), C(fail)) - the desired state, or the
          state a node daemon moved it to since (see M(pvc.cluster.vm_info)).
      type: str
      sample: start
    node:
      description: The node the VM is assigned to.
      type: str
      sample: hv1
    lastnode:
      description: The home node of a VM migrated away temporarily, else empty.
      type: str
      sample: ""
    memory_mib:
      description: The VM's configured maximum memory, MiB.
      type: int
      sample: 1024
    vcpus:
      description: The VM's maximum vCPU count.
      type: int
      sample: 2
    meta:
      description: The VM's meta (see M(pvc.cluster.vm_meta)).
      type: dict
      sample: {"migration_method": "live", "node_selector": "default", "node_limit": ["hv1", "hv2"],
               "node_autostart": false, "migration_max_downtime_ms": 300, "migration_auto_converge": false}
    running_on:
      description: The nodes that report the VM running (after a wait; otherwise as last published).
      type: list
      elements: str
      sample: [hv1]
    failedreason:
      description: Why the VM failed to start, else empty.
      type: str
      sample: ""
action:
  description: What the task did (or would do in check mode).
  returned: always
  type: str
  sample: create
  choices: [create, update, remove, none]
diff:
  description: Before and after, with O(ignore:--diff).
  returned: when diff mode is on
  type: list
  elements: dict
"""

from ansible_collections.pvc.cluster.plugins.module_utils import _schema as S
from ansible_collections.pvc.cluster.plugins.module_utils._cluster import (
    find_vm,
    read_node_state,
    read_node_views,
    read_running,
    read_vm,
    read_vm_state,
    vm_definition,
    watch_until,
)
from ansible_collections.pvc.cluster.plugins.module_utils._decode import integer, or_default
from ansible_collections.pvc.cluster.plugins.module_utils._domain_policy import DomainPolicy, PolicyError, check_domain
from ansible_collections.pvc.cluster.plugins.module_utils._domain_xml import (
    DomainXMLError,
    normalise_domain_xml,
    parse_domain_xml,
)
from ansible_collections.pvc.cluster.plugins.module_utils._meta import VMMeta
from ansible_collections.pvc.cluster.plugins.module_utils._module import (
    Differences,
    META_ARGUMENT_SPEC,
    MetaPlan,
    ModuleFailure,
    build_module,
    check_before_connecting,
    check_names,
    check_wait_timeout,
    exit_from_session,
    meta_updates,
)
from ansible_collections.pvc.cluster.plugins.module_utils._report import (
    meta_dict,
    n1_refusal,
    read_cluster,
    read_require_n1,
)
from ansible_collections.pvc.cluster.plugins.module_utils._requests import RequestError, growth_reservation
from ansible_collections.pvc.cluster.plugins.module_utils._selector import (
    NoTargetError,
    allocation_check,
    rejection_reasons,
    select_target,
)
from ansible_collections.pvc.cluster.plugins.module_utils._store import text_of

# module state -> the ZooKeeper VM state it writes
STATE_MAP = {
    "started": "start",
    "stopped": "stop",
    "shutdown": "shutdown",
    "disabled": "disable",
    "restarted": "restart",
}
# ZooKeeper states that already satisfy a requested state (a restart in progress ends in start,
# a shutdown in progress ends in stop)
SATISFIED_BY = {
    "start": ("start", "restart"),
    "stop": ("stop",),
    "shutdown": ("shutdown", "stop"),
    "disable": ("disable",),
    "restart": ("restart",),
}
NEW_VM_STATE = "stop"
NEEDS_READY_NODE = ("start", "restart")

ARGUMENT_SPEC = dict(
    name=dict(type="str"),
    xml=dict(type="str"),
    state=dict(type="str", default="present", choices=["present", "absent"] + list(STATE_MAP)),
    node=dict(type="str"),
    require_n1=dict(type="bool"),
    wait=dict(type="bool", default=True),
    wait_timeout=dict(type="int", default=120),
    domain_policy=dict(type="dict"),
    **META_ARGUMENT_SPEC,
)


# ---- pure logic (unit-tested) ------------------------------------------------------------------


def parse_input(params: dict):
    """Validate name/xml/wait_timeout without the cluster; returns the DomainInfo or None."""
    name, xml = params.get("name"), params.get("xml")
    check_wait_timeout(params)
    check_names(params, ("name", "node"))
    if not name and not xml:
        raise ModuleFailure("give the VM's name (or UUID) in name, or its domain XML in xml")
    info = None
    if xml:
        try:
            info = parse_domain_xml(xml)
            normalise_domain_xml(xml)  # what the diff compares: refused here, not halfway through the task
        except DomainXMLError as exc:
            raise ModuleFailure(f"xml is not a domain XML pvc.cluster accepts: {exc}") from None
        if name and name not in (info.name, info.uuid):
            raise ModuleFailure(
                f"name {name!r} does not match the XML, whose <name> is {info.name!r} "
                f"(uuid {info.uuid}); give the same name in both, or only one of them"
            )
        try:
            policy = DomainPolicy.from_options(params.get("domain_policy"))
        except PolicyError as exc:
            raise ModuleFailure(str(exc)) from None
        try:
            check_domain(xml, policy)
        except PolicyError as exc:
            raise ModuleFailure(f"xml is refused: {exc}") from None
    return info


def vm_summary(record) -> dict:
    return {
        "name": record.name,
        "uuid": record.uuid,
        "state": record.state,
        "node": record.node,
        "lastnode": record.lastnode,
        "memory_mib": record.memory_mib,
        "vcpus": record.vcpus,
        "meta": meta_dict(record.meta),
        "failedreason": record.failedreason,
    }


class VMPlan:
    """What the task does to one VM: logical key -> new value, the diff, and what to wait for."""

    def __init__(self, action: str, uuid: str, name: str) -> None:
        self.action = action  # create | update | remove | none
        self.uuid = uuid
        self.name = name
        self.values: dict[str, object] = {}
        self.differences = Differences()
        self.xml_before = ""
        self.xml_after = ""
        self.warnings: list[str] = []
        self.before: dict = {}
        self.after: dict = {}

    @property
    def changed(self) -> bool:
        if self.action in ("create", "remove"):
            return True
        return self.differences.changed

    def diff(self) -> list[dict]:
        if self.action in ("update", "none"):
            diffs = [self.differences.diff()]
            for entry in diffs:
                entry["before"].pop("xml", None)
                entry["after"].pop("xml", None)
        else:
            diffs = [{"before": self.before, "after": self.after}]
        if self.xml_before != self.xml_after:
            diffs.append(
                {
                    "before_header": f"{self.name}: domain XML (before)",
                    "after_header": f"{self.name}: domain XML (after)",
                    "before": self.xml_before,
                    "after": self.xml_after,
                }
            )
        return diffs


def _node_list(nodes) -> str:
    return ", ".join(sorted(nodes)) or "none registered"


def capacity_problem(memory_mib: int, vcpus: int, view, cputotal: int) -> str | None:
    """Why the node of ``view`` could never hold a VM of this size, whatever else it runs: more
    memory than the node gives VMs at all (total - reserve), or more vCPUs than the node has CPUs.
    None when it could; a figure the node has not published (0) is not checked."""
    if view.memtotal > 0 and memory_mib > view.memtotal - view.memreserve:
        return (
            f"the VM needs {memory_mib} MiB, more than node {view.name} can ever give VMs ({view.memtotal} MiB total "
            f"- {view.memreserve} MiB reserve = {view.memtotal - view.memreserve} MiB)"
        )
    if cputotal > 0 and vcpus > cputotal:
        return f"the VM has {vcpus} vCPUs, more than the {cputotal} CPUs of node {view.name}"
    return None


def not_ready_reason(view) -> str | None:
    """Why a VM cannot be started on the node of ``view`` (its daemon not run, or the node not ready), or None."""
    if view.daemon_state != "run":
        return f"the daemon state of node {view.name} is {view.daemon_state}, not run"
    if view.domain_state != "ready":
        return f"the domain state of node {view.name} is {view.domain_state}, not ready"
    return None


def plan_create(params: dict, info, updates: dict[str, str], nodes: dict, default_selector, cpus=None) -> VMPlan:
    """Plan the definition of a new VM from its XML. ``cpus``: each node's CPU count (0 or
    missing: not published)."""
    plan = VMPlan("create", info.uuid, info.name)
    state = STATE_MAP.get(params["state"], NEW_VM_STATE)
    meta = VMMeta.from_store(updates)
    cpus = cpus or {}
    node = params.get("node")
    if node:
        if node not in nodes:
            raise ModuleFailure(f"node {node!r} is not a node of this cluster (nodes: {_node_list(nodes)})")
        if meta.node_limit and node not in meta.node_limit:
            raise ModuleFailure(
                f"node {node} is not in the node_limit of VM {info.name} ({', '.join(meta.node_limit)})"
            )
        view = nodes[node]
        problem = capacity_problem(info.memory_mib, info.vcpus, view, cpus.get(node, 0))
        if problem:
            raise ModuleFailure(f"cannot define VM {info.name} on node {node}: {problem}")
        if state in NEEDS_READY_NODE:
            reason = rejection_reasons(info.memory_mib, None, meta.node_limit, {node: view})[node]
            if reason:
                raise ModuleFailure(f"cannot start VM {info.name} on node {node}: {reason}")
        elif view.memtotal > 0 and info.memory_mib > view.headroom:
            plan.warnings.append(
                f"node {node} has {view.headroom} MiB headroom and VM {info.name} needs {info.memory_mib} MiB: "
                "the node is overcommitted while the VM is assigned there, and the VM cannot start there "
                "until other VMs leave"
            )
    else:
        # nodes with too few CPUs for the VM are never chosen (the selector looks at memory only)
        few_cpus = {
            name: f"has {cpus[name]} CPUs, the VM has {info.vcpus} vCPUs"
            for name in nodes
            if cpus.get(name, 0) > 0 and info.vcpus > cpus[name]
        }
        try:
            node = select_target(
                info.memory_mib,
                None,
                meta.node_limit,
                meta.node_selector,
                nodes,
                default_selector=default_selector,
                exclude=few_cpus,
            )
        except NoTargetError as exc:
            reasons = {name: few_cpus.get(name, reason) for name, reason in exc.reasons.items()}
            detail = NoTargetError(reasons, exc.vm_memory_mib, exc.selector)
            raise ModuleFailure(f"no node can take VM {info.name}: {detail}; name one in node") from None
    plan.values = {"name": info.name, "xml": params["xml"].strip(), "state": state, "node": node}
    for key, text in meta.to_store().items():
        plan.values["meta/" + key] = text
    plan.after = {
        "name": info.name,
        "uuid": info.uuid,
        "state": state,
        "node": node,
        "lastnode": "",
        "memory_mib": info.memory_mib,
        "vcpus": info.vcpus,
        "meta": meta_dict(meta),
        "failedreason": "",
    }
    plan.xml_after = normalise_domain_xml(params["xml"])
    return plan


def plan_update(params: dict, info, updates: dict[str, str], current, nodes=None, cpus=None) -> VMPlan:
    """Plan the changes to an existing VM; ``current`` is its VMRecord, ``nodes`` the node views
    (None: not checked) and ``cpus`` each node's CPU count."""
    plan = VMPlan("update", current.uuid, current.name)
    diffs = plan.differences
    view = None if nodes is None else nodes.get(current.node)
    if nodes is not None and view is None:
        raise ModuleFailure(
            f"VM {current.name} is assigned to node {current.node!r}, which is not a node of this cluster "
            f"(nodes: {_node_list(nodes)}); move it to one with pvc.cluster.vm_migrate (state=moved)"
        )
    if info is not None and view is not None:
        problem = capacity_problem(info.memory_mib, info.vcpus, view, (cpus or {}).get(current.node, 0))
        if problem:
            raise ModuleFailure(f"cannot give VM {current.name} this XML on node {current.node}: {problem}")
        growth = info.memory_mib - current.memory_mib
        if growth > 0 and view.memtotal > 0 and growth > view.headroom:
            raise ModuleFailure(
                f"VM {current.name} would grow from {current.memory_mib} to {info.memory_mib} MiB, but node "
                f"{current.node} has {view.headroom} MiB headroom; move the VM to a node with room first "
                "(pvc.cluster.vm_migrate), or make room on this one"
            )
    if info is not None:
        diffs.add("name", current.name, info.name)
        if info.name != current.name:
            plan.values["name"] = info.name
            plan.name = info.name
        try:
            stored = normalise_domain_xml(current.xml) if current.xml.strip() else ""
        except DomainXMLError:
            stored = current.xml  # unreadable XML in the store: any given XML replaces it
        wanted = normalise_domain_xml(params["xml"])
        diffs.add("xml", stored, wanted)
        if stored != wanted:
            plan.values["xml"] = params["xml"].strip()
            plan.xml_before, plan.xml_after = stored, wanted
    target = STATE_MAP.get(params["state"])
    if target is not None:
        new_state = current.state if current.state in SATISFIED_BY[target] else target
        diffs.add("state", current.state, new_state)
        if new_state != current.state:
            reason = not_ready_reason(view) if view is not None and new_state in NEEDS_READY_NODE else None
            if reason:
                # as for a new VM: a node that is not ready (flushed for maintenance, or on its way
                # there or back) is not meant to run VMs, and its daemon would start it all the same
                raise ModuleFailure(
                    f"cannot start VM {current.name} on node {current.node}: {reason}; make the node ready "
                    "(pvc.cluster.node) or move the VM to a ready node (pvc.cluster.vm_migrate)"
                )
            plan.values["state"] = new_state
    diffs.add("node", current.node, current.node)
    if params.get("node") and params["node"] != current.node:
        plan.warnings.append(
            f"VM {current.name} exists on node {current.node}; node={params['node']} is only used when a VM "
            "is defined (use pvc.cluster.vm_migrate to move it)"
        )
    if updates:
        meta_plan = MetaPlan(current.meta, updates)
        diffs.add("meta", meta_plan.differences.before(), meta_plan.differences.after())
        for key, text in meta_plan.writes.items():
            plan.values["meta/" + key] = text
        new_meta = VMMeta.from_store(updates)
        limit = new_meta.node_limit if S.META_NODE_LIMIT in updates else ()
        if limit and current.node not in limit:
            plan.warnings.append(
                f"VM {current.name} runs on {current.node}, outside its new node_limit ({', '.join(limit)}); "
                "it stays there until it is migrated"
            )
    if not diffs.changed:
        plan.action = "none"
    return plan


def plan_paths(schema, plan: VMPlan) -> dict:
    """The znodes the plan writes: for a new VM, every key of a VM's definition
    (_cluster.vm_definition, which the daemons' tests define VMs with too)."""
    if plan.action == "create":
        values = plan.values
        meta = {key[5:]: value for key, value in values.items() if key.startswith("meta/")}
        paths = vm_definition(schema, plan.uuid, values["name"], values["xml"], values["node"], values["state"], meta)
        # The node's memprov counts the new VM from its next keepalive; until then a reservation
        # does (docs/architecture.md, "Memory accounting"), and rewriting the node's reservations
        # znode fails any migration request to it planned from figures read before.
        paths[schema.node_reservation(values["node"], plan.uuid)] = plan.after["memory_mib"]
        paths[schema.node_reservations(values["node"])] = f"define {plan.uuid}"
        return paths
    return store_values(schema, plan.uuid, plan.values)


def store_values(schema, uuid: str, values: dict) -> dict:
    """Logical plan keys -> znode paths."""
    paths = {}
    for key, value in values.items():
        if key == "name":
            paths[schema.domain(uuid)] = value
        elif key == "meta":
            paths[schema.domain_meta(uuid)] = value
        elif key.startswith("meta/"):
            paths[schema.domain_meta(uuid, key[5:])] = value
        else:
            paths[schema.domain_key(uuid, key)] = value
    return paths


# ---- cluster I/O -------------------------------------------------------------------------------


def node_version(schema, record) -> dict:
    """Expect the VM's ``node`` key unchanged since it was read (a migration request changes it)."""
    if record.node_version < 0:
        return {}
    return {schema.domain_key(record.uuid, S.DOMAIN_NODE): record.node_version}


def cpu_totals(store, names) -> dict[str, int]:
    """Each node's published CPU count; 0 when missing or not a sensible count."""
    names = list(names)
    found = store.get_many([store.schema.node_key(name, S.NODE_CPUTOTAL) for name in names])
    return {
        name: or_default(integer, text_of(found[path]), path, 0, [])
        for name, path in ((name, store.schema.node_key(name, S.NODE_CPUTOTAL)) for name in names)
    }


def running_on(store, uuid: str, nodes) -> list[str]:
    return [node for node in nodes if uuid in read_running(store, node)]


def wait_for_state(session, uuid: str, state: str, node: str, nodes, timeout_s: int) -> list[str]:
    """Wait until the daemon has brought the VM to ``state``; returns the nodes running it."""
    store, schema = session.store, session.schema
    # the VM's state is its desired state and the daemons' runstate record, combined
    paths = [schema.domain_key(uuid, S.DOMAIN_STATE), schema.domain_key(uuid, S.DOMAIN_RUNSTATE)]
    paths += [schema.node_key(name, S.NODE_RUNNINGDOMAINS) for name in nodes]
    runs = state in ("start", "restart")

    def condition():
        current = read_vm_state(store, uuid)
        where = running_on(store, uuid, nodes)
        if current == "fail" and runs:
            return ("fail", where)
        if runs and current == "start" and node in where:
            return ("ok", where)
        if not runs and current in SATISFIED_BY[state] and current != "shutdown" and not where:
            return ("ok", where)
        return None

    outcome = watch_until(store, paths, condition, timeout_s)
    if outcome is None:
        current = read_vm_state(store, uuid)
        where = running_on(store, uuid, nodes)
        node_state = read_node_state(store, node) if node else None
        daemon = node_state.daemon_state if node_state else None
        raise ModuleFailure(
            f"VM {uuid}: not {'running on ' + node if runs else 'stopped'} after {timeout_s} s "
            f"(state {current}, running on {', '.join(where) or 'no node'}, daemon of {node} is {daemon}); "
            "the request stays recorded and the daemon still acts on it"
        )
    if outcome[0] == "fail":
        reason = store.find_text(schema.domain_key(uuid, S.DOMAIN_FAILEDREASON)) or "no reason recorded"
        raise ModuleFailure(f"VM {uuid} failed to start on {node}: {reason}")
    return outcome[1]


def remove(module, session, current, nodes) -> dict:
    schema = session.schema
    if current.migration:
        raise ModuleFailure(
            f"VM {current.name} has a migration in flight ({current.migration.source} -> "
            f"{current.migration.target}, step {current.migration.step}); remove it when it is over"
        )
    before = vm_summary(current)
    result = {"changed": True, "action": "remove", "vm": {}}
    if module._diff:
        result["diff"] = [{"before": before, "after": {}}]
    if module.check_mode:
        return result
    where = running_on(session.store, current.uuid, nodes)
    params = module.params
    if current.state not in S.VM_STOPPED_STATES or where:
        if current.state != "stop":
            session.commit(
                {schema.domain_key(current.uuid, S.DOMAIN_STATE): "stop"},
                expect_versions=node_version(schema, current),
                what=f"state stop of VM {current.name}",
            )
        if params["wait"]:
            try:
                wait_for_state(session, current.uuid, "stop", current.node, nodes, params["wait_timeout"])
            except ModuleFailure as exc:
                exc.msg += "; the VM was not removed (its state is now stop)"
                exc.result.setdefault("changed", current.state != "stop")
                raise
    # with the reservation its node may still hold for it (not yet counted by the node's keepalive)
    gone = [schema.domain(current.uuid)] + (
        [schema.node_reservation(current.node, current.uuid)] if current.node else []
    )
    session.commit(
        {}, delete=gone, expect_versions=node_version(schema, current), what=f"the removal of VM {current.name}"
    )
    return result


def run(module, session, info) -> dict:
    params = module.params
    store, schema = session.store, session.schema
    nodes = read_node_views(store)
    updates = meta_updates(params, node_names=nodes)
    if info is not None:
        current = read_vm(store, info.uuid)
        other = find_vm(store, info.name)
        if other is not None and other != info.uuid:
            raise ModuleFailure(f"the name {info.name} is already used by VM {other}; the XML defines uuid {info.uuid}")
    else:
        uuid = find_vm(store, params["name"])
        current = read_vm(store, uuid) if uuid else None

    if params["state"] == "absent":
        if current is None:
            return {"changed": False, "action": "none", "vm": {}}
        return remove(module, session, current, sorted(nodes))
    if current is not None and (not current.node or not current.state):
        raise ModuleFailure(
            f"VM {current.uuid} is incomplete in ZooKeeper (node {current.node!r}, state {current.state!r}); "
            "remove it with state=absent, then define it again"
        )

    if current is None:
        if info is None:
            raise ModuleFailure(f"VM {params['name']} does not exist; to define it, give its domain XML in xml")
        plan = plan_create(
            params, info, updates, nodes, store.find_text(schema.default_selector()), cpu_totals(store, nodes)
        )
        expect, create = {}, [schema.domain(info.uuid)]
        policy = params.get("require_n1")
        if plan.values["state"] in NEEDS_READY_NODE and (read_require_n1(store, []) if policy is None else policy):
            snapshot = read_cluster(store)
            check = allocation_check(
                snapshot.views(), snapshot.running_memory_by_node(), plan.values["node"], info.memory_mib
            )
            if not check.ok:
                raise ModuleFailure(
                    n1_refusal(check, f"starting VM {info.name} on node {plan.values['node']}"),
                    survives_node_failure={
                        "ok": False,
                        "message": check.message,
                        "failures": check.failures,
                        "shortfalls": check.shortfalls,
                    },
                )
    else:
        plan = plan_update(params, info, updates, current, nodes, cpu_totals(store, [current.node]) if info else {})
        expect, create = node_version(schema, current), []
    for warning in plan.warnings:
        module.warn(warning)

    result = {"changed": plan.changed, "action": plan.action}
    if module._diff:
        result["diff"] = plan.diff()
    if plan.changed and not module.check_mode:
        paths = plan_paths(schema, plan)
        if current is not None and info is not None and info.memory_mib > current.memory_mib:
            # counted at once: a reservation of the new size until the node's keepalive counts it
            try:
                grown, grown_expect, grown_create = growth_reservation(store, current, info.memory_mib)
            except RequestError as exc:
                raise ModuleFailure(str(exc)) from None
            paths.update(grown)
            expect = {**expect, **grown_expect}
            create = create + grown_create
        session.commit(
            paths,
            expect_versions=expect,
            create=create,
            what=f"the {'definition' if plan.action == 'create' else 'update'} of VM {plan.name}",
        )

    if module.check_mode:
        if current is None:
            vm = dict(plan.after)
        else:
            vm = vm_summary(current)
            vm.update({key: value for key, value in plan.values.items() if key in ("name", "state")})
            if "meta" in plan.differences.changed_keys:
                vm["meta"].update(plan.differences.after()["meta"])
        vm["running_on"] = running_on(store, plan.uuid, sorted(nodes))
        result["vm"] = vm
        return result

    record = read_vm(store, plan.uuid)
    if record is None:
        raise ModuleFailure(
            f"VM {plan.name} was removed by someone else right after this task wrote it", changed=plan.changed
        )
    state = STATE_MAP.get(params["state"])
    where = None
    if params["wait"] and state is not None:
        try:
            where = wait_for_state(session, plan.uuid, state, record.node, sorted(nodes), params["wait_timeout"])
        except ModuleFailure as exc:
            exc.result.setdefault("changed", plan.changed)
            raise
        record = read_vm(store, plan.uuid)
    vm = vm_summary(record)
    vm["running_on"] = where if where is not None else running_on(store, plan.uuid, sorted(nodes))
    result["vm"] = vm
    return result


def main():
    module = build_module(ARGUMENT_SPEC, required_one_of=[["name", "xml"]])
    info = check_before_connecting(module, parse_input, meta_updates)
    exit_from_session(module, run, info)


if __name__ == "__main__":
    main()
