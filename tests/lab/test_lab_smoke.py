"""Smoke tests of the lab itself: libvirtd per host, live migration, the ZooKeeper ensemble, and
that down / up-after-a-crash leave nothing behind. The lifecycle tests come last and leave the
session's lab up again for whatever runs after them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

import pytest

from pathlib import Path

from .guests import LinuxGuest, domain_xml, guest_uuid
from .storage import NbdDisk
from .lab import REPO_ROOT, list_netns

libvirt = pytest.importorskip("libvirt")  # the venv always has it; this only guards odd runs


def _lab_namespaces(lab) -> list[str]:
    return sorted(ns for ns in list_netns() if ns.startswith(f"{lab.prefix}-"))


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tests.lab", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _wait_dead(records, timeout_s: float = 10.0) -> list:
    # processes killed by PID give no event to wait on; poll /proc every 50 ms
    deadline = time.monotonic() + timeout_s
    alive = [r for r in records if r.alive()]
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [r for r in alive if r.alive()]
    return alive


def test_domain_xml_builder():
    xml = domain_xml("g1", memory_mib=96, serial_path="/tmp/x.log", bridge="br-vm", mac="52:54:00:00:00:01")
    root = ET.fromstring(xml)
    assert root.get("type") == "qemu"
    assert root.findtext("name") == "g1"
    assert root.findtext("uuid") == guest_uuid("g1")
    assert root.find("memory").get("unit") == "MiB" and root.findtext("memory") == "96"
    ostype = root.find("os/type")
    assert (ostype.get("arch"), ostype.get("machine"), ostype.text) == ("x86_64", "pc", "hvm")
    assert root.find("devices/disk") is None
    assert root.find("devices/serial").get("type") == "file"
    assert root.find("devices/serial/source").get("path") == "/tmp/x.log"
    iface = root.find("devices/interface")
    assert iface.get("type") == "bridge" and iface.find("source").get("bridge") == "br-vm"
    assert iface.find("mac").get("address") == "52:54:00:00:00:01"
    bare = ET.fromstring(domain_xml("g2", uuid="11111111-2222-4333-8444-555555555555"))
    assert bare.findtext("uuid") == "11111111-2222-4333-8444-555555555555"
    assert bare.find("devices/interface") is None and bare.find("devices/serial") is None
    assert bare.find("os/kernel") is None and bare.find("os/boot").get("dev") == "hd"  # no OS: SeaBIOS


def test_real_guest_xml():
    linux = LinuxGuest(
        kernel=Path("/s/boot/k"),
        initrd=Path("/s/boot/i"),
        ticks=("10.77.0.254", 5140),
        tick_ms=5,
        dirty_mib_s=40,
        dirty_buf_mib=64,
    )
    disk = NbdDisk(export="g3", host="10.77.0.254", port=10809, path=Path("/s/disks/g3.img"))
    root = ET.fromstring(domain_xml("g3", memory_mib=128, serial_path="/s/g3.log", linux=linux, disk=disk))
    assert (root.findtext("os/kernel"), root.findtext("os/initrd")) == ("/s/boot/k", "/s/boot/i")
    cmdline = root.findtext("os/cmdline").split()
    assert {"console=ttyS0", "pvc.name=g3", "pvc.tick_ms=5", "pvc.dirty_mib_s=40", "pvc.dirty_buf_mib=64"} <= set(
        cmdline
    )
    # the guest kernel's part in surviving a live migration under the lab's QEMU/TCG (guests.py)
    assert {"pti=on", "nopcid"} <= set(cmdline)
    source = root.find("devices/disk/source")
    assert (
        root.find("devices/disk").get("type") == "network" and root.find("devices/disk/driver").get("cache") == "none"
    )
    assert (source.get("protocol"), source.get("name"), source.find("host").get("port")) == ("nbd", "g3", "10809")
    ticks = root.find("devices/console")
    assert ticks.get("type") == "udp" and ticks.find("target").get("type") == "virtio"
    assert [(e.get("mode"), e.get("host"), e.get("service")) for e in ticks.findall("source")][1] == (
        "connect",
        "10.77.0.254",
        "5140",
    )
    assert root.find("devices/channel/target").get("name") == "org.pvc-cluster.guest.0"
    # no collector: no ticks console, and the guest's ticker sleeps
    quiet = ET.fromstring(domain_xml("g4", memory_mib=128, linux=linux.with_(ticks=None)))
    assert quiet.find("devices/console") is None and "pvc.tick_ms=1000" in quiet.findtext("os/cmdline")
    with pytest.raises(ValueError, match="at least 96 MiB"):
        domain_xml("g5", memory_mib=64, linux=linux)
    with pytest.raises(ValueError, match="kernel command line"):
        domain_xml("g 6", memory_mib=128, linux=linux)


@pytest.mark.lab
def test_each_host_runs_its_own_libvirtd(lab):
    for h in lab.hosts:
        conn = h.connect()
        try:
            assert conn.getHostname() == h.name
        finally:
            conn.close()
    # the TLS listeners, from the controller namespace, with a lab host's client certificate
    code = "import libvirt, sys; print(' '.join(libvirt.open(u).getHostname() for u in sys.argv[1:]))"
    out = lab.ctl_python(code, *[h.libvirt_tls_uri_as("node1") for h in lab.hosts], timeout=60).stdout.split()
    assert out == [h.name for h in lab.hosts]


TLS_CLIENT_SNIPPET = """
import json, socket, ssl, sys
import libvirt
libvirt.registerErrorHandler(lambda _c, _e: None, None)
address, tcp_port, tls_port, clients = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
answers = {}
# libvirt's own client, with a lab host's certificate and with one of the CA that is no lab host's
for name in ("node1", "controller"):
    try:
        conn = libvirt.open(f"qemu+tls://{address}/system?pkipath={clients}/{name}")
        answers[name] = "connected to " + conn.getHostname()
        conn.close()
    except libvirt.libvirtError as exc:
        answers[name] = "refused: " + (exc.get_error_message() or str(exc))
# a raw TLS client (libvirt's client would not even present a certificate of another CA): the
# server ends the connection once it has checked the certificate, or when there is none
for name in ("foreign", "no certificate"):
    context = ssl.create_default_context(cafile=f"{clients}/node1/cacert.pem")
    if name != "no certificate":
        context.load_cert_chain(f"{clients}/{name}/clientcert.pem", f"{clients}/{name}/clientkey.pem")
    try:
        with socket.create_connection((address, tls_port), timeout=30) as raw:
            with context.wrap_socket(raw, server_hostname=address) as tls:
                tls.sendall(b"\\0" * 28)
                answers[name] = "open" if tls.recv(1) else "closed by the server"
    except (ssl.SSLError, ConnectionError) as exc:
        answers[name] = "closed by the server: " + type(exc).__name__
    except TimeoutError:
        answers[name] = "open (no answer within 30 s)"
try:
    socket.create_connection((address, tcp_port), timeout=10).close()
    answers["tcp"] = "open"
except OSError as exc:
    answers["tcp"] = "closed: " + type(exc).__name__
print(json.dumps(answers))
"""


@pytest.mark.lab
def test_libvirtd_takes_only_tls_clients_with_a_lab_hosts_certificate(lab):
    """libvirtd's TLS socket takes a lab host's certificate; it refuses one the lab's CA signed for
    a name that is not a lab host's (tls_allowed_dn_list), one of another CA (with a lab host's
    DN) and a client without a certificate; the plain TCP socket does not listen. From the
    controller namespace, like any other machine on the cluster network."""
    from .lab import LIBVIRT_TCP_PORT, LIBVIRT_TLS_PORT

    h = lab.host(2)
    answers = json.loads(
        lab.ctl_python(
            TLS_CLIENT_SNIPPET,
            h.address,
            str(LIBVIRT_TCP_PORT),
            str(LIBVIRT_TLS_PORT),
            str(lab.pki_clients_dir),
            timeout=120,
        ).stdout
    )
    assert answers["node1"] == "connected to node2", answers
    assert answers["controller"].startswith("refused"), answers
    assert answers["foreign"].startswith("closed by the server"), answers
    assert answers["no certificate"].startswith("closed by the server"), answers
    assert answers["tcp"] == "closed: ConnectionRefusedError", answers
    log = h.libvirtd_log.read_text(errors="replace")
    # each refused for its own reason, by the server
    for reason in (
        "not on the list of allowed clients (tls_allowed_dn_list)",  # the controller's
        "The certificate hasn't got a known issuer",  # the foreign one
        "No certificate was found",
    ):
        assert reason in log, log


@pytest.mark.lab
def test_live_migration_host1_to_host2(lab, lab_guest, lab_guests):
    """A real guest with its disk on the shared storage migrates live between two hosts' libvirtds
    (libvirt refuses a live migration unless every disk is shared) over TLS (libvirt's connection
    and QEMU's stream; one without VIR_MIGRATE_TLS is refused), and goes on ticking there."""
    h1, h2 = lab.host(1), lab.host(2)
    started = time.time()
    dom = lab_guest(h1, name="smoke-migrate")
    assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    assert not dom.isPersistent()
    lab_guests.collector.wait_ticking("smoke-migrate", host="node1", since=started)  # booted

    # the lab's QEMUs refuse a migration without TLS (migrate_tls_force): nothing moves
    with pytest.raises(libvirt.libvirtError, match="TLS"):
        dom.migrateToURI3(
            h2.libvirt_tls_uri,
            {libvirt.VIR_MIGRATE_PARAM_URI: h2.migration_uri},
            libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER,
        )
    assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    dom.migrateToURI3(
        h2.libvirt_tls_uri,
        {libvirt.VIR_MIGRATE_PARAM_URI: h2.migration_uri},
        libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER | libvirt.VIR_MIGRATE_TLS,
    )

    c1, c2 = h1.connect(), h2.connect()
    try:
        moved = c2.lookupByName("smoke-migrate")
        assert moved.state()[0] == libvirt.VIR_DOMAIN_RUNNING
        assert moved.UUIDString() == guest_uuid("smoke-migrate")
        with pytest.raises(libvirt.libvirtError) as missing:
            c1.lookupByName("smoke-migrate")
        assert missing.value.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN
    finally:
        c1.close()
        c2.close()
    assert "smoke-migrate" not in h1.domains(running_only=False)
    assert h2.domains() == ["smoke-migrate"]
    # the same guest (its tick counter went on) now runs on node2
    switch = lab_guests.collector.switchovers("smoke-migrate", since=started)
    assert [(sw.source, sw.target) for sw in switch] == [("node1", "node2")], switch
    lab_guests.collector.wait_ticking("smoke-migrate", host="node2", since=switch[0].first.arrival + 0.5)
    row = {r["host"]: r for r in lab.status()}
    assert row["node2"]["domains"] == ["smoke-migrate"] and row["node1"]["domains"] == []
    lab.reset()
    assert all(h.domains(running_only=False) == [] for h in lab.hosts)


ZK_SNIPPET = """
import json, sys
from kazoo.client import KazooClient
members, path = sys.argv[1].split(","), sys.argv[2]
clients = [KazooClient(hosts=m, timeout=5) for m in members]
for c in clients:
    c.start(timeout=15)
clients[0].create(path, b"written-on-" + members[0].encode(), makepath=True)
seen = {}
for m, c in zip(members[1:], clients[1:]):
    c.sync(path)
    seen[m] = c.get(path)[0].decode()
clients[0].delete(path.rsplit("/", 1)[0], recursive=True)
for c in clients:
    c.stop(); c.close()
print(json.dumps(seen))
"""


@pytest.mark.lab
def test_zookeeper_ensemble_from_controller(lab):
    modes = sorted(h.zk.mode() for h in lab.hosts)
    assert modes == ["follower", "follower", "leader"]
    members = [h.zk_address for h in lab.hosts]
    proc = lab.ctl_python(ZK_SNIPPET, ",".join(members), "/lab-smoke/written", timeout=60)
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen == {m: f"written-on-{members[0]}" for m in members[1:]}
    # the ensemble string is what clients in the lab use
    code = (
        "import sys; from kazoo.client import KazooClient; c = KazooClient(hosts=sys.argv[1]); "
        "c.start(timeout=15); print(c.connected); c.stop()"
    )
    assert lab.ctl_python(code, lab.zk_hosts, timeout=60).stdout.strip() == "True"


@pytest.mark.lab
def test_libvirtd_crash_and_restart_keeps_guests(lab, lab_guest):
    h3 = lab.host(3)
    lab_guest(h3, name="survivor")
    qemu = lab.qemu_processes()
    h3.stop_libvirtd(signal.SIGKILL)
    assert not any(r.alive() for r in lab.recorded_pids() if r.host == h3.netns and r.role == "libvirtd")
    assert all(q.alive() for q in qemu)
    h3.start_libvirtd()
    assert h3.domains() == ["survivor"]
    assert lab.healthy()


@pytest.mark.lab
def test_reset_cleans_what_a_failed_test_leaves(lab, monkeypatch):
    """What a test that failed half-way can leave: a host's libvirtd killed and not started again,
    another's stopped (SIGSTOP), and a domain that libvirt does not destroy within reset's call
    timeout (its QEMU stopped: libvirt's destroy waits 10 s before its SIGKILL; reset waits 1 s
    here). reset() leaves every host with a libvirtd that answers and no domain, and no QEMU of
    those domains running, so the next test gets a clean lab."""
    h1, h2, h3 = lab.host(1), lab.host(2), lab.host(3)
    for h, name in ((h1, "reset-stuck"), (h2, "reset-orphan"), (h3, "reset-stopped")):
        conn = h.connect()
        try:
            conn.createXML(domain_xml(name, memory_mib=64), 0)
        finally:
            conn.close()
    qemu = lab.qemu_processes()
    assert len([q for q in qemu if q.host in (h1.netns, h2.netns, h3.netns)]) >= 3
    stuck = next(q for q in qemu if q.host == h1.netns)
    os.kill(stuck.pid, signal.SIGSTOP)
    h2.stop_libvirtd(signal.SIGKILL)
    h3.pause_libvirtd()
    monkeypatch.setattr(lab, "RESET_CALL_TIMEOUT_S", 1.0)
    lab.reset()
    assert [h.domains(running_only=False) for h in lab.hosts] == [[], [], []]
    assert not any(q.alive() for q in qemu)
    assert lab.healthy()


@pytest.mark.lab
def test_zookeeper_member_restart(lab):
    h1 = lab.host(1)
    h1.zk.stop()
    assert h1.zk.mode() is None
    assert sorted(h.zk.mode() for h in lab.hosts[1:]) == ["follower", "leader"]  # 2 of 3: quorum
    h1.zk.start(timeout_s=30)  # not recorded in lab.json: `down` finds it by its pidfile
    assert h1.zk.mode() in ("follower", "leader")
    assert any(r.role == "zookeeper" and r.pid == h1.zk.process.pid for r in lab.processes())


@pytest.mark.lab
def test_up_cleans_up_after_an_interrupted_run(lab, lab_guest):
    lab_guest(3, name="orphan")
    old = [r for r in lab.processes() if r.role != "qemu"]
    qemus = lab.qemu_processes()
    # the guests' storage daemon (storage.py) runs once a real guest was made
    assert sorted(r.role for r in old) == ["libvirtd"] * 3 + ["reaper"] * 3 + ["storage"] + ["zookeeper"] * 3
    assert [r.host for r in qemus] == [lab.host(3).netns]

    # the crash: every lab daemon dies at once, nothing is cleaned; the guest's QEMU lingers
    for r in old:
        os.kill(r.pid, signal.SIGKILL)
    assert _wait_dead(old) == []
    assert all(q.alive() for q in qemus)
    assert _lab_namespaces(lab) == sorted(lab.namespaces)

    # another process brings the lab up again from lab.json
    proc = _cli(
        "up", "--hosts", "3", "--workdir", str(lab.workdir), "--prefix", lab.prefix, "--vm-bridge", lab.vm_bridge
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ended qemu" in proc.stdout
    assert _wait_dead(old + qemus, 1.0) == []
    assert lab.healthy(), lab.status_table()
    assert {r.pid for r in lab.recorded_pids()}.isdisjoint(r.pid for r in old)
    assert lab.qemu_processes() == []
    assert _lab_namespaces(lab) == sorted(lab.namespaces)
    status = _cli("status", "--workdir", str(lab.workdir))
    assert status.returncode == 0 and "leader" in status.stdout, status.stdout + status.stderr


@pytest.mark.lab
def test_down_leaves_nothing_behind(lab, lab_guest):
    lab_guest(1, name="left-running")
    recorded = lab.processes()
    assert len(recorded) == 11  # 3 x (ZooKeeper, libvirtd, reaper) + the guests' storage + the guest's QEMU
    try:
        proc = _cli("down", "--workdir", str(lab.workdir))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert _lab_namespaces(lab) == []
        assert [r for r in recorded if r.alive()] == []
        assert not lab.state_file.exists()
        assert not any(h.libvirt_socket.exists() for h in lab.hosts)
        assert _cli("status", "--workdir", str(lab.workdir)).returncode == 1
        # a second down has nothing to do and succeeds
        assert _cli("down", "--workdir", str(lab.workdir)).returncode == 0
    finally:
        lab.up()  # the session's lab, back for the tests that follow
    assert lab.healthy()
