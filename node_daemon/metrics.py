"""Optional Prometheus endpoint (prometheus_client), off by default.

Each daemon uses its own registry, so several daemons (or tests) in one process never collide.
"""

from __future__ import annotations

import threading
from collections import Counter as _Tally
from collections.abc import Container, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from .log import get_logger

if TYPE_CHECKING:
    from pvc_cluster_common._memory import NodeAccount

    from pvc_cluster_common._cluster import VMRecord

log = get_logger(__name__)


class Metrics:
    def __init__(self, node: str) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.node = node
        self.registry = CollectorRegistry()
        self.memory = Gauge("pvc_node_memory_mib", "Node memory figures in MiB", ["kind"], registry=self.registry)
        self.vms = Gauge(
            "pvc_node_vms", "VMs assigned to this node by desired state", ["state"], registry=self.registry
        )
        self.keepalive_seconds = Histogram(
            "pvc_keepalive_duration_seconds",
            "Duration of one keepalive",
            registry=self.registry,
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.keepalive_errors = Counter(
            "pvc_keepalive_errors_total", "Keepalives that could not be written", registry=self.registry
        )
        self.migrations = Counter(
            "pvc_migrations_total",
            "Finished migrations in which this node took part",
            ["method", "result", "role"],
            registry=self.registry,
        )
        self.migration_seconds = Histogram(
            "pvc_migration_duration_seconds",
            "Duration of finished migrations, request to end",
            ["method", "result"],
            registry=self.registry,
            buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300),
        )
        self.invalid_values = Counter(
            "pvc_invalid_values_total",
            "Invalid values found in ZooKeeper, once per version of their key",
            ["kind"],
            registry=self.registry,
        )
        self.fences = Counter(
            "pvc_fences_total",
            "Fences this daemon performed, by method and result",
            ["method", "result"],
            registry=self.registry,
        )
        self.fence_seconds = Histogram(
            "pvc_fence_duration_seconds",
            "Duration of fences (power off and confirmation)",
            registry=self.registry,
            buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
        )
        self.recoveries = Counter(
            "pvc_recoveries_total",
            "VMs of fenced nodes this daemon recovered (recovered) or could not place (unplaced)",
            ["result"],
            registry=self.registry,
        )
        self.fence_failed = Gauge(
            "pvc_node_fence_failed",
            "1 for a peer whose fence failed (its VMs are not recovered until an operator confirms it is off), else 0",
            ["node"],
            registry=self.registry,
        )
        self.libvirt_health = Gauge(
            "pvc_libvirt_health",
            "The daemon's connection to its libvirtd: 1 for the current health, 0 for the others",
            ["health"],
            registry=self.registry,
        )
        self.libvirt_reconnects = Counter(
            "pvc_libvirt_reconnects_total",
            "Connections to libvirtd replaced after one was lost or hung",
            registry=self.registry,
        )
        self._server: tuple[Any, threading.Thread] | None = None

    def libvirt(self, health: str) -> None:
        from pvc_cluster_common._schema import LIBVIRT_HEALTH

        for each in LIBVIRT_HEALTH:
            self.libvirt_health.labels(each).set(1 if each == health else 0)

    def serve(self, address: str, port: int) -> None:
        from prometheus_client import start_http_server

        self._server = start_http_server(port, addr=address, registry=self.registry)
        log.info("metrics served on http://%s:%d/metrics", address, port)

    def stop(self) -> None:
        if self._server is not None:
            server, _thread = self._server
            server.shutdown()
            self._server = None

    def keepalive(
        self,
        seconds: float,
        ok: bool,
        account: NodeAccount,
        memtotal: int,
        memused: int,
        memfree: int,
        snapshot: Mapping[str, VMRecord],
        node: str,
    ) -> None:
        self.keepalive_seconds.observe(seconds)
        if not ok:
            self.keepalive_errors.inc()
        for kind, value in (
            ("total", memtotal),
            ("used", memused),
            ("free", memfree),
            ("allocated", account.memalloc),
            ("provisioned", account.memprov),
        ):
            self.memory.labels(kind).set(value)
        tally = _Tally(record.state for record in snapshot.values() if record.node == node)
        for state in set(tally) | {"start", "stop", "disable", "fail"}:
            self.vms.labels(state).set(tally.get(state, 0))

    def invalid_value(self, kind: str) -> None:
        self.invalid_values.labels(kind).inc()

    def migration(self, final: dict[str, Any]) -> None:
        method = final.get("method_used") or "none"
        result = final.get("result", "unknown")
        role = "target" if final.get("target") == self.node else "source"
        self.migrations.labels(method, result, role).inc()
        self.migration_seconds.labels(method, result).observe(float(final.get("duration_s") or 0))

    def fence(self, method: str, ok: bool, seconds: float) -> None:
        self.fences.labels(method, "fenced" if ok else "fence-failed").inc()
        self.fence_seconds.observe(seconds)

    def recovery(self, result: str) -> None:
        self.recoveries.labels(result).inc()

    def fence_failed_nodes(self, peers: Iterable[str], failed: Container[str]) -> None:
        for peer in peers:
            self.fence_failed.labels(peer).set(1 if peer in failed else 0)
