"""The memory invariant of docs/architecture.md ("Memory accounting"), checked on consistent
snapshots of ZooKeeper while daemons work.

For every node N whose daemon state is ``run`` (the nodes placement may choose):

* coverage: the memory of every VM assigned to N (``/domains/<uuid>/node`` = N, which includes
  VMs in flight to N) <= N's published ``memprov`` + the sum of N's reservations;
* capacity: that memory <= ``memtotal - memreserve`` (admitted memory never exceeds capacity).

A snapshot is consistent when a second round of reads finds every key it read unchanged (the
same ``mzxid`` for values, the same ``cversion`` for lists): then every value is the one
ZooKeeper held at the instant between the two rounds. A round that saw a change is discarded and
read again, so the checker never reports a state that did not exist at one instant.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from kazoo.exceptions import NoNodeError

from pvc_cluster_common import _schema as S

NODE_KEYS = (S.NODE_DAEMON_STATE, S.NODE_MEMTOTAL, S.NODE_MEMRESERVE, S.NODE_MEMPROV)


@dataclass
class Snapshot:
    nodes: dict[str, dict[str, str | None]]  # node -> key -> value
    reservations: dict[str, dict[str, int]]  # node -> uuid -> MiB
    assigned: dict[str, str | None]  # uuid -> node


@dataclass
class Findings:
    samples: int = 0
    discarded: int = 0
    violations: list[str] = field(default_factory=list)


class MemoryInvariant:
    """``vm_memory``: uuid -> the VM's memory in MiB (its XML's, which the test does not change)."""

    def __init__(self, store, nodes, vm_memory: dict[str, int]) -> None:
        self.store = store
        self.client = store.client
        self.schema = store.schema
        self.nodes = list(nodes)
        self.vm_memory = dict(vm_memory)

    # ---- reading ------------------------------------------------------------------------------

    def _get_all(self, paths):
        """path -> (value, mzxid) or None, in one pipelined round."""
        pending = [(path, self.client.get_async(path)) for path in paths]
        result = {}
        for path, answer in pending:
            try:
                data, stat = answer.get(timeout=30)
            except NoNodeError:
                result[path] = None
                continue
            result[path] = (data.decode(), stat.mzxid)
        return result

    def _children_all(self, paths):
        pending = [(path, self.client.get_children_async(path, include_data=True)) for path in paths]
        result = {}
        for path, answer in pending:
            try:
                children, stat = answer.get(timeout=30)
            except NoNodeError:
                result[path] = None
                continue
            result[path] = (tuple(sorted(children)), stat.cversion)
        return result

    def _round(self):
        keys = [self.schema.node_key(node, key) for node in self.nodes for key in NODE_KEYS]
        keys += [self.schema.domain_key(uuid, S.DOMAIN_NODE) for uuid in self.vm_memory]
        parents = [self.schema.node_reservations(node) for node in self.nodes]
        values = self._get_all(keys)
        lists = self._children_all(parents)
        reservation_paths = [f"{parent}/{uuid}" for parent in parents if lists[parent] for uuid in lists[parent][0]]
        values.update(self._get_all(reservation_paths))
        return values, lists

    def snapshot(self) -> Snapshot | None:
        """A consistent snapshot, or None when the cluster changed while it was read."""
        first = self._round()
        second = self._round()
        if first != second:
            return None
        values, lists = second

        def value(path):
            found = values.get(path)
            return found[0] if found else None

        nodes = {node: {key: value(self.schema.node_key(node, key)) for key in NODE_KEYS} for node in self.nodes}
        reservations = {}
        for node in self.nodes:
            parent = self.schema.node_reservations(node)
            listed = lists[parent][0] if lists[parent] else ()
            reservations[node] = {uuid: int(value(f"{parent}/{uuid}") or 0) for uuid in listed}
        assigned = {uuid: value(self.schema.domain_key(uuid, S.DOMAIN_NODE)) for uuid in self.vm_memory}
        return Snapshot(nodes, reservations, assigned)

    # ---- checking -----------------------------------------------------------------------------

    def violations(self, snapshot: Snapshot) -> list[str]:
        found = []
        for node, keys in snapshot.nodes.items():
            if keys[S.NODE_DAEMON_STATE] != "run":
                continue
            vms = sorted(uuid for uuid, where in snapshot.assigned.items() if where == node)
            admitted = sum(self.vm_memory[uuid] for uuid in vms)
            memprov = int(keys[S.NODE_MEMPROV] or 0)
            reserved = sum(snapshot.reservations[node].values())
            capacity = int(keys[S.NODE_MEMTOTAL] or 0) - int(keys[S.NODE_MEMRESERVE] or 0)
            if admitted > memprov + reserved:
                found.append(
                    f"{node}: VMs assigned {admitted} MiB ({len(vms)} VMs) but memprov {memprov} + "
                    f"reservations {reserved} = {memprov + reserved} MiB ({snapshot.reservations[node]})"
                )
            if admitted > capacity:
                found.append(f"{node}: VMs assigned {admitted} MiB exceed its capacity {capacity} MiB")
        return found

    def check_now(self, attempts: int = 50) -> list[str]:
        """The violations of one consistent snapshot (read again while the cluster changes)."""
        for _ in range(attempts):
            snapshot = self.snapshot()
            if snapshot is not None:
                return self.violations(snapshot)
        raise AssertionError(f"no consistent snapshot in {attempts} attempts")


class Sampler:
    """Check the invariant on consistent snapshots, back to back, until stopped."""

    def __init__(self, invariant: MemoryInvariant) -> None:
        self.invariant = invariant
        self.findings = Findings()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="invariant", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            snapshot = self.invariant.snapshot()
            if snapshot is None:
                self.findings.discarded += 1
                continue
            self.findings.samples += 1
            if len(self.findings.violations) < 50:
                self.findings.violations.extend(self.invariant.violations(snapshot))
            self._stop.wait(0.01)  # pacing only: leave the CPU to the daemons between samples

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join(timeout=60)
