"""Benchmark (a): live-migration control overhead of our daemons against plain libvirt.

The same running VM goes between the same two lab hosts, alternately:
* by our daemons: a move request, timed until the migration record is gone (the target has
  verified the VM runs there) — node2 -> node1;
* by `virsh migrate --live --p2p` with the same transport address, timed around the command —
  node1 -> node2. The daemons are stopped (an orderly stop; the VM keeps running) while virsh
  moves the VM behind their back, then ZooKeeper is told where it went and they start again.
Needs root (network namespaces) and the lab's packages; a lab with its own prefix is brought up
and taken down, so it never meets a test lab.
"""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

from pvc_cluster_common import _schema as S

from .daemons import LabCluster
from .lab import Lab

WORKDIR = Path("/tmp/pvc-cluster/bench-lab")


def measure(pairs: int = 5, log=print) -> tuple[list[float], list[float]]:
    lab = Lab(WORKDIR, hosts=2, prefix="bench", log=log)
    lab.up()
    cluster = None
    try:
        cluster = LabCluster(lab, "bench-live")
        cluster.start()
        uuid = cluster.define_vm("bench-live", "node1", meta={S.META_MIGRATION_METHOD: "live"}, memory_mib=128)
        cluster.wait_running_on("node1", uuid)
        h1, h2 = lab.host(1), lab.host(2)
        ours, plain = [], []
        for pair in range(pairs):
            # plain libvirt: node1 -> node2, daemons out of the way
            for daemon in cluster.daemons.values():
                daemon.stop()
            started = time.perf_counter()
            subprocess.run(["virsh", "-q", "-c", h1.libvirt_uri, "migrate", "--live", "--p2p", uuid,
                            h2.libvirt_tcp_uri, h2.migration_uri], check=True, capture_output=True, timeout=300)
            plain.append(time.perf_counter() - started)
            cluster.store.commit({cluster.schema.domain_key(uuid, S.DOMAIN_NODE): "node2"})
            cluster.start(ready=False)
            cluster.wait_running_on("node2", uuid)
            # our daemons: node2 -> node1, request to verified running on the target
            started = time.perf_counter()
            record = cluster.request(uuid, "move", target="node1")
            cluster.wait_no_migration(uuid)
            ours.append(time.perf_counter() - started)
            final = cluster.history(uuid)[-1]
            if final["id"] != record["id"] or final["result"] != "done" or final.get("method_used") != "live":
                raise RuntimeError(f"our migration {record['id']} did not end as a live migration: {final}")
            log(f"pair {pair + 1}/{pairs}: ours {ours[-1]:.2f} s, virsh {plain[-1]:.2f} s")
        return ours, plain
    finally:
        try:
            if cluster is not None:
                cluster.close()
        finally:
            lab.down()
