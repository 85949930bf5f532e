"""Ganeti's hail on bench p's snapshots, side by side with our selectors (``make bench``, section p).

hail is Ganeti's IAllocator (package ``ganeti-htools``, which ``scripts/setup-host.sh``
installs): it reads one JSON request from a file named on its command line and answers on stdout
(Ganeti's ``doc/iallocator.rst``, protocol version 2). For the same snapshots and the same arrival
order as bench p (``bench/placement.py``), each new VM is one ``allocate`` request on the cluster as
it is at that moment (every VM placed so far is an instance of the request), and a flush is one
``node-evacuate`` request (``evac_mode`` ``primary-only``) for every VM of the fullest node, which
is marked drained, as ``gnt-node modify --drained`` then ``gnt-node evacuate`` would do.

The request is neutral to everything but memory, as the snapshots are:

* every VM is ``diskless`` with no NIC, 1 vCPU and a spindle use of 0: our VMs move between nodes
  by live migration with their disks on shared storage, which in Ganeti is the diskless/shared
  family; a ``plain`` disk would be node-local, and hail refuses to evacuate a plain instance's
  primary node, so there would be no flush to compare;
* every node has the same, generous CPU and disk (1,024 CPUs, a vCPU ratio of 64, 1 PiB of disk, a
  spindle count of 1,024) and no reserved memory: ``total_memory`` is the node's capacity,
  ``free_memory`` its headroom (capacity minus its VMs), which is exactly what our selectors see;
* hail refuses a VM that would leave a node with no free memory at all; the snapshots are whole
  GiB, where exact fits are common, so every node is described with 1 MiB more memory (total and
  free), which makes hail's rule the selectors' (variant ``hail-exact``: without it);
* one node group, no tags, no networks, an instance policy that admits 128 MiB to 1 TiB of memory;
  the hypervisor named is ``xen-pvm``, for which hail takes the node's memory figures as given;
* a node's VMs are one instance of their total memory (``message(merged=True)``, see there why:
  with an instance per VM, hail's score balances VM counts before memory); the variant
  ``hail-vms`` describes every VM, as Ganeti would;
* hail runs with ``--no-capacity-checks``: our selectors place without an n-1 check in bench p (only
  under ``require_n1``), and with hail's default global N+1 check (variant ``hail-n1``) a tight
  snapshot takes almost nothing.

hail's answers are checked, never trusted: an answer that names a node where the VM does not fit
(or that is not a node of the request) is not applied and counts as unplaced, as does a refusal
(``success`` false) or a failed instance of an evacuation. ``refused_answers`` counts the answers
that were not applied because they did not fit (0 when hail honours memory, as it should).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from bench.placement import Snapshot, arrivals, generate, quality_row
from pvc_cluster_common._selector import NodeView

# Debian installs hail outside PATH, where Ganeti looks for its iallocators.
HAIL_PATHS = ("/usr/lib/ganeti/iallocators/hail",)
GROUP = "pvc-bench-group"
HYPERVISOR = "xen-pvm"
NODE_CPUS = 1024 * 1024
VCPU_RATIO = 64.0
NODE_DISK_MIB = 1024 * 1024 * 1024  # 1 PiB
SPINDLES = 1024


class HailError(RuntimeError):
    """hail did not answer with a response message (it crashed, or its output is not JSON)."""


def find_hail() -> str | None:
    """The hail executable, or None when ganeti-htools is not installed."""
    found = shutil.which("hail")
    if found:
        return found
    for path in HAIL_PATHS:
        if os.access(path, os.X_OK):
            return path
    return None


def _ipolicy() -> dict:
    spec_min = {
        "cpu-count": 1,
        "disk-count": 0,
        "disk-size": 0,
        "memory-size": 128,
        "nic-count": 0,
        "spindle-use": 0,
    }
    spec_max = {
        "cpu-count": 8,
        "disk-count": 16,
        "disk-size": 1024 * 1024,
        "memory-size": 1024 * 1024,
        "nic-count": 8,
        "spindle-use": 8,
    }
    return {
        "minmax": [{"min": spec_min, "max": spec_max}],
        "std": dict(spec_min),
        "disk-templates": ["diskless"],
        "vcpu-ratio": VCPU_RATIO,
        "spindle-ratio": 32.0,
    }


def _vm(memory_mib: int) -> dict:
    """What an instance and an allocate request share: only the memory differs between VMs."""
    return {
        "memory": memory_mib,
        "vcpus": 1,
        "disk_template": "diskless",
        "disks": [],
        "disk_space_total": 0,
        "spindle_use": 0,
        "nics": [],
        "tags": [],
        "hypervisor": HYPERVISOR,
    }


def message(
    nodes: dict[str, NodeView],
    running: dict[str, list[int]],
    request: dict,
    drained: tuple[str, ...] = (),
    merged: bool = True,
    slack_mib: int = 1,
) -> dict:
    """An IAllocator input message for the cluster ``nodes`` running ``running`` (MiB per VM).

    The instance on ``node`` with index ``i`` is named ``f"{node}/{i}"`` (the index in
    ``running[node]``); nodes in ``drained`` take no VM. ``merged``: the VMs of a node that is not
    drained are one instance, ``f"{node}/all"``, of their total memory (1 vCPU, like every VM).

    Why merged: hail's score (Ganeti's cluster metrics) has, besides the memory terms, four load
    terms that are the standard deviation of each node's instance count when there is no dynamic
    load data (every instance counts 1, ``--ignore-dynu`` or not); with a VM per instance they
    outweigh memory (on two nodes of equal free memory, 64 VMs against one, the score was 124
    against 2), so hail balances VM counts first. With one instance per node every candidate node
    gains the same one instance and only memory tells them apart: the memory-only comparison.
    It also keeps a request small (at 100 nodes, about 3,000 VMs took hail 1.3 s to read on the
    loaded machine, one node each 0.24 s).

    ``slack_mib``: every node is described with this much more memory, total and free. hail refuses
    a VM that would leave a node with no free memory at all (on a node with 64 GiB free it places
    63.999 GiB, never 64); bench p's nodes and VMs are whole GiB, so such exact fits are common
    there, and with 1 MiB of slack hail's rule becomes the selectors' (a VM fits when it is at most
    the headroom; the answers are still checked against the real headroom). 0 is hail as it is.
    """
    policy = _ipolicy()
    node_records = {}
    for name, node in nodes.items():
        node_records[name] = {
            "group": GROUP,
            "offline": False,
            "drained": name in drained or not node.is_eligible,
            "vm_capable": True,
            "master_capable": True,
            "master_candidate": False,
            "ndparams": {"spindle_count": SPINDLES, "exclusive_storage": False, "oob_program": None},
            "tags": [],
            "total_memory": node.capacity + slack_mib,
            "reserved_memory": 0,
            "free_memory": node.headroom + slack_mib,
            "i_pri_memory": sum(running.get(name, ())),
            "i_pri_up_memory": sum(running.get(name, ())),
            "total_disk": NODE_DISK_MIB,
            "free_disk": NODE_DISK_MIB,
            "total_cpus": NODE_CPUS,
            "reserved_cpus": 0,
            "total_spindles": SPINDLES,
            "free_spindles": SPINDLES,
        }
    instances = {}
    for name, sizes in running.items():
        if merged and name not in drained:
            if sizes:
                instances[f"{name}/all"] = {**_vm(sum(sizes)), "admin_state": "up", "nodes": [name]}
            continue
        for index, size in enumerate(sizes):
            instances[f"{name}/{index}"] = {**_vm(size), "admin_state": "up", "nodes": [name]}
    return {
        "version": 2,
        "cluster_name": "pvc-bench",
        "cluster_tags": [],
        "enabled_hypervisors": [HYPERVISOR],
        "ipolicy": policy,
        "nodegroups": {
            GROUP: {"name": "default", "alloc_policy": "preferred", "networks": [], "ipolicy": policy, "tags": []}
        },
        "nodes": node_records,
        "instances": instances,
        "request": request,
    }


def allocate_request(name: str, memory_mib: int) -> dict:
    """The ``request`` of an ``allocate`` message: one node for a new VM of ``memory_mib``."""
    return {"type": "allocate", "name": name, "required_nodes": 1, **_vm(memory_mib)}


def evacuate_request(instances: list[str]) -> dict:
    """The ``request`` of a ``node-evacuate`` message moving ``instances`` off their node."""
    return {"type": "node-evacuate", "instances": instances, "evac_mode": "primary-only"}


def run_hail(hail: str, body: dict, workdir: Path, n1: bool = False) -> dict:
    """hail's response message to ``body`` (written to a file in ``workdir``, as Ganeti does).

    ``n1`` False runs hail with ``--no-capacity-checks``: no global N+1 redundancy check, as our
    selectors place in bench p (they check n-1 only under ``require_n1``); True is hail's default.
    """
    path = workdir / "request.json"
    path.write_text(json.dumps(body))
    command = [hail, "--ignore-dynu", *([] if n1 else ["--no-capacity-checks"]), str(path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    try:
        answer = json.loads(done.stdout)
    except json.JSONDecodeError as exc:
        raise HailError(f"hail exited {done.returncode}: {done.stdout[-300:]!r} {done.stderr[-300:]!r}") from exc
    if not isinstance(answer, dict) or "success" not in answer:
        raise HailError(f"hail answered something else than a response message: {done.stdout[-300:]!r}")
    return answer


def parse_allocate(answer: dict, nodes: dict[str, NodeView], memory_mib: int) -> tuple[str | None, bool]:
    """(node, refused) from hail's answer to an allocate request.

    ``node`` is None when hail found no node or its answer cannot be applied; ``refused`` is True
    when hail named a node that is not in the request or where the VM does not fit.
    """
    if answer.get("success") is not True:
        return None, False
    result = answer.get("result", answer.get("nodes"))
    if not isinstance(result, list) or len(result) != 1 or not isinstance(result[0], str):
        return None, True
    target = result[0]
    node = nodes.get(target)
    if node is None or not node.is_eligible or node.headroom < memory_mib:
        return None, True
    return target, False


def parse_evacuate(answer: dict) -> tuple[dict[str, str], dict[str, str]]:
    """({instance: target node}, {instance: why}) from hail's answer to a node-evacuate request.

    The result of a node-evacuate (Ganeti's multi-relocation design) is ``[moved, failed,
    opcodes]``: ``moved`` a list of ``[instance, group, [nodes]]``, ``failed`` a list of
    ``[instance, reason]``. A refusal of the whole request, or a result of another shape, moves
    nothing (the caller counts every instance as unplaced).
    """
    if answer.get("success") is not True:
        return {}, {}
    result = answer.get("result")
    if not isinstance(result, list) or len(result) != 3:
        return {}, {}
    moved_list, failed_list = result[0], result[1]
    if not isinstance(moved_list, list) or not isinstance(failed_list, list):
        return {}, {}
    moved: dict[str, str] = {}
    for entry in moved_list:
        if isinstance(entry, list) and len(entry) == 3 and isinstance(entry[2], list) and entry[2]:
            if isinstance(entry[0], str) and isinstance(entry[2][0], str):
                moved[entry[0]] = entry[2][0]
    failed = {
        entry[0]: str(entry[1])
        for entry in failed_list
        if isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)
    }
    return moved, failed


def _book(nodes: dict[str, NodeView], target: str, size: int) -> None:
    node = nodes[target]
    nodes[target] = replace(node, reserved=node.reserved + size, memfree=node.memfree - size)


def one_at_a_time(
    hail: str,
    snapshot: Snapshot,
    sizes: list[int],
    workdir: Path,
    merged: bool = True,
    n1: bool = False,
    slack_mib: int = 1,
) -> dict:
    """bench p's one-at-a-time exercise with hail choosing each node."""
    nodes = dict(snapshot.nodes)
    running = {name: list(vms) for name, vms in snapshot.running.items()}
    placed = unplaced = refused = 0
    elapsed = []
    for index, size in enumerate(sizes):
        body = message(nodes, running, allocate_request(f"new{index}", size), merged=merged, slack_mib=slack_mib)
        started = time.perf_counter()
        answer = run_hail(hail, body, workdir, n1)
        elapsed.append((time.perf_counter() - started) * 1000)
        target, was_refused = parse_allocate(answer, nodes, size)
        refused += was_refused
        if target is None:
            unplaced += 1
            continue
        _book(nodes, target, size)
        running[target].append(size)
        placed += size
    return quality_row(nodes, running, placed, snapshot.free_mib, unplaced, elapsed, "selection", refused)


def flush(
    hail: str, snapshot: Snapshot, workdir: Path, merged: bool = True, n1: bool = False, slack_mib: int = 1
) -> dict:
    """bench p's flush of the fullest node with hail's node-evacuate plan.

    The instances are listed largest first (hail evacuates them in the order given; our plans
    take them largest first too).
    """
    source = max(snapshot.nodes, key=lambda name: (sum(snapshot.running[name]), name))
    order = sorted(range(len(snapshot.running[source])), key=lambda i: (-snapshot.running[source][i], i))
    sizes = [snapshot.running[source][i] for i in order]
    names = [f"{source}/{i}" for i in order]
    request = evacuate_request(names)
    body = message(snapshot.nodes, snapshot.running, request, drained=(source,), merged=merged, slack_mib=slack_mib)
    started = time.perf_counter()
    answer = run_hail(hail, body, workdir, n1)
    elapsed = [(time.perf_counter() - started) * 1000]
    moved, _failed = parse_evacuate(answer)
    nodes = {name: node for name, node in snapshot.nodes.items() if name != source}
    running = {name: list(vms) for name, vms in snapshot.running.items() if name != source}
    placed = unplaced = refused = 0
    for name, size in zip(names, sizes, strict=True):
        target = moved.get(name)
        if target is None:
            unplaced += 1
            continue
        node = nodes.get(target)
        if node is None or node.headroom < size:
            refused += 1
            unplaced += 1
            continue
        _book(nodes, target, size)
        running[target].append(size)
        placed += size
    return quality_row(nodes, running, placed, sum(sizes), unplaced, elapsed, "plan", refused)


# The hail variants bench p runs, and on which of its snapshots (one at a time: 10 and 100 nodes;
# flush: 10, 100 and 1,000). "hail": one instance per node, 1 MiB of slack (memory only, the
# comparison of record); "hail-vms": every VM its own instance, as Ganeti would describe the cluster
# (hail's load terms then balance VM counts too; too slow for one at a time at 100 nodes);
# "hail-exact": no slack, hail's own refusal of exact fits; "hail-n1": hail's default global N+1
# capacity check on. The last two at 10 nodes only.
VARIANTS = {
    "hail": {"merged": True, "n1": False, "slack": 1, "one_at_a_time": (10, 100), "flush": (10, 100, 1000)},
    "hail-vms": {"merged": False, "n1": False, "slack": 1, "one_at_a_time": (10,), "flush": (10, 100, 1000)},
    "hail-exact": {"merged": True, "n1": False, "slack": 0, "one_at_a_time": (10,), "flush": (10,)},
    "hail-n1": {"merged": True, "n1": True, "slack": 1, "one_at_a_time": (10,), "flush": (10,)},
}


def _snapshot_rows(hail: str, variants: tuple[str, ...], count: int, fill: float, seed: int) -> list[dict]:
    """Every variant's exercises on one of bench p's snapshots."""
    rows = []
    snapshot = generate(count, fill, seed * 1000 + count)
    sizes = arrivals(snapshot, seed)
    with tempfile.TemporaryDirectory(prefix="pvc-bench-hail-") as tmp:
        workdir = Path(tmp)
        for name in variants:
            variant = VARIANTS[name]
            merged, n1, slack = bool(variant["merged"]), bool(variant["n1"]), int(variant["slack"])
            base = {"nodes": count, "fill": fill, "seed": seed, "selector": name}
            if count in variant["one_at_a_time"]:
                result = one_at_a_time(hail, snapshot, sizes, workdir, merged, n1, slack)
                rows.append({"exercise": "one-at-a-time", **base, **result})
            if count in variant["flush"]:
                rows.append({"exercise": "flush", **base, **flush(hail, snapshot, workdir, merged, n1, slack)})
    return rows


def quality(
    hail: str,
    variants: tuple[str, ...] = tuple(VARIANTS),
    fills=(0.6, 0.8, 0.95),
    seeds=(1, 2, 3),
    workers: int = 2,
) -> list[dict]:
    """bench p's exercises on bench p's snapshots (same generator, seeds and arrivals), by hail.

    One hail process per request takes 0.1-0.3 s on the shared machine, about 11,000 requests at
    100 nodes: the snapshots are shared out to ``workers`` processes (the rows do not depend on it).
    """
    counts = sorted({c for v in variants for key in ("one_at_a_time", "flush") for c in VARIANTS[v][key]})
    jobs = [(count, fill, seed) for count in counts for fill in fills for seed in seeds]
    rows: list[dict] = []
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(_snapshot_rows, hail, variants, *job) for job in jobs]
        for future in futures:
            rows.extend(future.result())
    return rows
