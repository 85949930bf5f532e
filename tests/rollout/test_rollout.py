"""playbooks/rollout.yml on the 3-host lab, for real: each role renders its files into each host's
private view (tests/lab/hostviews.py), the lab's libvirtds are restarted with the libvirt role's
configuration, and the node daemons run from the unit and configuration the node_daemon role
rendered. Then: the VM bridges carry no IPv6, nothing leaked onto the machine or another host, the
cluster runs secured (its ZooKeeper ensemble is the zookeeper role's: TLS and digest authentication),
and a second run changes nothing."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from pvc_cluster_common import _schema as S
from pvc_node_daemon.config import parse_config
from tests.support.zookeeper import in_netns
from tests.lab.hostviews import (
    NODE_DAEMON_UNIT,
    ROLLOUT_ZK_CA_ON_NODE,
    ROLLOUT_ZK_ELECTION_PORT,
    ROLLOUT_ZK_PORT,
    ROLLOUT_ZK_QUORUM_PORT,
    unit_exec_start,
)
from tests.lab.lab import LIBVIRT_TCP_PORT, proc_cmdline

from tests.support import identities

from .fixtures import ROLE_FILES, UPLINK, VM_BRIDGES, machine_state
from .secured import check_client_access, check_host_names

# a rollout takes a minute or two on a quiet 2-core machine, several on a busy one
pytestmark = [pytest.mark.lab, pytest.mark.timeout(1200)]

IPV6_OFF = {"disable_ipv6": "1", "accept_ra": "0", "autoconf": "0", "addr_gen_mode": "1"}


def _addresses(host) -> dict[str, list[dict]]:
    """interface -> its IPv6 addresses, in the host's network namespace."""
    out = subprocess.run(
        ["ip", "-n", host.netns, "-j", "-6", "addr", "show"], capture_output=True, text=True, check=True
    ).stdout
    return {link["ifname"]: link.get("addr_info", []) for link in json.loads(out)}


def _sysctls(view, iface: str) -> dict[str, str]:
    out = view.run(f"cd /proc/sys/net/ipv6/conf/{iface} && for k in {' '.join(IPV6_OFF)}; do echo $k=$(cat $k); done")
    return dict(line.split("=", 1) for line in out.stdout.split())


def _links(host) -> dict[str, dict]:
    out = subprocess.run(
        ["ip", "-n", host.netns, "-j", "-d", "link", "show"], capture_output=True, text=True, check=True
    ).stdout
    return {link["ifname"]: link for link in json.loads(out)}


def _node_key(cluster, node: str, key: str) -> str | None:
    return cluster.store.find_text(cluster.store.schema.node_key(node, key))


# ---- the first run ----------------------------------------------------------------------------


def test_rollout_makes_every_node_run_and_ready(rolled_out):
    run = rolled_out.runs["first"]
    changed = run.changed()
    for node in rolled_out.nodes():
        assert changed.get(node, 0) > 0, f"the first run changed nothing on {node}: {run.stats}"
        assert _node_key(rolled_out, node, S.NODE_DAEMON_STATE) == "run"
        assert _node_key(rolled_out, node, S.NODE_DOMAIN_STATE) == "ready"
        assert rolled_out.store.exists(rolled_out.store.schema.node_key(node, S.NODE_ALIVE))
    print(f"\nfirst rollout: {run.duration_s:.1f} s, changed {changed}; slowest tasks {run.slowest(5)}")


def test_every_role_wrote_its_files_on_every_node(rolled_out):
    for view in rolled_out.views.views:
        missing = [path for path in ROLE_FILES if view.read_text(path) is None]
        assert not missing, f"{view.host.name} lacks {missing}"
        assert view.read_text("/var/lib/zookeeper/myid").strip() == str(view.host.index)


def test_nothing_leaked_onto_the_machine_or_other_hosts(rolled_out):
    """Each host writes into its own copy-on-write layer; the machine's files never change."""
    assert machine_state(rolled_out.machine_before) == rolled_out.machine_before, "the machine's own files changed"
    assert not os.path.exists("/etc/pvc") and not os.path.exists("/etc/zookeeper/pvc")
    for view in rolled_out.views.views:
        upper, _ = view.layer("/etc")
        assert (upper / "pvc" / "node-daemon.yaml").is_file()
        config = yaml.safe_load(view.read_text("/etc/pvc/node-daemon.yaml"))
        assert config["node"] == view.host.name  # each host sees its own file at the same path
    assert len({view.read_text("/etc/pvc/node-daemon.yaml") for view in rolled_out.views.views}) == 3


# ---- VM bridges -------------------------------------------------------------------------------


def test_vm_bridges_exist_without_ipv6(rolled_out):
    for view in rolled_out.views.views:
        h = view.host
        links = _links(h)
        addresses = _addresses(h)
        for bridge in VM_BRIDGES:
            name = bridge["name"]
            assert links[name]["linkinfo"]["info_kind"] == "bridge"
            assert "UP" in links[name]["flags"], f"{name} on {h.name} is not up"
            assert addresses.get(name, []) == [], f"{name} on {h.name} has IPv6 addresses {addresses.get(name)}"
            assert _sysctls(view, name) == IPV6_OFF
        assert links[UPLINK].get("master") == "vmbr1"
        assert links[UPLINK]["mtu"] == 1400 and links["vmbr1"]["mtu"] == 1400
        assert addresses.get(UPLINK, []) == [], f"uplink {UPLINK} on {h.name} has IPv6 addresses"
        assert _sysctls(view, UPLINK) == IPV6_OFF


def test_other_interfaces_keep_their_ipv6(rolled_out):
    lab = rolled_out.lab
    for view in rolled_out.views.views:
        h = view.host
        addresses = _addresses(h)
        assert any(a["local"] == "::1" for a in addresses["lo"])
        assert any(a["local"].startswith("fe80:") for a in addresses[h.iface]), f"{h.iface} lost its link-local address"
        for iface in (h.iface, lab.vm_bridge):  # the lab's own bridge is not a VM bridge of the role
            assert _sysctls(view, iface)["disable_ipv6"] == "0", f"IPv6 turned off on {iface} of {h.name}"


def test_vm_bridges_stay_ipv6_free_after_a_reboot(rolled_out):
    """What the host applies at boot: the sysctl.d file and the ifupdown stanzas name every bridge,
    the uplink and the VM taps, and run the helper before the links come up."""
    for view in rolled_out.views.views:
        sysctl = view.read_text("/etc/sysctl.d/60-pvc-vm-bridges.conf")
        for iface in ("vmbr0", "vmbr1", UPLINK, "vnet*"):
            for key, value in IPV6_OFF.items():
                assert f"-net.ipv6.conf.{iface}.{key} = {value}" in sysctl
        stanzas = view.read_text("/etc/network/interfaces.d/pvc-vm-bridges")
        assert "iface vmbr0 inet manual" in stanzas and "iface vmbr1 inet manual" in stanzas
        assert f"pre-up ip link set dev {UPLINK} master $IFACE" in stanzas
        assert "pre-up /usr/local/sbin/pvc-vm-ipv6-off $IFACE" in stanzas
        # the helper the stanzas call works, and reports nothing to do on a clean host
        assert view.run(["/usr/local/sbin/pvc-vm-ipv6-off", "--ports", "vmbr0", "vmbr1"]).stdout == ""


def test_vm_bridge_helper_turns_ipv6_off_on_a_fresh_bridge(rolled_out):
    view = rolled_out.views.view(1)
    try:
        view.run("ip link add vmbrtest type bridge && ip link set vmbrtest up")
        deadline = time.monotonic() + 5
        while not _addresses(view.host).get("vmbrtest") and time.monotonic() < deadline:
            time.sleep(0.1)  # the kernel adds the link-local address when the link comes up
        assert _addresses(view.host).get("vmbrtest"), "a new bridge should get a link-local address by default"
        out = view.run(["/usr/local/sbin/pvc-vm-ipv6-off", "vmbrtest"]).stdout
        assert "changed vmbrtest disable_ipv6" in out
        assert _addresses(view.host).get("vmbrtest", []) == []
        assert _sysctls(view, "vmbrtest") == IPV6_OFF
    finally:
        view.run("ip link del vmbrtest", check=False)


# ---- libvirt ----------------------------------------------------------------------------------


def test_libvirtd_runs_with_the_rendered_configuration(rolled_out, tmp_path):
    import libvirt

    # node1's certificate from the cluster CA the role created on the controller, as libvirt's
    # pkipath wants it
    ca = rolled_out.views.cluster_ca_dir
    node1_client = tmp_path / "node1"
    node1_client.mkdir()
    for name, source in (
        ("cacert.pem", ca / "ca.pem"),
        ("clientcert.pem", ca / "issued" / "node1-libvirt.pem"),
        ("clientkey.pem", ca / "issued" / "node1-libvirt.key"),
    ):
        shutil.copy(source, node1_client / name)
    assert oct((ca / "ca-key.pem").stat().st_mode & 0o777) == "0o600" and oct(ca.stat().st_mode & 0o777) == "0o700"

    for view in rolled_out.views.views:
        h = view.host
        conf = view.read_text("/etc/libvirt/libvirtd.conf")
        assert conf == (h.dir / "etc" / "libvirtd.conf").read_text()  # the file the host's libvirtd reads
        settings = dict(
            line.split(" = ", 1) for line in conf.splitlines() if " = " in line and not line.startswith("#")
        )
        assert settings["listen_addr"] == f'"{h.address}"'
        # the role's default: TLS only, for the cluster's nodes' certificates from the cluster CA
        assert settings["listen_tls"] == "1" and settings["listen_tcp"] == "0" and settings["auth_tls"] == '"none"'
        nodes = ", ".join(f'"O=pvc.cluster,CN={node}"' for node in rolled_out.nodes())
        assert settings["tls_allowed_dn_list"] == f"[ {nodes} ]"
        assert settings["unix_sock_dir"] == f'"{h.libvirt_socket.parent}"'
        qemu_conf = view.read_text("/etc/libvirt/qemu.conf")
        for line in (
            'security_driver = "none"',
            "migrate_tls_force = 1",
            'migrate_tls_x509_cert_dir = "/etc/pki/qemu"',
        ):
            assert line in qemu_conf
        # the node's certificates where the host's libvirtd and QEMU read them, keys not for others
        modes = dict(
            line.rsplit(" ", 1)
            for line in view.run(
                "stat -c '%n %U:%G:%a' /etc/pki/CA/cacert.pem /etc/pki/libvirt/servercert.pem "
                "/etc/pki/libvirt/private/serverkey.pem /etc/pki/libvirt/private/clientkey.pem "
                "/etc/pki/qemu/server-key.pem /etc/pki/qemu/client-key.pem /etc/pki/qemu"
            ).stdout.splitlines()
        )
        assert modes == {
            "/etc/pki/CA/cacert.pem": "root:root:644",
            "/etc/pki/libvirt/servercert.pem": "root:root:644",
            "/etc/pki/libvirt/private/serverkey.pem": "root:root:600",
            "/etc/pki/libvirt/private/clientkey.pem": "root:root:600",
            # QEMU's own, readable by the group QEMU runs as (the lab's: root)
            "/etc/pki/qemu/server-key.pem": "root:root:640",
            "/etc/pki/qemu/client-key.pem": "root:root:640",
            "/etc/pki/qemu": "root:root:750",
        }, modes
        assert (h.pki_dir / "libvirt" / "servercert.pem").read_text() == view.read_text(
            "/etc/pki/libvirt/servercert.pem"
        )
        hook = h.dir / "etc" / "hooks" / "qemu.d" / "50-pvc-vm-bridges"
        assert hook.is_file() and os.access(hook, os.X_OK)
        # restarted by the lab hook after the role changed its files: libvirtd read this config
        key = rolled_out.views.base / f"libvirtd-{h.name}.key"
        assert key.exists()
        # peers reach it on the cluster network over TLS, with a node's certificate from the cluster
        # CA (from a lab namespace; the address exists only there); no plain TCP socket
        uri = f"{h.libvirt_tls_uri}?pkipath={node1_client}"
        conn = in_netns(rolled_out.lab.ctl_netns, lambda: libvirt.open(uri))  # noqa: B023 (called at once)
        try:
            assert conn.getHostname() == h.name
        finally:
            conn.close()
        with pytest.raises(ConnectionRefusedError):
            in_netns(rolled_out.lab.ctl_netns, lambda: socket.create_connection((h.address, LIBVIRT_TCP_PORT), 10))  # noqa: B023


# ---- node daemon ------------------------------------------------------------------------------


def test_daemons_run_from_the_rendered_unit_and_configuration(rolled_out):
    services = {s["node"]: s for s in rolled_out.views.services() if s["role"] == "node-daemon"}
    assert sorted(services) == rolled_out.nodes()
    for view in rolled_out.views.views:
        h = view.host
        service = services[h.name]
        argv = unit_exec_start(view.read_text(NODE_DAEMON_UNIT))
        assert proc_cmdline(service["pid"])[-len(argv) + 1 :] == argv[1:]
        assert os.stat(f"/proc/{service['pid']}/ns/mnt").st_ino == os.stat(view.mnt).st_ino, "not in the host's view"
        assert os.stat(f"/proc/{service['pid']}/ns/net").st_ino == os.stat(f"/run/netns/{h.netns}").st_ino
        config = _daemon_config(view)
        assert config.node == h.name
        assert config.zookeeper.hosts == rolled_out.views.zk_hosts and config.zookeeper.root == rolled_out.root
        assert config.libvirt_uri == h.libvirt_uri and config.address == h.address
        # what the running daemon published comes from that configuration
        assert _node_key(rolled_out, h.name, S.NODE_LIBVIRT_URI) == f"qemu+tls://{h.address}/system"
        assert config.migration_tls is True
        assert _node_key(rolled_out, h.name, S.NODE_TRANSPORT_URI) == f"tcp://{h.address}"
        # by default the daemon logs to standard output only (the journal under systemd; here the
        # service's log, which stands in for it), and no log file is written in the host's view
        assert config.log_stdout and config.log_file is None
        assert f"node {h.name} running" in Path(service["log"]).read_text()
        assert view.read_text("/var/log/pvc/node-daemon.log") is None


def _daemon_config(view):
    """The daemon configuration the node_daemon role rendered on ``view``'s host, parsed (its
    files checked) as the daemon there does: the files it names are the host's own."""
    data = yaml.safe_load(view.read_text("/etc/pvc/node-daemon.yaml"))
    tls = data["zookeeper"].get("tls") or {}
    for key in ("ca", "cert", "key"):
        if tls.get(key, "").startswith("/etc/"):
            tls[key] = str(view.layer("/etc")[0] / tls[key].removeprefix("/etc/"))
    return parse_config(data)


def _listening_ports(netns: str, pid: int) -> set[int]:
    """The TCP ports process ``pid`` listens on, in network namespace ``netns``."""
    out = subprocess.run(
        ["ip", "netns", "exec", netns, "ss", "-Hltnp"], capture_output=True, text=True, check=True
    ).stdout
    return {int(line.split()[3].rsplit(":", 1)[1]) for line in out.splitlines() if f"pid={pid}," in line}


def test_the_rolled_out_cluster_is_secured(rolled_out):
    """The rollout's defaults, end to end: the ensemble is the zookeeper role's members, serving TLS
    only (no plaintext client port) with certificates of the cluster's one CA (cluster_ca, which
    issues libvirt's too) that name each member's own host; every daemon connects over TLS, checked
    against that CA (a copy the node_daemon role installs on every hypervisor), as the nodes and
    itself (digest), never insecure; and a client without credentials, or with a wrong password,
    gets nothing of the cluster: no read, no write."""
    views, lab, store = rolled_out.views, rolled_out.lab, rolled_out.store
    ca = str(views.zookeeper_ca_dir / "ca.pem")
    members = {s["node"]: s for s in views.services() if s["role"] == "zookeeper"}
    daemons = {s["node"]: s for s in views.services() if s["role"] == "node-daemon"}
    assert sorted(members) == sorted(daemons) == rolled_out.nodes()
    for view in views.views:
        h = view.host
        ports = _listening_ports(h.netns, members[h.name]["pid"])
        assert ROLLOUT_ZK_PORT in ports and ports <= {
            ROLLOUT_ZK_PORT,
            ROLLOUT_ZK_QUORUM_PORT,
            ROLLOUT_ZK_ELECTION_PORT,
        }, ports
        assert "clientPort=" not in view.read_text("/etc/zookeeper/pvc/zoo.cfg")
        # the daemon trusts the CA the node_daemon role installed, not a ZooKeeper member's trust store:
        # a hypervisor that is no member of the ensemble has it too
        assert (
            yaml.safe_load(view.read_text("/etc/pvc/node-daemon.yaml"))["zookeeper"]["tls"]["ca"]
            == ROLLOUT_ZK_CA_ON_NODE
        )
        assert not ROLLOUT_ZK_CA_ON_NODE.startswith("/etc/zookeeper/")
        # one CA: the daemons', the members' trust store and libvirt's are the cluster CA's certificate
        assert view.read_text(ROLLOUT_ZK_CA_ON_NODE) == Path(ca).read_text()
        assert view.read_text("/etc/zookeeper/pvc/tls/ca.pem") == Path(ca).read_text()
        for issued in (f"{h.name}-zookeeper", f"{h.name}-libvirt"):
            cert = views.cluster_ca_dir / "issued" / f"{issued}.pem"
            verified = subprocess.run(
                ["openssl", "verify", "-CAfile", ca, str(cert)], capture_output=True, text=True, check=False
            )
            assert verified.returncode == 0, (issued, verified.stdout, verified.stderr)
        zk = _daemon_config(view).zookeeper
        assert zk.tls and zk.tls_verify and not zk.insecure
        assert (zk.auth_username, zk.node_password, zk.operator_digest) == (
            identities.NODES_USER,
            identities.node_password(h.name),
            identities.operator_digest(),
        )
        log = Path(daemons[h.name]["log"]).read_text()
        assert f"node {h.name} running" in log and "INSECURE" not in log
    check_host_names(lab, [(h.address, ROLLOUT_ZK_PORT) for h in lab.hosts], ca)
    schema = store.schema
    key = schema.node_key("node1", S.NODE_DAEMON_STATE)
    assert store.find_text(key) == "run"
    check_client_access(lab, views.zk_hosts, ca, readable=key, writable=key, parent=schema.nodes())
    assert store.find_text(key) == "run"


# ---- idempotence ------------------------------------------------------------------------------


def test_second_rollout_changes_nothing(rolled_out):
    pids = {(s["role"], s["node"]): s["pid"] for s in rolled_out.views.services()}
    run = rolled_out.playbook("playbooks/rollout.yml", timeout=900)
    assert run.returncode == 0, run.failures()
    assert set(run.changed().values()) == {0}, f"changed on the second run: {run.changed_tasks()}"
    assert {(s["role"], s["node"]): s["pid"] for s in rolled_out.views.services()} == pids, "a service was restarted"
    print(f"\nsecond rollout: {run.duration_s:.1f} s")
