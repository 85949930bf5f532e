"""Benchmark (e): from a host's power loss to every one of its VMs running elsewhere.

A 3-host lab with a simulated BMC per host (Lab.start_bmcs) and the lab's keepalive settings
(DEFAULT_CONFIG: keepalive 1 s, dead after 6, ZooKeeper session 6 s). Each trial puts VMS no-OS guests on node2 and
powers node2 off (every process of the host killed at once, Lab.power_off); the clock starts just
before. It ends when libvirt on the other hosts has reported the start of the last of them (their
`started` lifecycle events, on connections opened before the trial). Shares:

* detection: power loss -> a peer writes `fencing` (its fence record's ``started``);
* fence: `fencing` -> power off confirmed through the BMC (the record's ``finished``);
* restart: confirmed -> the last VM started elsewhere (the selector, the recovery writes, the
  targets' daemons starting QEMU).

Between trials node2 is powered on, its daemon started and made ready: its VMs come home.
Needs root and the lab's packages; the lab has its own prefix, so it never meets a test lab.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from pvc_cluster_common._cluster import read_fence_record, read_vm
from pvc_node_daemon.hypervisor import Hypervisor

from .daemons import LabCluster
from .lab import Lab

WORKDIR = Path("/tmp/pvc-cluster/bench-ha-lab")
VMS = 3


def measure(trials: int = 5, log=print) -> dict[str, list[float]]:
    lab = Lab(WORKDIR, hosts=3, prefix="benchha", log=log)
    lab.up()
    cluster = None
    try:
        bmcs = lab.start_bmcs()
        cluster = LabCluster(
            lab,
            "bench-ha",
            fencing={"timeout_s": 30, "nodes": {name: bmc.device_config() for name, bmc in bmcs.items()}},
        )
        cluster.start()
        uuids = [cluster.define_vm(f"bench-ha-{i}", "node2", guest="none") for i in range(VMS)]
        for uuid in uuids:
            cluster.wait_running_on("node2", uuid)
        series = {"total": [], "detection": [], "fence": [], "restart": []}
        others = [node for node in cluster.nodes if node != "node2"]
        for trial in range(trials):
            started: dict[str, float] = {}
            all_started = threading.Event()

            def on_event(
                uuid: str,
                event: str,
                _detail: int,
                started: dict[str, float] = started,
                all_started: threading.Event = all_started,
            ) -> None:
                if uuid in uuids and event == "started" and uuid not in started:
                    started[uuid] = time.time()
                    if len(started) == len(uuids):
                        all_started.set()

            connections = [Hypervisor(cluster.host(node).libvirt_uri, call_timeout_s=30) for node in others]
            try:
                for connection in connections:
                    connection.open()
                    connection.add_lifecycle_listener(on_event)
                power_lost = time.time()
                lab.host(2).power_off()
                if not all_started.wait(120):
                    raise RuntimeError(
                        f"trial {trial + 1}: only {len(started)} of {len(uuids)} VMs started "
                        f"elsewhere\n{cluster.logs()}"
                    )
            finally:
                for connection in connections:
                    connection.close()
            fence = read_fence_record(cluster.store, "node2")
            last = max(started.values())
            series["total"].append(last - power_lost)
            series["detection"].append(fence["started"] - power_lost)
            series["fence"].append(fence["finished"] - fence["started"])
            series["restart"].append(last - fence["finished"])
            log(
                f"trial {trial + 1}/{trials}: {series['total'][-1]:.2f} s (detection {series['detection'][-1]:.2f}, "
                f"fence {series['fence'][-1]:.2f}, restart {series['restart'][-1]:.2f})"
            )
            # node2 back: powered on, its daemon started, made ready; its VMs come home
            for uuid in uuids:
                cluster.settle(uuid)
            lab.host(2).power_on()
            cluster.restart("node2")
            cluster.set_domain_state("node2", "unflush")
            cluster.wait_domain_state("node2", "ready")
            for uuid in uuids:
                cluster.settle(uuid)
                if read_vm(cluster.store, uuid).node != "node2":
                    raise RuntimeError(f"trial {trial + 1}: {uuid} did not come home")
        return series
    finally:
        try:
            if cluster is not None:
                cluster.close()
        finally:
            lab.down()
