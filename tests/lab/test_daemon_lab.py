"""The node daemon on real hosts: one pvc-node-daemon per lab host, each driving its host's real
libvirtd (QEMU/TCG guests), all on the lab's three-member ZooKeeper ensemble."""

from __future__ import annotations

import json

import pytest

from pvc_cluster_common import _schema as S

from .daemons import lab_cluster  # noqa: F401  (fixture)

pytestmark = pytest.mark.lab


def node_key(cluster, node, key):
    return cluster.store.find_text(cluster.schema.node_key(node, key))


def test_every_daemon_registers_runs_and_stops_without_touching_guests(lab_cluster):
    from .lab import netns_inode, netns_inode_of_pid, proc_cmdline

    cluster = lab_cluster()
    cluster.start(ready=False)
    for h in cluster.lab.hosts:
        node = h.name
        # the PID the test holds is the daemon itself, in its host's network namespace
        pid = cluster.daemons[node].pid
        assert proc_cmdline(pid)[1:3] == ["-m", "pvc_node_daemon"]
        assert netns_inode_of_pid(pid) == netns_inode(h.netns)
        assert node_key(cluster, node, S.NODE_DAEMON_STATE) == "run"
        assert node_key(cluster, node, S.NODE_DOMAIN_STATE) == "flushed"  # a new node takes no VMs yet
        assert cluster.store.exists(cluster.schema.node_key(node, S.NODE_ALIVE))
        # what peers use to reach this host: its own lab address, never a name or loopback
        assert node_key(cluster, node, S.NODE_LIBVIRT_URI) == f"qemu+tls://{h.address}/system"
        assert node_key(cluster, node, S.NODE_TRANSPORT_URI) == f"tcp://{h.address}"
        assert int(node_key(cluster, node, S.NODE_MEMTOTAL)) > 0
        assert float(node_key(cluster, node, S.NODE_KEEPALIVE)) > 0
    for node in cluster.nodes:
        cluster.set_domain_state(node, "unflush")
    for node in cluster.nodes:
        cluster.wait_domain_state(node, "ready")

    uuid = cluster.define_vm("survivor", "node1")
    cluster.wait_running_on("node1", uuid)
    domid = cluster.domain_id("node1", uuid)

    # An orderly stop records `stop` and removes `alive`, and leaves the guest running.
    daemon = cluster.daemons["node1"]
    assert daemon.stop() == 0
    assert node_key(cluster, "node1", S.NODE_DAEMON_STATE) == "stop"
    assert not cluster.store.exists(cluster.schema.node_key("node1", S.NODE_ALIVE))
    assert cluster.libvirt_states(uuid)["node1"] == "running"
    # and so does a crash
    cluster.daemons["node1"].start()
    cluster.wait_daemon_state("node1", "run")
    cluster.daemons["node1"].kill()
    cluster.restart("node1")
    # the guest was never restarted: same QEMU, same libvirt domain ID, on node1 only
    cluster.wait_running_on("node1", uuid)
    assert cluster.domain_id("node1", uuid) == domid
    assert cluster.store.exists(cluster.schema.node_key("node1", S.NODE_ALIVE))
    cluster.check_invariants([uuid])


def test_vm_defined_in_zookeeper_runs_on_its_node(lab_cluster):
    cluster = lab_cluster()
    cluster.start()
    uuid = cluster.define_vm("defined", "node1")
    cluster.wait_running_on("node1", uuid)
    # the daemon publishes what runs, and statistics from the real balloon device
    cluster.wait(
        cluster.schema.node_key("node1", S.NODE_RUNNINGDOMAINS),
        lambda v: uuid in json.loads(v or "[]"),
        what="node1 runningdomains",
    )
    stats = json.loads(
        cluster.wait(cluster.schema.domain_key(uuid, S.DOMAIN_STATS), lambda v: bool(v), what="VM statistics")
    )
    assert stats["state"] == "running" and stats["memory_mib"] == 128 and stats["vcpus"] == 1
    assert "actual" in stats["memory_stats"]  # the balloon's size, in KiB, from QEMU
    # stop (forced) and start again, both from ZooKeeper
    cluster.set_state(uuid, "stop")
    cluster.wait_libvirt(uuid, lambda states: cluster.running_nodes(states) == [], what="VM stopped")
    cluster.set_state(uuid, "start")
    cluster.wait_running_on("node1", uuid)
    cluster.check_invariants([uuid])


def test_keepalive_memory_accounting_matches_libvirt(lab_cluster):
    import libvirt

    cluster = lab_cluster()
    cluster.start()
    running = cluster.define_vm("acct-running", "node1", memory_mib=160)
    stopped = cluster.define_vm("acct-stopped", "node1", state="stop", memory_mib=96)
    cluster.wait_running_on("node1", running)

    # What libvirt says runs on node1 right now: every active domain's configured maximum.
    conn = cluster.host("node1").connect()
    try:
        active = conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
        alloc = sum(dom.maxMemory() // 1024 for dom in active)
        vcpus = sum(dom.info()[3] for dom in active)
        uuids = sorted(dom.UUIDString() for dom in active)
        total = conn.getMemoryStats(libvirt.VIR_NODE_MEMORY_STATS_ALL_CELLS)["total"] // 1024
    finally:
        conn.close()
    assert uuids == [running] and alloc == 160
    # a stopped VM assigned here counts in memprov (it may start here) but not in memalloc
    expected = {
        S.NODE_MEMALLOC: str(alloc),
        S.NODE_MEMPROV: str(alloc + 96),
        S.NODE_VCPUALLOC: str(vcpus),
        S.NODE_DOMAINCOUNT: "1",
    }
    for key, value in expected.items():
        cluster.wait(
            cluster.schema.node_key("node1", key), lambda v, value=value: v == value, what=f"node1 {key} {value}"
        )
    assert json.loads(node_key(cluster, "node1", S.NODE_RUNNINGDOMAINS)) == uuids
    assert int(node_key(cluster, "node1", S.NODE_MEMTOTAL)) == total
    memused, memfree = int(node_key(cluster, "node1", S.NODE_MEMUSED)), int(node_key(cluster, "node1", S.NODE_MEMFREE))
    assert 0 < memused < total and 0 < memfree < total
    # the other hosts run nothing and are assigned nothing
    for node in ("node2", "node3"):
        cluster.wait(cluster.schema.node_key(node, S.NODE_MEMPROV), lambda v: v == "0", what=f"{node} memprov 0")
        assert node_key(cluster, node, S.NODE_MEMALLOC) == "0"

    # Starting the stopped VM moves its memory into memalloc; memprov is unchanged.
    cluster.set_state(stopped, "start")
    cluster.wait_running_on("node1", stopped)
    cluster.wait(cluster.schema.node_key("node1", S.NODE_MEMALLOC), lambda v: v == str(160 + 96), what="memalloc 256")
    assert node_key(cluster, "node1", S.NODE_MEMPROV) == str(160 + 96)
    cluster.check_invariants([running, stopped])


def test_guest_shuts_down_cleanly_on_the_power_button(lab_cluster):
    """A real guest answers the ACPI power button: the daemon's clean shutdown ends with the guest
    powering itself off, well inside the timeout, and nothing is forced."""
    cluster = lab_cluster(intervals={"shutdown_timeout_s": 60})
    cluster.start()
    uuid = cluster.define_vm("polite", "node1")
    cluster.wait_guest_up(uuid, "node1")  # booted: acpid listens
    cluster.set_state(uuid, "shutdown")
    cluster.wait_vm_state(uuid, "stop")  # the daemon records the end of the shutdown
    assert cluster.running_nodes(cluster.libvirt_states(uuid)) == []
    log = cluster.daemons["node1"].log()
    assert f"VM {uuid}: shut down" in log and "forced" not in log, log[-4000:]
    console = cluster.guests.console_text("polite")
    assert "ACPI power button pressed" in console and "powering off" in console, console[-2000:]
    cluster.check_invariants([uuid])


def test_guest_that_ignores_shutdown_is_stopped_after_the_timeout(lab_cluster):
    """Hazard 14 with a guest that has no OS: nothing answers the ACPI power button (SeaBIOS
    spins on "no bootable device"), so the daemon's clean shutdown times out and it forces a stop."""
    cluster = lab_cluster(intervals={"shutdown_timeout_s": 2})
    cluster.start()
    uuid = cluster.define_vm("deaf", "node1", guest="none")
    cluster.wait_running_on("node1", uuid)
    cluster.set_state(uuid, "shutdown")
    cluster.wait_vm_state(uuid, "stop")  # the daemon records the end of the shutdown
    assert cluster.running_nodes(cluster.libvirt_states(uuid)) == []
    log = cluster.daemons["node1"].log()
    assert "did not shut down within 2 s: forced stop" in log, log[-4000:]
    assert node_key(cluster, "node1", S.NODE_DOMAIN_STATE) == "ready"
    cluster.check_invariants([uuid])


def test_a_hung_libvirtd_is_a_health_state_not_a_dead_node(lab_cluster):
    """libvirtd stopped with SIGSTOP (it accepts connections and never answers): node1's
    keepalive goes on from the last figures, published as stale with their age and never as
    zeros, for longer than its peers take to declare a silent node dead; SIGCONT brings fresh
    figures back."""
    import os
    import signal

    from .lab import _read_pid

    cluster = lab_cluster()
    cluster.start()
    uuid = cluster.define_vm("patient", "node1")
    cluster.wait_running_on("node1", uuid)
    stale = cluster.schema.node_key("node1", S.NODE_FIGURES_STALE)
    cluster.wait(stale, lambda v: v == "false", what="node1's figures fresh")
    # figures read since the VM started (fresh ones may predate it): the last figures kept through
    # the hang must list it
    cluster.wait(
        cluster.schema.node_key("node1", S.NODE_RUNNINGDOMAINS),
        lambda v: uuid in json.loads(v or "[]"),
        what="node1's figures to list the VM",
    )
    memtotal = node_key(cluster, "node1", S.NODE_MEMTOTAL)
    assert int(memtotal) > 0
    pid = _read_pid(cluster.host("node1").libvirtd_pidfile)
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        cluster.wait(stale, lambda v: v == "true", what="node1's figures stale")
        # longer than peers wait for a keepalive before they declare a node dead, and shorter
        # than libvirt's client keepalive (5 s x 3 probes) takes to close the connection: this
        # test is about the keepalive and the figures; a longer hang, the `libvirt` health key
        # and the reconnection are tests/lab/test_libvirtd_lab.py's
        intervals = cluster.daemons["node1"].config["intervals"]
        dead_after_s = intervals["keepalive_s"] * (intervals["dead_after"] + 1)
        cluster.wait(
            cluster.schema.node_key("node1", S.NODE_FIGURES_AGE),
            lambda v: float(v or 0) > dead_after_s,
            what=f"node1's figures older than {dead_after_s} s",
        )
        assert node_key(cluster, "node1", S.NODE_DAEMON_STATE) == "run"
        assert node_key(cluster, "node1", S.NODE_MEMTOTAL) == memtotal  # the last figures, not zeros
        assert uuid in json.loads(node_key(cluster, "node1", S.NODE_RUNNINGDOMAINS))
    finally:
        os.kill(pid, signal.SIGCONT)
    cluster.wait(stale, lambda v: v == "false", timeout_s=120, what="node1's figures fresh again")
    assert node_key(cluster, "node1", S.NODE_DAEMON_STATE) == "run"
    cluster.check_invariants([uuid])
