"""Placement quality on generated cluster snapshots (``make bench``, section p; issue #15).

A snapshot: nodes of 128, 256 or 384 GiB (no host reserve), each filled to a target share (60 to 95 %)
with VMs of 1 to 64 GiB, small ones more likely. Two exercises, for each selector compared:

* one at a time: new VMs (same size mix) asking for 106-160 % of the free memory arrive in a random
  order and are placed one by one with ``select_target``, each booked before the next (as the
  requests' reservations book them), until every VM was tried;
* a flush: the fullest node's VMs are planned away with ``plan_flush``.

Measured: memory placed (% of the free memory, or of the memory asked for the flush), VMs left
unplaced, the spread of free memory (population standard deviation of each node's free share, in
percentage points), overcommitted nodes (must be 0), the n-1 verdict of the cluster afterwards, and
the time per selection / per plan. Pure logic, no I/O; deterministic for a seed.
"""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass, replace

from pvc_cluster_common._selector import (
    FlushVM,
    NodeView,
    NoTargetError,
    plan_flush,
    select_target,
    survives_node_failure,
)

GIB = 1024
SIZES_GIB = (1, 2, 4, 8, 16, 32, 64)
SIZE_WEIGHTS = (30, 25, 20, 12, 7, 4, 2)
NODE_GIB = (128, 256, 256, 384)


@dataclass
class Snapshot:
    nodes: dict[str, NodeView]
    running: dict[str, list[int]]  # node -> memory of each VM on it, MiB

    @property
    def free_mib(self) -> int:
        return sum(max(node.headroom, 0) for node in self.nodes.values())


def vm_size(rng: random.Random) -> int:
    return rng.choices(SIZES_GIB, SIZE_WEIGHTS)[0] * GIB


def generate(count: int, fill: float, seed: int) -> Snapshot:
    """``count`` ready nodes, each filled with VMs up to ``fill`` of its memory."""
    rng = random.Random(seed)
    nodes, running = {}, {}
    for index in range(count):
        name = f"node{index:04d}"
        total = rng.choice(NODE_GIB) * GIB
        vms: list[int] = []
        while True:
            size = vm_size(rng)
            if sum(vms) + size > total * fill:
                break
            vms.append(size)
        nodes[name] = NodeView(
            name=name,
            daemon_state="run",
            domain_state="ready",
            memtotal=total,
            memused=sum(vms),
            memfree=total - sum(vms),
            memprov=sum(vms),
            domaincount=len(vms),
        )
        running[name] = vms
    return Snapshot(nodes, running)


def arrivals(snapshot: Snapshot, seed: int, low: float = 1.06, high: float = 1.6) -> list[int]:
    """New VMs asking for ``low``..``high`` times the snapshot's free memory, in arrival order."""
    rng = random.Random(seed)
    wanted = snapshot.free_mib * rng.uniform(low, high)
    sizes: list[int] = []
    while sum(sizes) < wanted:
        sizes.append(vm_size(rng))
    return sizes


def spread(nodes) -> float:
    """Population standard deviation of the nodes' free share (headroom / capacity), in points."""
    shares = [100.0 * node.headroom / node.capacity for node in nodes if node.capacity > 0]
    return statistics.pstdev(shares) if len(shares) > 1 else 0.0


def one_at_a_time(snapshot: Snapshot, sizes: list[int], selector: str) -> dict:
    nodes = dict(snapshot.nodes)
    running = {name: list(vms) for name, vms in snapshot.running.items()}
    placed = unplaced = 0
    elapsed = []
    for size in sizes:
        started = time.perf_counter()
        try:
            target = select_target(size, None, (), selector, nodes)
        except NoTargetError:
            target = None
        elapsed.append((time.perf_counter() - started) * 1000)
        if target is None:
            unplaced += 1
            continue
        node = nodes[target]
        nodes[target] = replace(node, reserved=node.reserved + size, memfree=node.memfree - size)
        running[target].append(size)
        placed += size
    return quality_row(nodes, running, placed, snapshot.free_mib, unplaced, elapsed, "selection")


def flush(snapshot: Snapshot, selector: str) -> dict:
    source = max(snapshot.nodes, key=lambda name: (sum(snapshot.running[name]), name))
    vms = [FlushVM(f"vm{i}", size, (), selector, source) for i, size in enumerate(snapshot.running[source])]
    started = time.perf_counter()
    plan = plan_flush(source, vms, snapshot.nodes, running_by_node=snapshot.running)
    elapsed = [(time.perf_counter() - started) * 1000]
    nodes = dict(snapshot.nodes)
    running = {name: list(vms) for name, vms in snapshot.running.items() if name != source}
    nodes[source] = replace(nodes[source], domain_state="flushed")
    by_uuid = {vm.uuid: vm for vm in vms}
    placed = unplaced = 0
    for move in plan:
        size = by_uuid[move.uuid].memory_mib
        if move.target is None:
            unplaced += 1
            continue
        node = nodes[move.target]
        nodes[move.target] = replace(node, reserved=node.reserved + size)
        running[move.target].append(size)
        placed += size
    return quality_row(
        {name: node for name, node in nodes.items() if name != source},
        running,
        placed,
        sum(vm.memory_mib for vm in vms),
        unplaced,
        elapsed,
        "plan",
    )


def quality_row(nodes, running, placed, asked, unplaced, elapsed, what, refused: int | None = None) -> dict:
    """One run's figures: memory placed (% of ``asked``), VMs left unplaced, free-memory spread,
    overcommitted nodes, the n-1 verdict after it and the time per ``what``; ``refused`` (hail's
    answers not applied, bench/hail.py) only where given."""
    started = time.perf_counter()
    verdict = survives_node_failure(nodes, running)
    n1_ms = (time.perf_counter() - started) * 1000
    row = {
        "placed_pct": round(100.0 * placed / asked, 2) if asked else 100.0,
        "unplaced_vms": unplaced,
        **({"refused_answers": refused} if refused is not None else {}),
        "spread_pct": round(spread(nodes.values()), 3),
        "overcommitted_nodes": sum(1 for node in nodes.values() if node.headroom < 0),
        "n1_ok": verdict.ok,
        "n1_failing_nodes": len(verdict.failures),
        "n1_ms": round(n1_ms, 3),
        f"{what}_p50_ms": round(statistics.median(elapsed), 3) if elapsed else 0.0,
        f"{what}_max_ms": round(max(elapsed), 3) if elapsed else 0.0,
    }
    return row


def quality(
    selectors=("mem", "fit"),
    node_counts=(10, 100),
    fills=(0.6, 0.8, 0.95),
    seeds=(1, 2, 3),
    flush_node_counts=(10, 100, 1000),
) -> list[dict]:
    """Every exercise on every snapshot, per selector: one row per (exercise, nodes, fill, seed)."""
    rows = []
    for count in sorted(set(node_counts) | set(flush_node_counts)):
        for fill in fills:
            for seed in seeds:
                snapshot = generate(count, fill, seed * 1000 + count)
                sizes = arrivals(snapshot, seed) if count in node_counts else None
                for selector in selectors:
                    if sizes is not None:
                        rows.append(
                            {
                                "exercise": "one-at-a-time",
                                "nodes": count,
                                "fill": fill,
                                "seed": seed,
                                "selector": selector,
                                **one_at_a_time(snapshot, sizes, selector),
                            }
                        )
                    if count in flush_node_counts:
                        rows.append(
                            {
                                "exercise": "flush",
                                "nodes": count,
                                "fill": fill,
                                "seed": seed,
                                "selector": selector,
                                **flush(snapshot, selector),
                            }
                        )
    return rows


def summary(rows: list[dict]) -> list[dict]:
    """Per (exercise, nodes, selector): the mean and worst of each figure over fills and seeds."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["exercise"], row["nodes"], row["selector"]), []).append(row)
    result = []
    for (exercise, nodes, selector), group in sorted(groups.items()):
        timing = "selection_p50_ms" if exercise == "one-at-a-time" else "plan_p50_ms"
        extra = {}
        if any("refused_answers" in r for r in group):  # hail's rows (bench/hail.py)
            extra["refused_answers"] = sum(r.get("refused_answers", 0) for r in group)
        result.append(
            {
                "exercise": exercise,
                "nodes": nodes,
                "selector": selector,
                "snapshots": len(group),
                "placed_pct_mean": round(statistics.mean(r["placed_pct"] for r in group), 2),
                "placed_pct_min": round(min(r["placed_pct"] for r in group), 2),
                "unplaced_vms_mean": round(statistics.mean(r["unplaced_vms"] for r in group), 1),
                "spread_pct_mean": round(statistics.mean(r["spread_pct"] for r in group), 3),
                "spread_pct_max": round(max(r["spread_pct"] for r in group), 3),
                "overcommitted_nodes": sum(r["overcommitted_nodes"] for r in group),
                "n1_ok": sum(1 for r in group if r["n1_ok"]),
                "time_p50_ms": round(statistics.median(r[timing] for r in group), 3),
                "time_max_ms": round(max(r[timing] for r in group), 3),
                **extra,
            }
        )
    return result
