"""Benchmark (a): live-migration control overhead of our daemons against plain libvirt.

The same running VM goes between the same two lab hosts, alternately:

* by our daemons: a move request (planned from the cluster's state, then submitted), timed from
  the submission to the VM running on the target, as the target records it (the `done` step,
  stamped when the target has seen libvirt run the VM there); the time the
  planning reads took and the time until the record is gone are kept too;
* by `virsh migrate --live --p2p` with the same transport address, timed from
  the command's start to the VM running on the target, as the target's libvirtd reports it (its
  `resumed` lifecycle event, which comes before the command returns: the source still cleans
  up), so that both sides are timed to the same point; the command's own duration is kept too.
  The daemons are stopped (an orderly stop; the VM keeps running) while virsh moves the VM
  behind their back, then ZooKeeper is told where it went and they start again; our move is
  made once both have written a keepalive after that (their start-up work is over).

Each pair takes the VM from node1 to node2 and back, one way each; the even pairs start with
virsh and the odd ones with our daemons, so both are timed in both directions as often.

Needs root (network namespaces) and the lab's packages; a lab with its own prefix is brought up
and taken down, so it never meets a test lab.
"""
from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

from pvc_cluster_common import _schema as S
from pvc_cluster_common._cluster import read_node_views, read_vm
from pvc_cluster_common._requests import plan_request, submit_request
from pvc_node_daemon.hypervisor import Hypervisor

from .daemons import LabCluster
from .lab import Lab

WORKDIR = Path("/tmp/pvc-cluster/bench-lab")


def measure(pairs: int = 5, log=print) -> dict[str, list[float]]:
    """Seconds per sample: ``ours`` (submission to running on the target), ``ours_planning``
    (the reads that plan the request), ``ours_record_gone`` (submission to the record removed),
    ``virsh`` (command start to the VM resumed on the target) and ``virsh_command``.

    Each pair moves the VM from node1 and back, one way by virsh and the other by our daemons;
    which goes first alternates, so both are timed in both directions as often."""
    lab = Lab(WORKDIR, hosts=2, prefix="bench", log=log)
    lab.up()
    cluster = None
    try:
        cluster = LabCluster(lab, "bench-live")
        cluster.start()
        uuid = cluster.define_vm("bench-live", "node1", meta={S.META_MIGRATION_METHOD: "live"}, memory_mib=128)
        cluster.wait_running_on("node1", uuid)
        series = {"ours": [], "ours_planning": [], "ours_record_gone": [], "virsh": [], "virsh_command": []}

        def by_virsh(source: str, target: str) -> None:
            # plain libvirt, daemons out of the way
            for daemon in cluster.daemons.values():
                daemon.stop()
            resumed: list[float] = []
            arrived = threading.Event()

            def on_event(domain: str, event: str, _detail: int) -> None:
                if domain == uuid and event == "resumed" and not resumed:
                    resumed.append(time.perf_counter())
                    arrived.set()

            src, dst = cluster.host(source), cluster.host(target)
            with Hypervisor(dst.libvirt_uri, call_timeout_s=30) as libvirt_there:
                libvirt_there.add_lifecycle_listener(on_event)
                started = time.perf_counter()
                subprocess.run(["virsh", "-q", "-c", src.libvirt_uri, "migrate", "--live", "--p2p", uuid,
                                dst.libvirt_tcp_uri, dst.migration_uri], check=True, capture_output=True, timeout=300)
                series["virsh_command"].append(time.perf_counter() - started)
                if not arrived.wait(30):
                    raise RuntimeError(f"libvirt on {dst.name} reported no resume of {uuid} after virsh migrate")
            series["virsh"].append(resumed[0] - started)
            cluster.store.commit({cluster.schema.domain_key(uuid, S.DOMAIN_NODE): target})
            cluster.start(ready=False)
            cluster.wait_running_on(target, uuid)
            # Both daemons have just started: let each write one more keepalive first, so that
            # their start-up work (first reads of every key, first listing, first resync) is over,
            # as on daemons that have been running for a while.
            for node in cluster.nodes:
                path = cluster.schema.node_key(node, S.NODE_KEEPALIVE)
                before = cluster.store.read(path)
                cluster.wait(path, lambda value, before=before: value != before, 30, f"a keepalive of {node}")

        def by_daemons(target: str) -> None:
            planning = time.perf_counter()
            vm = read_vm(cluster.store, uuid)
            plan = plan_request(vm, "move", read_node_views(cluster.store), target=target)
            started_wall, started = time.time(), time.perf_counter()
            record = submit_request(cluster.store, plan, vm, requester="bench")
            cluster.wait_no_migration(uuid)
            series["ours_record_gone"].append(time.perf_counter() - started)
            series["ours_planning"].append(started - planning)
            final = cluster.history(uuid)[-1]
            if final["id"] != record.id or final["result"] != "done" or final.get("method_used") != "live":
                raise RuntimeError(f"our migration {record.id} did not end as a live migration: {final}")
            series["ours"].append(final["steps"]["done"] - started_wall)
            # The VM runs on the target from `done` on, but the source's libvirtd still ends its
            # side of the job (about 0.2 s, as virsh's own return shows); a migration of the VM
            # started before that waits for it. Wait until the source has let the VM go.
            cluster.wait_libvirt(uuid, lambda states: states[final["source"]] is None, 60,
                                 f"libvirt on {final['source']} to end its side of the migration")

        for pair in range(pairs):   # the VM starts and ends each pair on node1
            if pair % 2 == 0:
                by_virsh("node1", "node2")
                by_daemons("node1")
            else:
                by_daemons("node2")
                by_virsh("node2", "node1")
            log(f"pair {pair + 1}/{pairs}: ours {series['ours'][-1]:.3f} s, virsh {series['virsh'][-1]:.3f} s")
        return series
    finally:
        try:
            if cluster is not None:
                cluster.close()
        finally:
            lab.down()
