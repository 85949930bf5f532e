"""Benchmark (g): from a libvirtd restart to that node taking migrations again.

A two-host lab with our daemons running and one VM (a no-OS guest). Each sample restarts the
libvirtd of the host the VM is *not* on (SIGTERM, as a package upgrade or the libvirt role's
handler does), waits until its daemon has published `down`, starts libvirtd again, and times
from the moment the restarted libvirtd answers on its socket to the moment a migration request
to that node is accepted (its daemon has reconnected, registered its callbacks again and
published `ok`, and the request's own fit check says yes). The migration is then carried out
and must end `done` on that node, so that the next sample restarts the other host.

Needs root (network namespaces) and the lab's packages; a lab with its own prefix is brought up
and taken down, so it never meets a test lab.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

from pvc_cluster_common import _schema as S
from pvc_cluster_common._cluster import read_node_views, read_vm, wait_for_key
from pvc_cluster_common._requests import RequestError, plan_request, submit_request

from .daemons import LabCluster
from .lab import Lab

WORKDIR = Path("/tmp/pvc-cluster/bench-lab-g")


def measure(samples: int = 5, log=print) -> dict[str, list[float]]:
    """Seconds per sample: ``back`` (restarted libvirtd answering -> a request to the node
    accepted), ``published`` (libvirtd answering -> the node's `libvirt` key back at ok, as a
    watch sees it) and ``libvirtd_start`` (libvirtd started -> answering, for reference)."""
    lab = Lab(WORKDIR, hosts=2, prefix="benchg", log=log)
    lab.up()
    cluster = None
    try:
        cluster = LabCluster(lab, "bench-libvirtd")
        cluster.start()
        uuid = cluster.define_vm("bench-g", "node1", guest="none", meta={S.META_MIGRATION_METHOD: "live"})
        cluster.wait_running_on("node1", uuid)
        series: dict[str, list[float]] = {"back": [], "published": [], "libvirtd_start": []}
        for sample in range(samples):
            source = read_vm(cluster.store, uuid).node
            target = "node2" if source == "node1" else "node1"
            host, path = cluster.host(target), cluster.schema.node_key(target, S.NODE_LIBVIRT)
            host.stop_libvirtd(signal.SIGTERM)
            if not wait_for_key(cluster.store, path, lambda value: value == "down", 60):
                raise RuntimeError(f"{target} did not publish libvirt down after its libvirtd stopped")
            started = time.perf_counter()
            host.start_libvirtd()  # returns once the new libvirtd answers on its socket
            answering = time.perf_counter()
            published: list[float] = []

            def back_at_ok(value: str | None, published: list[float] = published) -> bool:
                if value != "ok":
                    return False
                published.append(time.perf_counter())
                return True

            if not wait_for_key(cluster.store, path, back_at_ok, 60):
                raise RuntimeError(f"{target} did not publish libvirt ok after its libvirtd restarted")
            # the node takes migrations again: the request's own checks accept it
            deadline = answering + 60
            while True:
                vm = read_vm(cluster.store, uuid)
                try:
                    record = submit_request(
                        cluster.store,
                        plan_request(vm, "move", read_node_views(cluster.store), target=target),
                        vm,
                        requester="bench",
                    )
                    break
                except RequestError:
                    if time.perf_counter() >= deadline:
                        raise
                    time.sleep(0.01)  # not yet: a published figure is one keepalive behind (no event to wait on)
            accepted = time.perf_counter()
            cluster.wait_no_migration(uuid)
            final = cluster.history(uuid)[-1]
            if final["id"] != record.id or final["result"] != "done":
                raise RuntimeError(f"the migration to {target} after its libvirtd restart did not end done: {final}")
            cluster.wait_libvirt(
                uuid,
                lambda states, source=source: states[source] is None,
                60,
                f"libvirt on {source} to end its side of the migration",
            )
            series["back"].append(accepted - answering)
            series["published"].append(published[0] - answering)
            series["libvirtd_start"].append(answering - started)
            log(
                f"sample {sample + 1}/{samples}: {target} takes migrations {series['back'][-1]:.3f} s after its "
                f"libvirtd answers (ok published after {series['published'][-1]:.3f} s)"
            )
        return series
    finally:
        try:
            if cluster is not None:
                cluster.close()
        finally:
            lab.down()
