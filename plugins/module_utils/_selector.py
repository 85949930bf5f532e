# -*- coding: utf-8 -*-
# Copyright: pvc.cluster developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
#
# PRIVATE: this module is internal to the pvc.cluster collection and its node daemon.
# It may change without notice; do not import it from other collections.
"""Target selection, flush plans and the n-1 check: pure logic, standard library only, no I/O.

The daemon and the modules use these functions and nothing else to choose where a VM goes, so a
check-mode plan and the daemon's real choice follow the same rules.

Candidates
    A node can take a VM when, checked in this order (the first failure is the reason reported):
    it is not the VM's current node; it is not excluded by the caller; it is inside the VM's
    ``node_limit`` (empty = any node); its daemon state is ``run``; its domain state is ``ready``;
    its daemon's connection to libvirt is ``ok`` (a node whose libvirtd is down or hung could not
    receive the VM; a node that does not publish it, an older daemon, counts as ``ok``); and the
    VM fits: ``vm memory <= headroom``, where headroom = memtotal - memreserve - memprov -
    in-flight reservations (MiB). Unlike upstream, a node that cannot hold the VM is never chosen.

Selectors (the best candidate wins)
    ``mem``      most headroom (upstream's provfree rule, plus host reserve and reservations);
    ``memfree``  most free host memory (``memfree`` as reported by the node);
    ``load``     lowest 1-minute load average;
    ``vcpus``    fewest allocated vCPUs;
    ``vms``      fewest running domains;
    ``fit``      packs and balances, in this order: a node the VM fills to within FIT_EXACT_MIB of
                 its headroom (the tightest such fit, on a tight cluster the smallest such node:
                 see the block rule; it closes a gap no other VM might fill);
                 when the candidates would have less than FIT_TIGHT_SHARE of their capacity
                 (memtotal - memreserve) left after the VM, the *block rule* (below); otherwise
                 the largest share of capacity free after the VM ((headroom - VM) / capacity:
                 it balances nodes of different sizes). On tight clusters it places far more
                 memory than ``mem``, whose most-headroom rule leaves small gaps everywhere, and
                 leaves the nodes more balanced than best fit (``make bench``, p). A flush plan
                 has no exact-fit rule and uses, on tight clusters, the spread rule (the node
                 after which the variance of the free shares is least), and where that would
                 lose n-1, per VM the first target in that order that keeps it (see
                 :func:`plan_flush`);
    ``default``  the cluster default (``default_selector``, itself ``mem`` when unset).

The block rule (tight clusters, one VM at a time)
    Each node's headroom is read as a buddy allocator reads free memory: aligned blocks of
    power-of-two sizes (MiB). Placing the VM takes its size off the headroom, and the largest
    block it breaks is the highest bit in which the headroom before and after differ
    (``(headroom ^ (headroom - VM)).bit_length()``). The node where that block is smallest wins:
    the VM goes where it costs the least room for larger VMs, as best fit would, but only as far
    as power-of-two sizes tell (a 20 GiB gap and a 28 GiB gap both hold one 16 GiB block; a 6 GiB
    VM breaks it on the 20 GiB node, 14 GiB left, but only an 8 GiB block on the 28 GiB one, 22
    GiB left, and goes there, where best fit would take the 20). Among nodes where it breaks
    the same block, the smallest capacity wins, then the largest free share after the VM: the
    blocks kept for large VMs that never come are what is left free at the end, and a block left
    on a large node is a smaller share of it (16 GiB is 4 points of a 384 GiB node, 12.5 of a
    128 GiB one), so small nodes are filled first and the free memory left ends more even
    (``make bench``, p). For the same reason, exact fits on a tight cluster go to the smallest
    node first (then the least left; a flush plan takes the tightest). Plain best fit
    starves a node whose gap is large but just too small for the largest VMs (small VMs always
    find a tighter gap elsewhere, and that node alone is left half empty); the block rule gives
    it small VMs whenever they do not break a larger block there. O(1) per node.

Ties
    Broken by headroom (more first), then by node name (plain string order, so ``node10`` sorts
    before ``node2``). The choice is therefore deterministic and independent of the order in
    which nodes are listed.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

from ._decode import MAX_MIB, Invalid, choice, integer, number, or_default
from ._memory import headroom_mib
from ._meta import CLUSTER_DEFAULT_SELECTOR, CONCRETE_SELECTORS, MetaError, parse_node_limit, parse_node_selector
from ._schema import (
    DAEMON_STATES,
    DOMAIN_STATES,
    LIBVIRT_HEALTH,
    LIBVIRT_OK,
    NODE_CPULOAD,
    NODE_DAEMON_STATE,
    NODE_DEFAULTS,
    NODE_DOMAINCOUNT,
    NODE_DOMAIN_STATE,
    NODE_LIBVIRT,
    NODE_MEMFREE,
    NODE_MEMPROV,
    NODE_MEMRESERVE,
    NODE_MEMTOTAL,
    NODE_MEMUSED,
    NODE_VCPUALLOC,
)

RUN = "run"
READY = "ready"
# the ``fit`` selector (see above)
FIT_EXACT_MIB = 1024
# Below this share of the candidates' capacity free after the VM, the block rule decides. 0.3 was
# the smallest share that placed the most memory on tuning snapshots generated like bench p's but
# with other seeds (20-39 at 10 nodes, 20-25 at 100): 0.12 placed 97.3 % with a spread of 0.49
# points at 10 nodes, 0.2 97.8 % / 0.33, 0.3 98.0 % / 0.26, and 1.0 (the rule always) the same.
FIT_TIGHT_SHARE = 0.3


# ---- node view ------------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeView:
    """What placement needs to know about one node. Memory in MiB.

    ``reserved`` is the sum of the node's in-flight incoming-migration reservations.
    """

    name: str
    daemon_state: str = NODE_DEFAULTS[NODE_DAEMON_STATE]
    domain_state: str = NODE_DEFAULTS[NODE_DOMAIN_STATE]
    memtotal: int = 0
    memused: int = 0
    memfree: int = 0
    memprov: int = 0
    memreserve: int = 0
    reserved: int = 0
    cpuload: float = 0.0
    vcpualloc: int = 0
    domaincount: int = 0
    libvirt: str = LIBVIRT_OK  # LIBVIRT_HEALTH, or "invalid" for a stored value that is not valid
    # stored values that were not valid and read as their default (0), each naming its key
    invalid: tuple[Invalid, ...] = field(default=(), compare=False)

    @property
    def headroom(self) -> int:
        """memtotal - memreserve - memprov - reserved; negative when overcommitted."""
        return headroom_mib(self.memtotal, self.memreserve, self.memprov, self.reserved)

    @property
    def capacity(self) -> int:
        """What the node gives VMs: memtotal - memreserve."""
        return self.memtotal - self.memreserve

    @property
    def is_eligible(self) -> bool:
        """Whether the node takes VMs at all: daemon state ``run``, domain state ``ready`` and
        libvirt ``ok``."""
        return self.daemon_state == RUN and self.domain_state == READY and self.libvirt == LIBVIRT_OK

    # the stored node keys a view is built from (read_node_views_of reads only these)
    KEYS = (
        NODE_DAEMON_STATE,
        NODE_DOMAIN_STATE,
        NODE_MEMTOTAL,
        NODE_MEMUSED,
        NODE_MEMFREE,
        NODE_MEMPROV,
        NODE_MEMRESERVE,
        NODE_CPULOAD,
        NODE_VCPUALLOC,
        NODE_DOMAINCOUNT,
        NODE_LIBVIRT,
    )
    # the keys that decide whether a VM fits (rejection_reasons: eligibility and headroom)
    FIT_KEYS = (NODE_DAEMON_STATE, NODE_DOMAIN_STATE, NODE_MEMTOTAL, NODE_MEMPROV, NODE_MEMRESERVE, NODE_LIBVIRT)

    @classmethod
    def from_store(
        cls, name: str, raw: Mapping[str, str | None], reservations_mib: int = 0, prefix: str | None = None
    ) -> NodeView:
        """Build from a node's stored keys; never raises.

        Numbers are decoded with bounds (_decode): a missing one reads as 0, and so does an
        invalid one, which is also listed in ``invalid`` (so a node with garbage ``memtotal`` has
        negative headroom and is never chosen). Missing or invalid states read as the schema's
        defaults for a new node (``init`` / ``flushed``), which are not eligible. A missing libvirt
        health (a daemon that does not publish it) reads as ``ok``; an invalid one as ``invalid``,
        which is not eligible. ``prefix``: how the
        keys are named in ``invalid`` (default ``nodes/<name>/``).
        """
        prefix = f"nodes/{name}/" if prefix is None else prefix
        problems: list[Invalid] = []

        def state(key: str, choices: tuple[str, ...]) -> str:
            value = raw.get(key)
            return or_default(choice, value or None, prefix + key, NODE_DEFAULTS[key], problems, choices=choices)

        def mib(key: str) -> int:
            return or_default(integer, raw.get(key), prefix + key, 0, problems, maximum=MAX_MIB)

        def count(key: str) -> int:
            return or_default(integer, raw.get(key), prefix + key, 0, problems)

        return cls(
            name=name,
            daemon_state=state(NODE_DAEMON_STATE, DAEMON_STATES),
            domain_state=state(NODE_DOMAIN_STATE, DOMAIN_STATES),
            memtotal=mib(NODE_MEMTOTAL),
            memused=mib(NODE_MEMUSED),
            memfree=mib(NODE_MEMFREE),
            memprov=mib(NODE_MEMPROV),
            memreserve=mib(NODE_MEMRESERVE),
            reserved=int(reservations_mib),
            cpuload=or_default(number, raw.get(NODE_CPULOAD), prefix + NODE_CPULOAD, 0.0, problems),
            vcpualloc=count(NODE_VCPUALLOC),
            domaincount=count(NODE_DOMAINCOUNT),
            libvirt=or_default(
                choice, raw.get(NODE_LIBVIRT), prefix + NODE_LIBVIRT, "invalid", problems, choices=LIBVIRT_HEALTH
            )
            if raw.get(NODE_LIBVIRT) is not None
            else LIBVIRT_OK,
            invalid=tuple(problems),
        )


# ---- errors ---------------------------------------------------------------------------------


def _format_reasons(reasons: Mapping[str, str]) -> str:
    return "; ".join(f"{node}: {reason}" for node, reason in sorted(reasons.items()))


class NoTargetError(Exception):
    """No node can take the VM. ``reasons`` maps every node considered to why it was rejected."""

    def __init__(
        self, reasons: Mapping[str, str], vm_memory_mib: int | None = None, selector: str | None = None
    ) -> None:
        self.reasons = dict(reasons)
        self.vm_memory_mib = vm_memory_mib
        self.selector = selector
        what = "no target node"
        if vm_memory_mib is not None:
            what += f" for a VM of {vm_memory_mib} MiB"
        if selector is not None:
            what += f" (selector {selector})"
        detail = _format_reasons(self.reasons) if self.reasons else "the cluster has no nodes"
        super().__init__(f"{what}: {detail}")


# ---- rules (defined once; every function below uses them) -----------------------------------


def resolve_selector(selector: str | None, default_selector: str | None = CLUSTER_DEFAULT_SELECTOR) -> str:
    """The concrete selector for ``selector``; ``default``/None resolve to ``default_selector``.

    Raises ValueError (a :class:`MetaError`) for an unknown selector: callers pass normalised meta.
    An unknown or ``default`` ``default_selector`` falls back to ``mem``.
    """
    concrete = parse_node_selector(selector)
    if concrete != "default":
        return concrete
    try:
        concrete = parse_node_selector(default_selector)
    except MetaError:
        return CLUSTER_DEFAULT_SELECTOR
    return concrete if concrete in CONCRETE_SELECTORS else CLUSTER_DEFAULT_SELECTOR


def _format_limit(node_limit: Sequence[str]) -> str:
    return "[" + ", ".join(node_limit) + "]"


def _static_rejection(
    node: NodeView, current_node: str | None, limit: frozenset[str] | None, limit_text: str, exclude: frozenset[str]
) -> str | None:
    """Why ``node`` can never take the VM, whatever its memory; None when it could."""
    if node.name == current_node:
        return "is the VM's current node"
    if node.name in exclude:
        return "is excluded"
    if limit is not None and node.name not in limit:
        return f"not in node_limit {limit_text}"
    if node.daemon_state != RUN:
        return f"daemon state is {node.daemon_state}, not run"
    if node.domain_state != READY:
        return f"domain state is {node.domain_state}, not ready"
    if node.libvirt != LIBVIRT_OK:
        return f"libvirt is {node.libvirt} on the node, not ok (its daemon cannot reach its libvirtd)"
    return None


def _fit_rejection(vm_memory_mib: int, headroom: int) -> str | None:
    if vm_memory_mib > headroom:
        return f"needs {vm_memory_mib} MiB, has {headroom} MiB headroom"
    return None


# Sort key of a candidate, by concrete selector: the smallest key wins. Arguments: anything with
# the NodeView attributes name, memfree, cpuload, vcpualloc and domaincount, and its headroom.
# The last two elements are the documented tie-breaks (headroom desc, then name asc).
# A node's place in a selector's order (smallest first): a tuple of numbers, then its name.
SortKey = tuple[Any, ...]

_KEYS: dict[str, Callable[[Any, int], SortKey]] = {  # (NodeView or _Slot, headroom) -> SortKey
    "mem": lambda n, h: (-h, 0, n.name),
    "memfree": lambda n, h: (-n.memfree, -h, n.name),
    "load": lambda n, h: (n.cpuload, -h, n.name),
    "vcpus": lambda n, h: (n.vcpualloc, -h, n.name),
    "vms": lambda n, h: (n.domaincount, -h, n.name),
    # fit's balancing rule (its fit rules come first: _fit_choice, plan_flush)
    "fit": lambda n, h: (-(h / n.capacity) if n.capacity > 0 else 0.0, -h, n.name),
}


def _is_tight(slack_mib: int, capacity_mib: int, vm_memory_mib: int) -> bool:
    """Whether the candidates would have less than FIT_TIGHT_SHARE of their capacity left."""
    return slack_mib - vm_memory_mib < FIT_TIGHT_SHARE * capacity_mib


def _share_after(headroom: int, capacity: int, vm_memory_mib: int) -> float:
    """A node's free share once the VM is on it (fit's balancing rule: the largest wins)."""
    return (headroom - vm_memory_mib) / capacity if capacity > 0 else 0.0


def _block_key(headroom: int, capacity: int, vm_memory_mib: int, name: str) -> SortKey:
    """fit's block rule on a tight cluster (smallest first; see the module docstring): the
    largest power-of-two block the VM breaks, then the smallest capacity, then the largest free
    share after it, then the documented tie-breaks."""
    return (
        (headroom ^ (headroom - vm_memory_mib)).bit_length(),
        capacity,
        -_share_after(headroom, capacity, vm_memory_mib),
        -headroom,
        name,
    )


def _balance_key(headroom: int, capacity: int, vm_memory_mib: int, name: str) -> SortKey:
    """fit's balancing rule (smallest first): the largest free share after the VM, then the
    documented tie-breaks."""
    return (-_share_after(headroom, capacity, vm_memory_mib), -headroom, name)


def _limit(node_limit: Sequence[str] | str | None) -> tuple[str, ...]:
    """A node_limit as a tuple of unique names; a string is read like the stored meta value."""
    if not node_limit:
        return ()
    if isinstance(node_limit, str):
        return parse_node_limit(node_limit)
    return tuple(dict.fromkeys(node_limit))


def _as_list(nodes: Iterable[NodeView] | Mapping[str, NodeView]) -> list[NodeView]:
    if isinstance(nodes, Mapping):
        return list(nodes.values())
    return list(nodes)


# ---- one VM ---------------------------------------------------------------------------------


def rejection_reasons(
    vm_memory_mib: int,
    current_node: str | None,
    node_limit: Sequence[str] | str | None,
    nodes: Iterable[NodeView] | Mapping[str, NodeView],
    *,
    exclude: Iterable[str] = (),
) -> dict[str, str | None]:
    """For every node (and every node_limit name that is no node), why it cannot take the VM.

    The value is None for a node that can take it. For check mode and diagnostics.
    """
    node_list = _as_list(nodes)
    node_limit = _limit(node_limit)
    limit = frozenset(node_limit) if node_limit else None
    limit_text = _format_limit(node_limit) if node_limit else ""
    excluded = frozenset(exclude)
    result: dict[str, str | None] = {}
    for node in node_list:
        result[node.name] = _static_rejection(node, current_node, limit, limit_text, excluded) or _fit_rejection(
            vm_memory_mib, node.headroom
        )
    for name in node_limit or ():
        if name not in result:
            result[name] = "in node_limit but not a cluster node"
    return result


def select_target(
    vm_memory_mib: int,
    current_node: str | None,
    node_limit: Sequence[str] | str | None,
    selector: str | None,
    nodes: Iterable[NodeView] | Mapping[str, NodeView],
    *,
    default_selector: str | None = CLUSTER_DEFAULT_SELECTOR,
    exclude: Iterable[str] = (),
) -> str:
    """The node a VM of ``vm_memory_mib`` MiB should go to.

    ``current_node`` is the node the VM is on (or None for a VM not placed yet); it is never the
    answer. ``node_limit`` empty or None means any node. ``selector`` is the VM's node_selector
    (``default``/None = ``default_selector``). ``exclude`` names further nodes that must not be
    chosen. One pass over the nodes. Raises :class:`NoTargetError` with a reason for every node
    when there is no candidate, and ValueError for an unknown selector.
    """
    concrete = resolve_selector(selector, default_selector)
    key_of = _KEYS[concrete]
    fit = concrete == "fit"
    # fit: the tightest fit (smallest leftover, then name), tracked in the one pass, and every
    # node the VM fits (headroom, capacity, name) for the block or the balancing rule, which
    # needs the candidates' totals (is the cluster tight?)
    slack = capacity = 0
    tightest: SortKey | None = None
    balanced: SortKey | None = None  # the balancing rule's best: (share after the VM, headroom, name)
    fitting: list[tuple[int, int, str]] = []
    node_list = _as_list(nodes)
    node_limit = _limit(node_limit)
    limit = frozenset(node_limit) if node_limit else None
    limit_text = _format_limit(node_limit) if node_limit else ""
    excluded = frozenset(exclude)
    best_key: SortKey | None = None
    best_name = ""
    reasons: dict[str, str] = {}
    for node in node_list:
        name = node.name
        # Fast path for the common case; the reasons come from the shared rule functions.
        if (
            node.daemon_state == RUN
            and node.domain_state == READY
            and node.libvirt == LIBVIRT_OK
            and name != current_node
            and name not in excluded
            and (limit is None or name in limit)
        ):
            headroom = node.memtotal - node.memreserve - node.memprov - node.reserved  # NodeView.headroom, inlined
            if fit:
                node_capacity = node.memtotal - node.memreserve
                slack += headroom if headroom > 0 else 0
                capacity += node_capacity if node_capacity > 0 else 0
            if vm_memory_mib <= headroom:
                if fit:
                    left = headroom - vm_memory_mib
                    if tightest is None or left < tightest[0] or (left == tightest[0] and name < tightest[1]):
                        tightest = (left, name)
                    share = left / node_capacity if node_capacity > 0 else 0.0  # _share_after, inlined
                    if (
                        balanced is None
                        or share > balanced[0]
                        or (
                            share == balanced[0]
                            and (headroom > balanced[1] or (headroom == balanced[1] and name < balanced[2]))
                        )
                    ):
                        balanced = (share, headroom, name)
                    fitting.append((headroom, node_capacity, name))
                    continue
                key = key_of(node, headroom)
                if best_key is None or key < best_key:
                    best_key, best_name = key, name
                continue
            reasons[name] = _fit_rejection(vm_memory_mib, headroom) or ""
        else:
            reasons[name] = _static_rejection(node, current_node, limit, limit_text, excluded) or ""
    if tightest is not None and balanced is not None:  # both are set by the same fitting node
        tight = _is_tight(slack, capacity, vm_memory_mib)
        if tightest[0] < FIT_EXACT_MIB:
            if not tight:
                return str(tightest[1])
            # on a tight cluster, the smallest node among the exact fits (then the least left)
            return str(
                min(
                    (cap, headroom - vm_memory_mib, name)
                    for headroom, cap, name in fitting
                    if headroom - vm_memory_mib < FIT_EXACT_MIB
                )[-1]
            )
        if tight:
            return str(min(_block_key(headroom, cap, vm_memory_mib, name) for headroom, cap, name in fitting)[-1])
        return str(balanced[2])
    if best_key is not None:
        return best_name
    seen = {node.name for node in node_list}
    for name in node_limit or ():
        if name not in seen:
            reasons[name] = "in node_limit but not a cluster node"
    raise NoTargetError(reasons, vm_memory_mib=vm_memory_mib, selector=concrete)


def _spread_key(headroom: int, capacity: int, vm_memory_mib: int, mean_share: float, count: int, name: str) -> SortKey:
    """fit's spread rule in a flush plan on a tight cluster (smallest first): how much the VM on
    this node changes the sum of squared deviations of the ``count`` candidates' free shares
    (``mean_share`` their mean before it), then the documented tie-breaks. The VM takes
    ``d = VM / capacity`` off the node's share ``s``, which changes that sum by
    ``d * (d * (1 - 1 / count) - 2 * (s - mean_share))``: the node that leaves the population
    variance of the free shares (so their standard deviation, bench p's spread) least is first.
    O(1) per node; among nodes of one capacity, the one with the most headroom."""
    if capacity <= 0 or count <= 0:
        return (0.0, -headroom, name)
    taken = vm_memory_mib / capacity
    return (taken * (taken * (1.0 - 1.0 / count) - 2.0 * (headroom / capacity - mean_share)), -headroom, name)


# ---- flush plan -----------------------------------------------------------------------------


class FlushVM(NamedTuple):
    """A VM leaving a node. A plain tuple ``(uuid, memory_mib, node_limit, selector, home_node)``
    works too; ``vcpus`` (optional) keeps the ``vcpus`` selector accurate during the plan.

    ``home_node`` is where the VM returns when the flushed node is made ready again: its
    ``lastnode`` if it was moved away temporarily, else the flushed node itself.
    """

    uuid: str
    memory_mib: int
    node_limit: Sequence[str] | str | None
    selector: str | None
    home_node: str | None
    vcpus: int = 0


class PlannedMove(NamedTuple):
    """One line of a flush plan: ``target`` None means the VM fits nowhere."""

    uuid: str
    target: str | None
    reason: str


@dataclass
class _Slot:
    """Mutable per-node state during a plan; has the attributes the _KEYS functions read."""

    node: NodeView
    name: str
    headroom: int
    memfree: int
    cpuload: float
    vcpualloc: int
    domaincount: int
    version: int = 0
    capacity: int = 0

    def key(self, selector: str) -> SortKey:
        return _KEYS[selector](self, self.headroom)


def plan_flush(
    source_node: str,
    vms: Sequence[FlushVM | tuple[Any, ...]],
    nodes: Iterable[NodeView] | Mapping[str, NodeView],
    default_selector: str | None = CLUSTER_DEFAULT_SELECTOR,
    *,
    running_by_node: Mapping[str, Sequence[int]] | None = None,
    n1_every_selector: bool = False,
) -> list[PlannedMove]:
    """Plan where every VM leaving ``source_node`` goes, never overcommitting a node.

    Rules, in order:

    * VMs are planned largest first (ties: input order), so that big VMs get a place before small
      ones fill the gaps. The result is in this planned order, which is also the order in which
      the daemon should move them.
    * A VM whose ``home_node`` is another node that is a candidate for it (per the rules of
      :func:`select_target`) returns home, whatever its selector: that is where unflush would send
      it anyway, so it saves a second migration. The caller then clears its ``lastnode``.
    * Otherwise its selector chooses among the candidates exactly as :func:`select_target` does
      (``source_node`` is the current node and never a target), with one exception, ``fit``,
      which has no exact-fit rule in a plan and on a tight cluster (less than FIT_TIGHT_SHARE of
      the candidates' capacity free after the VM) uses the *spread rule*, not the block rule: the
      VM goes where the population variance of the candidates' free shares (headroom / capacity)
      is least after it (:func:`_spread_key`, O(1) per node from a running sum of the shares;
      the memory term of Ganeti hail's score); with room, the largest free share after the VM,
      as select_target without an exact fit. The block rule and exact fits keep room for larger
      VMs that may come later; in a plan, VMs come largest first, and an exact fit closes one
      node's gap whatever the other nodes' shares, which left bench p's flushed clusters less
      even (at 100 and 1,000 nodes a spread of 5.47 and 7.04 points with exact fits first and
      the balancing rule, hail's 4.70 and 6.63, the spread rule's 3.95 and 6.60, with as much
      placed). (The block rule per VM would also cost a pass over every node: too slow for a
      200-VM plan over 1,000 nodes.)
    * Each assignment is booked on the chosen node before the next VM is planned: its reserved
      memory grows by the VM's memory (headroom shrinks), as do its used memory (memfree
      shrinks), its domain count (+1) and its vCPUs. cpuload is left as it is (not predictable).
      So the memory planned onto a node never exceeds its headroom at the start of the plan.
    * A VM that fits nowhere gets target None and a reason; the flush shuts it down and marks it
      for autostart, so it starts again when its node is ready.
    * n-1 (when ``running_by_node`` is given: the memory of the VMs each node runs, the
      source's included, as :func:`apply_plan` takes it): balancing spreads the free memory, and
      with it the large gaps a failed node's VMs need. When ``fit`` balanced some VM (chose
      other than its tightest fit) and the cluster after the plan fails
      :func:`survives_node_failure`, the plan is made again n-1
      aware, per VM: each ``fit`` VM (with ``n1_every_selector``, every VM: HA recovery) takes
      the first of its N1_TRIES first targets, in its selector's order, whose booking makes no
      node fail the check that passed it (the source flushed, the VMs planned so far booked);
      when none of them does, that VM alone falls back: ``fit`` to the tightest fit (it keeps the
      largest gaps for the VMs still to come), the other selectors to their first choice, and
      the plan goes on. So the plan balances as far as n-1 allows, and each line's reason says
      when n-1 moved a VM or was lost. When a VM had to lose n-1 (a greedy choice can corner a
      later VM) and the cluster passed the check before, best fit throughout is returned if it
      passes the check; otherwise the n-1 aware plan when it leaves fewer nodes failing than the
      balanced plan, else the balanced plan. Without ``running_by_node`` (or when no VM was balanced) the balanced plan
      is returned unchecked. Deterministic either way.

    Cost: VMs without a node_limit use one lazily built heap per selector in use, and nodes too
    small for the current VM are parked until a small enough VM comes (VMs come largest first),
    so the whole plan costs O((n + v) log n) for n nodes and v VMs; ``fit`` looks at the node
    with the most headroom of each node capacity (the best by either rule among nodes of one
    capacity), so O(v (c + log n)) for c capacities; VMs with a node_limit look at their
    limit's nodes only. The n-1 rule adds one n-1 check per plan; when it fails, an n-1 aware
    plan whose bookings each cost an incremental check (:class:`_N1Tracker`: the target's own
    verdict and those of the nodes whose k + 1 largest headrooms include the target, most settled
    by two bounds found by bisection), and at most one more plan and check.
    """
    views = _as_list(nodes)
    first = _plan_once(source_node, vms, views, default_selector, pack=False)
    plan = first[0]
    if running_by_node is None or not (first[1] or n1_every_selector):
        return plan
    check = _plan_check(source_node, vms, plan, views, running_by_node)
    if check.ok:
        return plan
    selectors = None if n1_every_selector else ("fit",)
    second = _plan_once(
        source_node, vms, views, default_selector, pack=False, n1_running=running_by_node, n1_selectors=selectors
    )
    aware, tracker = second[0], second[2]
    if tracker is None or tracker.failing == tracker.start_failing:
        return aware
    # Some VM found no target among those tried that kept n-1 (a greedy choice per VM can corner
    # a later one): best fit throughout if it keeps n-1, else the n-1 aware plan if it leaves
    # fewer nodes failing, else the balanced plan (n-1 lost as much either way: the more even).
    if not tracker.start_failing:
        packed = _plan_once(source_node, vms, views, default_selector, pack=True)[0]
        if _plan_check(source_node, vms, packed, views, running_by_node).ok:
            return packed
    return aware if len(tracker.failing) < len(check.failures) else plan


# ---- n-1 during a plan ----------------------------------------------------------------------

# How many of a VM's targets, in its selector's order, an n-1 aware plan tries before it gives up
# keeping n-1 for that VM (see plan_flush). Each try costs one incremental n-1 check.
N1_TRIES = 8


class _N1Tracker:
    """The verdict of :func:`survives_node_failure` on the cluster as a plan books VMs, kept up to
    date per booking instead of recomputed: which nodes fail the check (``failing``), and which
    nodes a booking would make fail (:meth:`new_failures`), exactly as the full check would say on
    :func:`apply_plan`'s result of the plan so far (the source flushed: it neither fails nor
    receives; the VMs not planned yet count nowhere).

    ``by_headroom`` is the plan's list of (headroom, name) of the candidate nodes, ascending, which
    the plan keeps sorted as it books; the candidates (run, ready, libvirt ok, not the source) are
    the check's eligible nodes. A node F's verdict depends on its VMs and the k_F + 1 largest
    headrooms only (worst fit never reaches further), so a booking on node C changes the verdict
    of C and of the nodes F with k_F + 1 >= C's rank; of those, the check's two bounds settle most
    without a pass over their VMs (all of F's VMs fit on the second largest headroom; F's largest
    VM fits on the (k_F + 1)-th largest headroom), found per VM count by bisection.
    """

    def __init__(
        self, slots: Mapping[str, _Slot], by_headroom: list[tuple[int, str]], running: Mapping[str, Sequence[int]]
    ) -> None:
        self.slots = slots
        self.by_headroom = by_headroom
        self.memories: dict[str, list[int]] = {}  # node -> its VMs' memory, largest first
        self.sums: dict[str, int] = {}
        self.by_count: dict[int, list[tuple[int, str]]] = {}  # VM count -> sorted (largest VM, node)
        for name in slots:
            memories = sorted((int(m) for m in running.get(name, ()) if int(m) > 0), reverse=True)
            self.memories[name] = memories
            self.sums[name] = sum(memories)
            if memories:
                self.by_count.setdefault(len(memories), []).append((memories[0], name))
        for group in self.by_count.values():
            group.sort()
        self.failing: set[str] = {name for name in slots if not self.survives(name)}
        self.start_failing = frozenset(self.failing)

    def survives(self, name: str, memories: list[int] | None = None) -> bool:
        """Whether ``name``'s VMs (or ``memories``, largest first) could restart on the other
        candidates: survives_node_failure's rule for one node."""
        if memories is None:
            memories = self.memories[name]
            total = self.sums[name]
        else:
            total = sum(memories)
        ranked = self.by_headroom
        if len(ranked) < 2:
            return False
        if not memories:
            return True
        roomiest = ranked[-1][0] if ranked[-1][1] != name else ranked[-2][0]
        if total <= roomiest:
            return True
        count = len(memories)
        others = [-headroom for headroom, other in reversed(ranked[-(count + 1) :]) if other != name]
        if len(others) > count:
            others.pop()
        if len(others) == count and memories[0] <= -others[-1]:
            return True
        for memory in memories:
            if memory > -others[0]:
                return False
            heapq.heapreplace(others, others[0] + memory)
        return True

    def new_failures(self, target: str, memory: int, first_only: bool = False) -> set[str]:
        """The nodes that pass the check now and would fail it once ``memory`` MiB more run on
        ``target`` (its headroom shrinks, its VMs grow); ``first_only``: stop at the first."""
        ranked = self.by_headroom
        headroom = self.slots[target].headroom
        position = bisect.bisect_left(ranked, (headroom, target))
        rank = len(ranked) - position  # 1: the most headroom
        del ranked[position]
        bisect.insort(ranked, (headroom - memory, target))
        found: set[str] = set()
        try:
            if target not in self.failing:
                grown = sorted(self.memories[target] + [memory], reverse=True)
                if not self.survives(target, grown):
                    found.add(target)
                    if first_only:
                        return found
            second = ranked[-2][0] if len(ranked) >= 2 else 0
            for count, group in self.by_count.items():
                if count + 1 < rank:
                    continue  # target is not among the count + 1 largest headrooms: no change
                start = 0
                if count + 1 <= len(ranked):
                    start = bisect.bisect_right(group, (ranked[-(count + 1)][0], "\U0010ffff"))
                for entry in group[start:]:
                    name = entry[1]
                    if name == target or name in self.failing or self.sums[name] <= second:
                        continue
                    if not self.survives(name):
                        found.add(name)
                        if first_only:
                            return found
            return found
        finally:
            del ranked[bisect.bisect_left(ranked, (headroom - memory, target))]
            bisect.insort(ranked, (headroom, target))

    def commit(self, target: str, memory: int, lost: set[str]) -> None:
        """``memory`` MiB now run on ``target`` (the plan has booked it: ``by_headroom`` moved
        already); ``lost``: what :meth:`new_failures` said before the booking."""
        memories = self.memories[target]
        if memories:
            group = self.by_count[len(memories)]
            del group[bisect.bisect_left(group, (memories[0], target))]
        memories.append(memory)
        memories.sort(reverse=True)
        self.sums[target] += memory
        bisect.insort(self.by_count.setdefault(len(memories), []), (memories[0], target))
        self.failing |= lost


def _plan_check(
    source_node: str,
    vms: Sequence[FlushVM | tuple[Any, ...]],
    plan: Sequence[PlannedMove],
    nodes: Sequence[NodeView],
    running_by_node: Mapping[str, Sequence[int]],
) -> FailureCheck:
    """The n-1 check of the cluster once ``plan`` has run."""
    views, running = apply_plan(source_node, vms, plan, nodes, running_by_node)
    return survives_node_failure(views, running)


def _plan_once(
    source_node: str,
    vms: Sequence[FlushVM | tuple[Any, ...]],
    nodes: Iterable[NodeView] | Mapping[str, NodeView],
    default_selector: str | None,
    pack: bool,
    n1_running: Mapping[str, Sequence[int]] | None = None,
    n1_selectors: Sequence[str] | None = ("fit",),
) -> tuple[list[PlannedMove], bool, _N1Tracker | None]:
    """One flush plan (the rules of :func:`plan_flush`); ``pack``: ``fit`` takes the tightest fit
    (best fit) where it would balance. Also returns whether ``fit`` balanced any VM (a plan with
    ``pack`` would differ). With ``n1_running`` (the VMs each node runs), the plan is n-1 aware
    for the VMs whose selector is in ``n1_selectors`` (None: every selector): each takes the
    first of its N1_TRIES first targets whose booking makes no node fail the n-1 check that
    passed it; the tracker that decided is returned too."""
    node_list = _as_list(nodes)
    excluded = frozenset((source_node,))
    slots: dict[str, _Slot] = {}
    static_reasons: dict[str, str] = {}
    for node in node_list:
        reason = _static_rejection(node, source_node, None, "", excluded)
        if reason is None:
            slots[node.name] = _Slot(
                node=node,
                name=node.name,
                headroom=node.headroom,
                memfree=node.memfree,
                cpuload=node.cpuload,
                vcpualloc=node.vcpualloc,
                domaincount=node.domaincount,
                capacity=node.capacity,
            )
        else:
            static_reasons[node.name] = reason
    heaps: dict[str, list[SortKey]] = {}
    parked: dict[str, list[tuple[int, SortKey]]] = {}
    balanced = [False]  # set when fit chose other than the tightest fit: a packed plan would differ
    # the ``fit`` selector's rules: every slot by headroom (kept sorted as VMs are booked: the
    # tightest fit), and the same per capacity (the balancing and spread rules)
    by_headroom = sorted((slot.headroom, slot.name) for slot in slots.values())
    by_capacity: dict[int, list[tuple[int, str]]] = {}
    for headroom_and_name in by_headroom:
        by_capacity.setdefault(slots[headroom_and_name[1]].capacity, []).append(headroom_and_name)
    tracker = _N1Tracker(slots, by_headroom, n1_running) if n1_running is not None else None
    # fit's spread rule needs the candidates' free shares' sum (kept as VMs are booked; fsum: the
    # same whatever the order of the nodes) and whether the cluster is tight (their headroom and
    # capacity, as select_target counts them)
    sized = [slot for slot in slots.values() if slot.capacity > 0]
    share_sum = [math.fsum(slot.headroom / slot.capacity for slot in sized)]
    slack = [sum(max(slot.headroom, 0) for slot in slots.values())]
    capacity_sum = sum(slot.capacity for slot in sized)

    def fit_key(headroom: int, capacity: int, memory: int, name: str, tight: bool) -> SortKey:
        """fit's order in a plan (smallest first): on a tight cluster the spread rule, with room
        the balancing rule."""
        if tight:
            mean_share = share_sum[0] / len(sized) if sized else 0.0
            return _spread_key(headroom, capacity, memory, mean_share, len(sized), name)
        return _balance_key(headroom, capacity, memory, name)

    def entry(selector: str, slot: _Slot) -> SortKey:
        return slot.key(selector) + (slot.version,)

    def heap_for(selector: str) -> list[SortKey]:
        heap = heaps.get(selector)
        if heap is None:
            heap = [entry(selector, slot) for slot in slots.values()]
            heapq.heapify(heap)
            heaps[selector] = heap
        return heap

    def valid(item: SortKey) -> _Slot | None:
        slot = slots[item[2]]
        return slot if item[3] == slot.version else None

    def clean_top(heap: list[SortKey]) -> None:
        while heap and valid(heap[0]) is None:
            heapq.heappop(heap)

    def book(slot: _Slot, memory: int, vcpus: int) -> None:
        if slot.capacity > 0:
            share_sum[0] -= memory / slot.capacity
        slack[0] -= max(slot.headroom, 0) - max(slot.headroom - memory, 0)
        for ordered in (by_headroom, by_capacity[slot.capacity]):
            del ordered[bisect.bisect_left(ordered, (slot.headroom, slot.name))]
            bisect.insort(ordered, (slot.headroom - memory, slot.name))
        slot.headroom -= memory
        slot.memfree -= memory
        slot.domaincount += 1
        slot.vcpualloc += max(int(vcpus), 0)
        slot.version += 1
        for selector, heap in heaps.items():
            heapq.heappush(heap, entry(selector, slot))

    def pick_fit(memory: int) -> _Slot | None:
        """fit's rules in a plan: on a tight cluster the spread rule, with room the largest free
        share after the VM; with ``pack``, the tightest fit (None: nothing fits)."""
        index = bisect.bisect_left(by_headroom, (memory, ""))
        if index == len(by_headroom):
            return None
        tightest = by_headroom[index][1]
        if pack:
            return slots[tightest]
        tight = _is_tight(slack[0], capacity_sum, memory)
        best: SortKey | None = None
        for capacity, group in by_capacity.items():
            if not group or group[-1][0] < memory:
                continue
            # among nodes of one capacity the most headroom is first by either rule (the largest
            # share after the VM, the least spread; the first name at that headroom)
            headroom, name = group[bisect.bisect_left(group, (group[-1][0], ""))]
            key = fit_key(headroom, capacity, memory, name, tight)
            if best is None or key < best:
                best = key
        if best is None:
            return None
        if best[-1] != tightest:
            balanced[0] = True
        return slots[best[-1]]

    def pick_unlimited(selector: str, memory: int) -> _Slot | None:
        if selector == "fit":
            chosen = pick_fit(memory)
            if chosen is not None:
                return chosen
        # The "mem" heap's top is the largest headroom: if the VM does not fit there, it fits nowhere.
        mem_heap = heap_for("mem")
        clean_top(mem_heap)
        if not mem_heap or memory > slots[mem_heap[0][2]].headroom:
            return None
        heap = heap_for(selector)
        # Nodes too small for an earlier (so larger or equal) VM wait in `park`, ordered by
        # headroom, until a VM small enough comes: each entry is parked and unparked at most once.
        park = parked.setdefault(selector, [])
        while park and -park[0][0] >= memory:
            item = heapq.heappop(park)[1]
            if valid(item) is not None:
                heapq.heappush(heap, item)
        while heap:
            item = heapq.heappop(heap)
            slot = valid(item)
            if slot is None:
                continue
            if memory <= slot.headroom:
                return slot
            heapq.heappush(park, (-slot.headroom, item))
        return None

    def pick_limited(selector: str, memory: int, limit: Sequence[str]) -> tuple[_Slot | None, dict[str, str]]:
        best: SortKey | None = None
        chosen: _Slot | None = None
        reasons: dict[str, str] = {}
        for name in limit:
            slot = slots.get(name)
            if slot is None:
                reasons[name] = static_reasons.get(name, "in node_limit but not a cluster node")
                continue
            reason = _fit_rejection(memory, slot.headroom)
            if reason is not None:
                reasons[name] = reason + " (after earlier placements)" if slot.version else reason
                continue
            if selector == "fit":
                key = limited_fit_key(slot, memory)
            else:
                key = slot.key(selector)
            if best is None or key < best:
                best, chosen = key, slot
        if chosen is not None and selector == "fit" and not pack:
            tightest = min((slots[n].headroom, n) for n in limit if n in slots and slots[n].headroom >= memory)
            if chosen.name != tightest[1]:
                balanced[0] = True
        return chosen, reasons

    def limited_fit_key(slot: _Slot, memory: int) -> SortKey:
        """fit's order among a node_limit's nodes (with ``pack``, the tightest fit)."""
        if pack:
            return (slot.headroom - memory, slot.name)
        return fit_key(slot.headroom, slot.capacity, memory, slot.name, _is_tight(slack[0], capacity_sum, memory))

    def fit_order(memory: int) -> Iterator[_Slot]:
        """fit's targets in a plan, in its order (the spread rule on a tight cluster, else the
        balancing rule; per capacity, most headroom first, merged), lazily."""
        tight = _is_tight(slack[0], capacity_sum, memory)

        def by_share(capacity: int, group: list[tuple[int, str]]) -> Iterator[tuple[SortKey, str]]:
            end = len(group)
            while end > 0 and group[end - 1][0] >= memory:
                headroom = group[end - 1][0]
                start = bisect.bisect_left(group, (headroom, ""))
                for entry in group[start:end]:  # one headroom: names in order
                    yield fit_key(headroom, capacity, memory, entry[1], tight), entry[1]
                end = start

        for entry in heapq.merge(*(by_share(capacity, group) for capacity, group in by_capacity.items())):
            yield slots[entry[1]]

    def heap_order(selector: str, memory: int, count: int) -> list[_Slot]:
        """The first ``count`` targets of a heap selector, in its order (they stay in the heap)."""
        mem_heap = heap_for("mem")
        clean_top(mem_heap)
        if not mem_heap or memory > slots[mem_heap[0][2]].headroom:
            return []
        heap = heap_for(selector)
        park = parked.setdefault(selector, [])
        while park and -park[0][0] >= memory:
            item = heapq.heappop(park)[1]
            if valid(item) is not None:
                heapq.heappush(heap, item)
        taken: list[SortKey] = []
        while heap and len(taken) < count:
            item = heapq.heappop(heap)
            slot = valid(item)
            if slot is None:
                continue
            if memory <= slot.headroom:
                taken.append(item)
            else:
                heapq.heappush(park, (-slot.headroom, item))
        for item in taken:
            heapq.heappush(heap, item)
        return [slots[item[2]] for item in taken]

    def limited_order(selector: str, memory: int, limit: Sequence[str]) -> tuple[list[_Slot], dict[str, str]]:
        """The targets in ``limit`` that the VM fits, in its selector's order, and why the others
        are not."""
        reasons: dict[str, str] = {}
        keyed: list[tuple[SortKey, _Slot]] = []
        for name in limit:
            slot = slots.get(name)
            if slot is None:
                reasons[name] = static_reasons.get(name, "in node_limit but not a cluster node")
                continue
            reason = _fit_rejection(memory, slot.headroom)
            if reason is not None:
                reasons[name] = reason + " (after earlier placements)" if slot.version else reason
                continue
            key = limited_fit_key(slot, memory) if selector == "fit" else slot.key(selector)
            keyed.append((key, slot))
        keyed.sort(key=lambda pair: pair[0])
        return [pair[1] for pair in keyed], reasons

    def choose_n1(
        n1: _N1Tracker, selector: str, memory: int, limit: Sequence[str]
    ) -> tuple[_Slot | None, set[str], str, dict[str, str]]:
        """An n-1 aware choice: the first of the VM's N1_TRIES first targets (its selector's
        order) whose booking makes no node fail the check that passes it now; when none, ``fit``
        takes the tightest fit (it keeps the largest gaps for the VMs still to come) and the
        other selectors their first choice. Returns the target, the nodes it makes fail, a note
        for the plan's reason and the reasons of a node_limit's rejected nodes."""
        reasons: dict[str, str] = {}
        fallback: _Slot | None = None
        if limit:
            order, reasons = limited_order(selector, memory, limit)
            tried = order[:N1_TRIES]
            if order:
                fallback = min(order, key=lambda slot: (slot.headroom, slot.name)) if selector == "fit" else order[0]
        elif selector == "fit":
            tried = list(itertools.islice(fit_order(memory), N1_TRIES))
            index = bisect.bisect_left(by_headroom, (memory, ""))
            fallback = slots[by_headroom[index][1]] if index < len(by_headroom) else None
        else:
            tried = heap_order(selector, memory, N1_TRIES)
            fallback = tried[0] if tried else None
        for position, slot in enumerate(tried):
            if not n1.new_failures(slot.name, memory, first_only=True):
                note = f", n-1 kept: its target {position + 1} in order" if position else ""
                return slot, set(), note, reasons
        if fallback is None:
            return None, set(), "", reasons
        lost = n1.new_failures(fallback.name, memory)
        if not lost:  # the tightest fit, not among those tried
            return fallback, lost, ", n-1 kept by best fit", reasons
        how = "best fit" if selector == "fit" else "its first choice"
        note = f", n-1 lost by every target tried ({len(tried)}); {how}, {', '.join(sorted(lost))} would fail"
        return fallback, lost, note, reasons

    def lost_by(slot: _Slot | None, memory: int) -> set[str]:
        return tracker.new_failures(slot.name, memory) if tracker is not None and slot is not None else set()

    def booked(slot: _Slot, memory: int, vcpus: int, lost: set[str]) -> None:
        book(slot, memory, vcpus)
        if tracker is not None:
            tracker.commit(slot.name, memory, lost)

    flush_vms = [FlushVM(*vm) for vm in vms]
    order = sorted(range(len(flush_vms)), key=lambda i: (-int(flush_vms[i].memory_mib), i))
    plan: list[PlannedMove] = []
    for index in order:
        vm = flush_vms[index]
        memory = int(vm.memory_mib)
        selector = resolve_selector(vm.selector, default_selector)
        limit = _limit(vm.node_limit)
        home = slots.get(vm.home_node) if vm.home_node and vm.home_node != source_node else None
        if home is not None and (not limit or home.node.name in limit) and memory <= home.headroom:
            booked(home, memory, vm.vcpus, lost_by(home, memory))
            plan.append(
                PlannedMove(
                    vm.uuid,
                    home.node.name,
                    f"returns to its home node {home.node.name} ({home.headroom} MiB headroom left)",
                )
            )
            continue
        note = ""
        if tracker is not None and (n1_selectors is None or selector in n1_selectors):
            chosen, lost, note, reasons = choose_n1(tracker, selector, memory, limit)
        else:
            if limit:
                chosen, reasons = pick_limited(selector, memory, limit)
            else:
                chosen, reasons = pick_unlimited(selector, memory), {}
            lost = lost_by(chosen, memory)
        if chosen is not None:
            booked(chosen, memory, vm.vcpus, lost)
            plan.append(
                PlannedMove(
                    vm.uuid, chosen.node.name, f"selector {selector}{note} ({chosen.headroom} MiB headroom left)"
                )
            )
            continue
        plan.append(PlannedMove(vm.uuid, None, _none_fits_reason(memory, limit, reasons, slots, static_reasons)))
    return plan, balanced[0], tracker


def _none_fits_reason(
    memory: int,
    limit: Sequence[str],
    reasons: Mapping[str, str],
    slots: Mapping[str, _Slot],
    static_reasons: Mapping[str, str],
) -> str:
    tail = "; it will be shut down and marked for autostart"
    if limit:
        return f"no node in node_limit {_format_limit(limit)} can take it: {_format_reasons(reasons)}{tail}"
    if not slots:
        why = _format_reasons(static_reasons) if static_reasons else "the cluster has no other nodes"
        return f"no node is a candidate: {why}{tail}"
    best = min(slots.values(), key=lambda s: (-s.headroom, s.node.name))
    return (
        f"fits on no node: needs {memory} MiB, the most headroom left is {best.headroom} MiB on {best.node.name}"
        f" ({len(slots)} candidate node(s), {len(static_reasons)} not run/ready){tail}"
    )


def apply_plan(
    source_node: str,
    vms: Sequence[FlushVM | tuple[Any, ...]],
    plan: Sequence[PlannedMove | tuple[Any, ...]],
    nodes: Iterable[NodeView] | Mapping[str, NodeView],
    running_by_node: Mapping[str, Sequence[int]] | None = None,
) -> tuple[list[NodeView], dict[str, list[int]]]:
    """The cluster as it will be after ``plan`` (from :func:`plan_flush`) has run.

    Returns the node views (each target's ``reserved``, ``memfree``, ``domaincount`` and
    ``vcpualloc`` grow by what it receives; the source becomes ``flushed``) and the running VM
    memory per node (``running_by_node`` with each moved VM's memory taken off the source and
    added to its target; VMs with no target are shut down, so they leave the source's list).
    Feed both to :func:`survives_node_failure`.
    """
    by_uuid = {FlushVM(*vm).uuid: FlushVM(*vm) for vm in vms}
    views = {node.name: node for node in _as_list(nodes)}
    running = {name: list(memories) for name, memories in (running_by_node or {}).items()}
    for move in plan:
        uuid, target = move[0], move[1]
        vm = by_uuid.get(uuid)
        if vm is None:
            continue
        memory = int(vm.memory_mib)
        source_list = running.get(source_node)
        if source_list is not None and memory in source_list:
            source_list.remove(memory)
        if target is None or target not in views:
            continue
        node = views[target]
        views[target] = replace(
            node,
            reserved=node.reserved + memory,
            memfree=node.memfree - memory,
            domaincount=node.domaincount + 1,
            vcpualloc=node.vcpualloc + max(int(vm.vcpus), 0),
        )
        running.setdefault(target, []).append(memory)
    if source_node in views:
        views[source_node] = replace(views[source_node], domain_state="flushed")
    return list(views.values()), running


# ---- n-1 check ------------------------------------------------------------------------------


@dataclass(frozen=True)
class FailureCheck:
    """Result of :func:`survives_node_failure`. True when every single-node failure is survivable.

    ``failures`` maps each node whose failure could not be absorbed to why.
    """

    ok: bool
    failures: dict[str, str] = field(default_factory=dict)
    checked: tuple[str, ...] = ()
    # node -> MiB missing to restart the first of its VMs that fits nowhere (0: no node left at all)
    shortfalls: dict[str, int] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return self.ok

    def to_dict(self) -> dict[str, Any]:
        """The verdict as the modules and the reports return it (``survives_node_failure``)."""
        return {
            "ok": self.ok,
            "message": self.message,
            "failures": self.failures,
            "checked": list(self.checked),
            "shortfalls": self.shortfalls,
        }

    @property
    def message(self) -> str:
        if self.ok:
            return f"the cluster survives the failure of any one of {len(self.checked)} ready node(s)"
        if not self.checked:
            return "no node is ready: no VM could be restarted after a node failure"
        return "the cluster would not survive the failure of " + _format_reasons(self.failures)


def survives_node_failure(
    nodes: Iterable[NodeView] | Mapping[str, NodeView],
    vm_memory_by_node: Mapping[str, Sequence[int]],
) -> FailureCheck:
    """Whether the remaining nodes could still hold every VM if one more node failed (n-1).

    For each eligible node F (daemon ``run``, domain ``ready``), the VMs in
    ``vm_memory_by_node[F]`` (pass the memory of the VMs that would have to be restarted
    elsewhere, i.e. those running on F) are placed, largest first, each on the other eligible
    node with the most headroom left (worst-fit decreasing, booking each placement). F fails the
    check when one of its VMs fits nowhere.

    Fewer than two eligible nodes never survive: the failure of the only one (or none at all)
    leaves no node to restart anything on, whatever runs today.

    Limits (documented, deliberate): node_limit and selectors are ignored, and a greedy packing
    may report a failure where an exact packing exists (it never reports success wrongly for
    memory). Nodes that are not eligible neither fail nor receive.

    Cost: one sort of the nodes by headroom, then per node F only the k+1 nodes with the most
    headroom matter for its k VMs (worst-fit never reaches further), so O(n log n + sum k log k);
    F's VMs are placed one by one only when neither bound settles it (all of them fit on the
    roomiest other node; the largest fits on the k-th roomiest).
    """
    eligible = [node for node in _as_list(nodes) if node.is_eligible]
    if len(eligible) < 2:
        return FailureCheck(
            ok=False,
            checked=tuple(node.name for node in eligible),
            failures={node.name: "it is the only ready node: none is left to restart VMs on" for node in eligible},
            shortfalls={node.name: 0 for node in eligible},
        )
    # (-headroom, name), most headroom first: sorted, so any prefix of it is already a heap
    ranked = sorted((-node.headroom, node.name) for node in eligible)
    position = {entry[1]: index for index, entry in enumerate(ranked)}
    failures: dict[str, str] = {}
    shortfalls: dict[str, int] = {}
    for failed in eligible:
        memories = [int(m) for m in vm_memory_by_node.get(failed.name, ()) if int(m) > 0]
        if not memories:
            continue
        # Fast path: when the one other node with the most headroom could take all of them, worst
        # fit succeeds (at every step the node with the most headroom left still has at least
        # what remains to place), so nothing needs sorting or booking.
        roomiest = ranked[1] if ranked[0][1] == failed.name else ranked[0]
        if sum(memories) <= -roomiest[0]:
            continue
        # the len(memories) other nodes with the most headroom, a sorted list (so a heap)
        others = ranked[: len(memories) + 1]
        index = position[failed.name]
        if index < len(others):
            del others[index]
        else:
            others.pop()
        # Second fast path: when even the last of those k nodes could take the largest of the k
        # VMs, worst fit succeeds (after j placements at least k - j of them are untouched, so
        # the most headroom left is still at least the largest VM).
        if len(others) == len(memories) and max(memories) <= -others[-1][0]:
            continue
        memories.sort(reverse=True)
        for memory in memories:
            if not others or memory > -others[0][0]:
                most = -others[0][0] if others else 0
                where = f" ({others[0][1]})" if others else ""
                failures[failed.name] = (
                    f"its {len(memories)} VM(s) ({sum(memories)} MiB) cannot be restarted elsewhere:"
                    f" a {memory} MiB VM does not fit, the most headroom left is {most} MiB{where},"
                    f" short by {memory - most} MiB"
                )
                shortfalls[failed.name] = memory - most
                break
            negative, name = others[0]
            heapq.heapreplace(others, (negative + memory, name))
    return FailureCheck(
        ok=not failures, failures=failures, checked=tuple(node.name for node in eligible), shortfalls=shortfalls
    )


def allocation_check(
    nodes: Iterable[NodeView] | Mapping[str, NodeView],
    vm_memory_by_node: Mapping[str, Sequence[int]],
    target: str,
    vm_memory_mib: int,
) -> FailureCheck:
    """The n-1 check of the cluster once a new VM of ``vm_memory_mib`` MiB runs on ``target``
    (booked like a reservation: the target's headroom shrinks and its running VMs grow)."""
    views = []
    for node in _as_list(nodes):
        if node.name == target:
            node = replace(node, reserved=node.reserved + int(vm_memory_mib))
        views.append(node)
    running = {name: list(memories) for name, memories in vm_memory_by_node.items()}
    running.setdefault(target, []).append(int(vm_memory_mib))
    return survives_node_failure(views, running)


def migration_check(
    nodes: Iterable[NodeView] | Mapping[str, NodeView],
    vm_memory_by_node: Mapping[str, Sequence[int]],
    source: str,
    target: str,
    vm_memory_mib: int,
    source_reserved: bool = False,
) -> FailureCheck:
    """The n-1 check of the cluster once a running VM of ``vm_memory_mib`` MiB has moved from
    ``source`` to ``target``: the target books it like a reservation, the source gives it back
    (from its reservations when ``source_reserved``, i.e. the source still covers the VM with a
    reservation its keepalive has not folded yet, else from its provisioned memory), and the VM
    counts as running on the target instead of the source."""
    memory = int(vm_memory_mib)
    views = []
    for node in _as_list(nodes):
        if node.name == target:
            node = replace(node, reserved=node.reserved + memory)
        elif node.name == source:
            if source_reserved:
                node = replace(node, reserved=max(node.reserved - memory, 0))
            else:
                node = replace(node, memprov=max(node.memprov - memory, 0))
        views.append(node)
    running = {name: list(memories) for name, memories in vm_memory_by_node.items()}
    if memory in running.get(source, []):
        running[source].remove(memory)
    running.setdefault(target, []).append(memory)
    return survives_node_failure(views, running)
