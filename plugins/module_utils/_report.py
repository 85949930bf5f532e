# -*- coding: utf-8 -*-
# Copyright: pvc.cluster developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
#
# PRIVATE: this module is internal to the pvc.cluster collection.
# It may change without notice; do not import it from other collections.
"""What the info modules and the inventory plugin report about nodes and VMs, defined once.

The ``*_report`` functions turn the shared typed reads (``_cluster``) into plain dicts (JSON-safe,
memory in MiB). :func:`read_cluster` reads everything in one pass for reports that need the whole
cluster (memory accounting of a node names the VMs assigned to it and running on it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from . import _schema as S
from ._cluster import node_names, read_history, read_nodes_raw, read_vms, vm_uuids
from ._decode import MAX_MIB, Invalid, boolean, integer, number, or_default
from ._meta import VMMeta
from ._records import fence_record, flush_halted, maintenance, recovery_n1, running_domains
from ._selector import FailureCheck, NodeView, migration_check, resolve_selector, survives_node_failure


def meta_dict(meta: VMMeta) -> dict:
    """A VM's meta as module options spell them (node_limit a list)."""
    return {
        S.META_MIGRATION_METHOD: meta.migration_method,
        S.META_NODE_SELECTOR: meta.node_selector,
        S.META_NODE_LIMIT: list(meta.node_limit),
        S.META_NODE_AUTOSTART: meta.node_autostart,
        S.META_MIGRATION_MAX_DOWNTIME_MS: meta.migration_max_downtime_ms,
        S.META_MIGRATION_AUTO_CONVERGE: meta.migration_auto_converge,
    }


def memory_report(
    raw: dict, reservations: dict[str, int], view: NodeView | None = None, problems: list | None = None
) -> dict:
    """A node's memory accounting in MiB (see docs/architecture.md, Memory accounting).
    ``view``: the node's view, when the caller has built it; ``problems``: where an invalid
    stored figure is added (it reads as 0)."""
    view = view or NodeView.from_store("", raw, sum(reservations.values()))
    return {
        "total": view.memtotal,
        "used": view.memused,
        "free": view.memfree,
        "allocated": or_default(
            integer,
            raw.get(S.NODE_MEMALLOC),
            f"nodes/{view.name}/{S.NODE_MEMALLOC}",
            0,
            [] if problems is None else problems,
            maximum=MAX_MIB,
        ),
        "provisioned": view.memprov,
        "reserve": view.memreserve,
        "reserved": view.reserved,
        "reservations": dict(sorted(reservations.items())),
        "headroom": view.headroom,
    }


@dataclass
class ClusterSnapshot:
    """Every node (raw keys, reservations, alive) and every VM, read once."""

    nodes: dict[str, dict] = field(default_factory=dict)
    reservations: dict[str, dict[str, int]] = field(default_factory=dict)
    alive: dict[str, bool] = field(default_factory=dict)
    vms: dict = field(default_factory=dict)  # uuid -> VMRecord
    invalid: dict[str, list] = field(default_factory=dict)  # node -> Invalid of stored values read as 0
    default_selector: str | None = None
    schema_version: str | None = None
    require_n1: bool = False  # the cluster setting (/config/require_n1); invalid reads as false

    def views(self) -> dict[str, NodeView]:
        return {
            name: NodeView.from_store(name, raw, sum(self.reservations.get(name, {}).values()))
            for name, raw in self.nodes.items()
        }

    def running(self, node: str) -> list[str]:
        """The VMs ``node`` reports running; none when its report is not valid (node_report
        names it)."""
        value = self.nodes.get(node, {}).get(S.NODE_RUNNINGDOMAINS)
        return list(or_default(running_domains, value, f"nodes/{node}/{S.NODE_RUNNINGDOMAINS}", (), []))

    def running_on(self, uuid: str) -> list[str]:
        return [node for node in sorted(self.nodes) if uuid in self.running(node)]

    def name_of(self, uuid: str) -> str:
        vm = self.vms.get(uuid)
        return vm.name if vm is not None else uuid

    def running_memory_by_node(self) -> dict[str, list[int]]:
        """Memory (MiB) of the known VMs each node reports running: what a node failure displaces."""
        result = {}
        for node in self.nodes:
            result[node] = [self.vms[uuid].memory_mib for uuid in self.running(node) if uuid in self.vms]
        return result


def read_cluster(store, nodes: list[str] | None = None, vms: list[str] | None = None) -> ClusterSnapshot:
    """Read nodes and VMs (all of them, or the given names / uuids)."""
    snapshot = ClusterSnapshot()
    schema = store.schema
    # a few rounds of parallel reads in all, however many nodes and VMs
    everyone = node_names(store) if nodes is None else None
    for name, (raw, reservations, alive) in read_nodes_raw(
        store, everyone if nodes is None else nodes, snapshot.invalid, everyone
    ).items():
        snapshot.nodes[name] = raw
        snapshot.reservations[name] = reservations
        snapshot.alive[name] = alive
    snapshot.vms.update(read_vms(store, vm_uuids(store) if vms is None else vms))
    snapshot.default_selector = store.find_text(schema.default_selector())
    snapshot.require_n1 = read_require_n1(store, [])  # an invalid setting reads as false
    snapshot.schema_version = store.find_text(schema.schema_version())
    return snapshot


def read_require_n1(store, problems: list) -> bool:
    """The cluster setting require_n1 (``true``/``false``; missing or invalid: false, an invalid
    one added to ``problems``)."""
    path = store.schema.require_n1()
    return bool(or_default(boolean, store.find_text(path), path, False, problems))


def n1_policy(option: bool | None, snapshot: ClusterSnapshot) -> bool:
    """Whether the N-1 policy applies: the module option when given, else the cluster setting."""
    return snapshot.require_n1 if option is None else bool(option)


N1_VERBS = {"migrate": "migrating", "move": "moving", "unmigrate": "returning"}


def request_n1_check(snapshot: ClusterSnapshot, plan, views: dict[str, NodeView] | None = None) -> FailureCheck:
    """The n-1 check of the cluster (``snapshot``, from read_cluster; ``views``: its node views
    when the caller adjusts them) once the request ``plan`` (_requests.RequestPlan) has moved its
    running VM. The source gives the VM's memory back from its reservations when it still covers
    the VM with one (not yet folded into its memprov), else from its memprov. The modules and the
    daemon's ready check requests with it."""
    source_reserved = plan.uuid in snapshot.reservations.get(plan.source, {})
    return migration_check(
        snapshot.views() if views is None else views,
        snapshot.running_memory_by_node(),
        plan.source,
        plan.target,
        plan.memory_mib,
        source_reserved=source_reserved,
    )


def request_n1_refusal(check: FailureCheck, plan) -> str:
    """The message that refuses the request ``plan`` under require_n1."""
    return n1_refusal(check, f"{N1_VERBS.get(plan.kind, 'moving')} VM {plan.name} from {plan.source} to {plan.target}")


def n1_refusal(check, what: str) -> str:
    """The message that refuses ``what`` under require_n1: each node whose loss could not be
    absorbed, and by how much."""
    return (
        f"{what} would leave the cluster unable to restart every running VM after the loss of any one node "
        f"(require_n1): {check.message}"
    )


def verdict_report(raw: dict, name: str, problems: list, key: str = S.NODE_FLUSH_HALTED) -> str | None:
    """A node's verdict ``key`` (``flush_halted``, ``recovery_n1``), or None when there is none; a
    stored verdict that is not valid still says there is one (and is listed in ``problems``)."""
    value = raw.get(key)
    if not value:
        return None
    path = f"nodes/{name}/{key}"
    decoder = recovery_n1 if key == S.NODE_RECOVERY_N1 else flush_halted
    try:
        return decoder(value, path)
    except Invalid as exc:
        problems.append(exc)
        return f"(its verdict is not valid: {exc})"


def node_report(snapshot: ClusterSnapshot, name: str, now: float | None = None) -> dict:
    raw = snapshot.nodes[name]
    reservations = snapshot.reservations.get(name, {})
    view = NodeView.from_store(name, raw, sum(reservations.values()))
    problems = list(view.invalid)
    or_default(running_domains, raw.get(S.NODE_RUNNINGDOMAINS), f"nodes/{name}/{S.NODE_RUNNINGDOMAINS}", (), problems)
    keepalive = or_default(number, raw.get(S.NODE_KEEPALIVE), f"nodes/{name}/{S.NODE_KEEPALIVE}", 0.0, problems)
    now = time.time() if now is None else now
    running = snapshot.running(name)
    assigned = sorted(vm.name for vm in snapshot.vms.values() if vm.node == name)
    return {
        "name": name,
        "daemon_state": raw.get(S.NODE_DAEMON_STATE) or S.NODE_DEFAULTS[S.NODE_DAEMON_STATE],
        "domain_state": raw.get(S.NODE_DOMAIN_STATE) or S.NODE_DEFAULTS[S.NODE_DOMAIN_STATE],
        "flush_halted": verdict_report(raw, name, problems),
        "recovery_n1": verdict_report(raw, name, problems, S.NODE_RECOVERY_N1),
        "libvirt": view.libvirt,
        "maintenance": or_default(
            maintenance, raw.get(S.NODE_MAINTENANCE), f"nodes/{name}/{S.NODE_MAINTENANCE}", False, problems
        ),
        "fence": or_default(fence_record, raw.get(S.NODE_FENCE), f"nodes/{name}/{S.NODE_FENCE}", {}, problems),
        "alive": snapshot.alive.get(name, False),
        "keepalive": keepalive,
        "keepalive_age_s": round(now - keepalive, 3) if keepalive else None,
        "memory": memory_report(
            raw, {snapshot.name_of(uuid): mib for uuid, mib in reservations.items()}, view, problems
        ),
        "vcpualloc": view.vcpualloc,
        "cputotal": or_default(integer, raw.get(S.NODE_CPUTOTAL), f"nodes/{name}/{S.NODE_CPUTOTAL}", 0, problems),
        "cpuload": view.cpuload,
        "domaincount": view.domaincount,
        "running_vms": sorted(snapshot.name_of(uuid) for uuid in running),
        "assigned_vms": assigned,
        "returning_vms": sorted(vm.name for vm in snapshot.vms.values() if vm.lastnode == name and vm.node != name),
        "address": raw.get(S.NODE_ADDRESS) or "",
        "libvirt_uri": raw.get(S.NODE_LIBVIRT_URI) or "",
        "transport_uri": raw.get(S.NODE_TRANSPORT_URI) or "",
        "invalid": [str(problem) for problem in snapshot.invalid.get(name, []) + problems],
    }


def vm_report(snapshot: ClusterSnapshot, uuid: str, history: list[dict] | None = None) -> dict:
    vm = snapshot.vms[uuid]
    return {
        "name": vm.name,
        "uuid": vm.uuid,
        "state": vm.state,
        "desired_state": vm.desired_state,
        "autostart": vm.autostart,
        "node": vm.node,
        "lastnode": vm.lastnode,
        "home": vm.home,
        "running_on": snapshot.running_on(uuid),
        "failedreason": vm.failedreason,
        "memory_mib": vm.memory_mib,
        "vcpus": vm.vcpus,
        "meta": meta_dict(vm.meta),
        "meta_warnings": list(vm.meta.warnings),
        "migration": vm.migration.to_dict() if vm.migration else None,
        "migration_error": vm.migration_error,
        "history": history or [],
        "xml": vm.xml,
        "xml_error": vm.xml_error,
        "stats": vm.stats,
        "invalid": [str(problem) for problem in vm.invalid],
    }


def vm_history(store, uuid: str, last: int) -> list[dict]:
    """The last ``last`` finished migrations of a VM, newest first."""
    return list(reversed(read_history(store, uuid, last=last))) if last else []


def cluster_report(snapshot: ClusterSnapshot) -> dict:
    """Cluster-wide figures: default selector, schema version and the n-1 check."""
    check = survives_node_failure(snapshot.views(), snapshot.running_memory_by_node())
    return {
        "default_selector": resolve_selector("default", snapshot.default_selector),
        "require_n1": snapshot.require_n1,
        "schema_version": snapshot.schema_version,
        "nodes": len(snapshot.nodes),
        "vms": len(snapshot.vms),
        "survives_node_failure": check.to_dict(),
    }
