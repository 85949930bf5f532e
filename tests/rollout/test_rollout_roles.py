"""Roles on their own in the lab, beyond what the rollout exercises: an ensemble that the zookeeper
role's files really form, the node_daemon role installing the daemon from a wheelhouse, and the
libvirt role's authentication modes."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.lab.lab import REPO_ROOT
from tests.support.zookeeper import ZooKeeperServer, role_java_opts

# a rollout takes a minute or two on a quiet 2-core machine, several on a busy one
pytestmark = [pytest.mark.lab, pytest.mark.timeout(1200)]

PLAYBOOKS = Path(__file__).resolve().parent / "playbooks"


def test_zookeeper_role_files_form_an_ensemble(cluster, tmp_path):
    """The role's defaults: a quorum over TLS (sslQuorum: each member checks its peers' certificates
    and host names, from the cluster CA the role created), a TLS client port and no plaintext one,
    and digest authentication enforced. A client without credentials reads nothing, one with a
    wrong password neither reads nor writes what the operator secured, and the members'
    certificates name their own hosts only."""
    views, lab = cluster.views, cluster.lab
    first = cluster.playbook(PLAYBOOKS / "zookeeper_check.yml")
    assert first.returncode == 0, first.failures()
    second = cluster.playbook(PLAYBOOKS / "zookeeper_check.yml")
    assert second.returncode == 0, second.failures()
    assert set(second.changed().values()) == {0}, second.changed_tasks()
    ca = views.zookeeper_ca_dir / "ca.pem"
    assert oct(views.zookeeper_ca_dir.stat().st_mode & 0o777) == "0o700"
    assert oct((views.zookeeper_ca_dir / "ca-key.pem").stat().st_mode & 0o777) == "0o600"
    for view in views.views:
        cfg = view.read_text("/etc/zookeeper/check/zoo.cfg")
        for h in lab.hosts:
            assert f"server.{h.index}={h.address}:2889:3889" in cfg
        for line in (
            f"secureClientPortAddress={view.host.address}",
            "secureClientPort=2282",
            "sslQuorum=true",
            "enforce.auth.enabled=true",
            "enforce.auth.schemes=digest",
        ):
            assert line in cfg.splitlines(), line
        assert "clientPort=" not in cfg and "password=" not in cfg
        modes = view.run(
            "stat -c '%n %a %U:%G' /etc/zookeeper/check/tls/keystore.p12 "
            "/etc/zookeeper/check/tls/keystore.pass /etc/zookeeper/check/tls/ca.pem"
        ).stdout.splitlines()
        assert modes == [
            "/etc/zookeeper/check/tls/keystore.p12 640 root:zookeeper",
            "/etc/zookeeper/check/tls/keystore.pass 640 root:zookeeper",
            "/etc/zookeeper/check/tls/ca.pem 644 root:root",
        ]
    try:
        for h in lab.hosts:
            assert views.start_unit(h, "zookeeper-check", "/etc/systemd/system/zookeeper-check.service") == "started"
        members = [
            ZooKeeperServer(
                workdir=tmp_path / h.name,
                client_port=2282,
                client_address=h.address,
                netns=h.netns,
                client_tls_ca=str(ca),
            )
            for h in lab.hosts
        ]
        deadline = time.monotonic() + 120
        modes = [None] * 3
        while None in modes and time.monotonic() < deadline:
            modes = [m.mode() for m in members]
            time.sleep(0.2)  # the JVM gives no readiness signal; its status port is polled
        assert sorted(modes) == ["follower", "follower", "leader"], f"no quorum from the role's files: {modes}"
        # and it serves what the lab's own ensemble serves: the role's logs went to its log dir
        assert views.view(1).read_text("/var/log/zookeeper-check/zookeeper.log")
        # with the JVM options the lab's own servers (tests/support) also run with: the role's defaults
        opts = role_java_opts()
        assert "-Dzookeeper.nio.numWorkerThreads=0" in opts
        pids = [s["pid"] for s in views.services() if s["role"] == "zookeeper-check"]
        # the live members, pidfiles included (a member a test restarted is not in lab.json)
        pids += sorted({r.pid for r in lab.processes() if r.role == "zookeeper"})
        assert len(pids) == 2 * len(lab.hosts)
        for pid in pids:
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read().decode().split("\0")
            assert all(opt in cmdline for opt in opts), (pid, cmdline)
        check_secured_ensemble(lab, [(h.address, 2282) for h in lab.hosts], 2182, str(ca))
    finally:
        views.stop_services("zookeeper-check")


def check_secured_ensemble(lab, members: list[tuple[str, int]], plaintext_port: int, ca: str) -> None:
    """No plaintext port, certificates naming their own hosts, and nothing for a client without
    credentials or with a wrong password (tests/rollout/secured.py) on keys the operator secured."""
    from kazoo.client import KazooClient
    from kazoo.security import make_digest_acl

    from tests.support.zookeeper import in_netns
    from tests.support.identities import OPERATOR_PASSWORD, OPERATOR_USER
    from tests.support.zookeeper import connect

    from .secured import check_client_access, check_host_names

    for address, _ in members:
        with pytest.raises(ConnectionRefusedError):
            connect(address, plaintext_port, 5, lab.ctl_netns).close()
    check_host_names(lab, members, ca)
    hosts = ",".join(f"{a}:{p}" for a, p in members)
    # a secured parent and its key, as a cluster's root and keys are (deleting a znode is a
    # permission on its parent: the parent must be secured too)
    parent = f"/secured-{uuid.uuid4().hex[:8]}"
    path = f"{parent}/key"

    def as_operator() -> None:
        zk = KazooClient(
            hosts=hosts,
            use_ssl=True,
            ca=ca,
            verify_certs=True,
            check_hostname=True,
            timeout=10,
            auth_data=[("digest", f"{OPERATOR_USER}:{OPERATOR_PASSWORD}")],
        )
        zk.start(60)
        try:
            acl = [make_digest_acl(OPERATOR_USER, OPERATOR_PASSWORD, all=True)]
            zk.create(parent, b"", acl=acl)
            zk.create(path, b"a secret", acl=acl)
            assert zk.get(path)[0] == b"a secret"
        finally:
            zk.stop()
            zk.close()

    in_netns(lab.ctl_netns, as_operator)
    check_client_access(lab, hosts, ca, readable=path, writable=path, parent=parent)


def test_node_daemon_role_installs_from_a_wheelhouse(rolled_out, tmp_path):
    """The production install: the wheelhouse `make wheelhouse` builds, copied to the node and
    installed with no package index into a venv of Debian's Python, which takes libvirt from
    Debian's python3-libvirt and everything else from the wheelhouse at its pins."""
    cluster = rolled_out
    house = tmp_path / "wheelhouse"
    build = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "build-wheelhouse.py"), str(house)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert build.returncode == 0, f"build-wheelhouse failed:\n{build.stdout[-3000:]}\n{build.stderr[-3000:]}"
    pins = dict(
        line.split("==")
        for line in (house / "constraints.txt").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert "libvirt-python" not in pins and pins["pvc-node-daemon"] == "0.1.0"
    host = cluster.lab.host(3)
    args = ("--extra-vars", f"wheel_host={host.name} wheelhouse={house}")
    first = cluster.playbook(PLAYBOOKS / "node_daemon_wheelhouse.yml", *args, timeout=900)
    assert first.returncode == 0, first.failures()
    assert first.changed()[host.name] > 0
    view = cluster.views.view(host)
    check = view.run(
        ["/opt/pvc-node-daemon/bin/pvc-node-daemon", "--check-config", "--config", "/etc/pvc/node-daemon-wheel.yaml"]
    )
    assert f"(node {host.name})" in check.stdout
    where = view.run(
        [
            "/opt/pvc-node-daemon/bin/python",
            "-c",
            "import json, importlib.metadata as m, libvirt, lxml, "
            "kazoo; print(json.dumps({'libvirt': libvirt.__file__, 'lxml': lxml.__file__, 'kazoo': kazoo.__file__, "
            "'versions': {d: m.version(d) for d in ('kazoo', 'lxml', 'PyYAML', 'prometheus-client')}}))",
        ]
    )
    found = json.loads(where.stdout)
    assert found["libvirt"].startswith("/usr/lib/python3/dist-packages/"), found  # Debian's binding, not compiled
    assert found["lxml"].startswith("/opt/pvc-node-daemon/") and found["kazoo"].startswith("/opt/pvc-node-daemon/")
    assert found["versions"] == {
        "kazoo": pins["kazoo"],
        "lxml": pins["lxml"],
        "PyYAML": pins["pyyaml"],
        "prometheus-client": pins["prometheus-client"],
    }
    unit = view.read_text("/etc/systemd/system/pvc-node-daemon-wheel.service")
    assert "ExecStart=/opt/pvc-node-daemon/bin/pvc-node-daemon --config /etc/pvc/node-daemon-wheel.yaml" in unit
    assert_unit_verifies(view, "/etc/systemd/system/pvc-node-daemon-wheel.service")
    # the log file's logrotate rule: valid, and a rotation renames the file and keeps a new one
    rule = "/etc/logrotate.d/pvc-node-daemon-wheel"
    assert "/var/log/pvc/node-daemon-wheel.log {" in view.read_text(rule)
    assert "postrotate" not in view.read_text(rule)  # the daemon reopens its file itself: no reload
    view.run("mkdir -p /var/log/pvc && echo line >>/var/log/pvc/node-daemon-wheel.log")
    rotate = view.run(["logrotate", "--force", "--state", "/var/lib/pvc-logrotate.state", rule], check=False)
    assert rotate.returncode == 0, rotate.stderr
    assert view.read_text("/var/log/pvc/node-daemon-wheel.log.1") == "line\n"
    assert view.read_text("/var/log/pvc/node-daemon-wheel.log") == ""
    second = cluster.playbook(PLAYBOOKS / "node_daemon_wheelhouse.yml", *args, timeout=900)
    assert second.returncode == 0, second.failures()
    assert second.changed()[host.name] == 0, second.changed_tasks()
    assert not Path("/opt/pvc-node-daemon").exists(), "the install reached the machine itself"


def assert_unit_verifies(view, unit: str) -> None:
    """systemd-analyze verify (Debian's systemd package; nothing runs systemd here) finds nothing
    wrong with a unit a role rendered, as the host sees it (its ExecStart must exist there): no
    error and no warning, such as an unknown key, which verify only prints."""
    verify = view.run(["systemd-analyze", "verify", "--man=no", unit], check=False)
    assert verify.returncode == 0 and not (verify.stdout + verify.stderr).strip(), (unit, verify.stdout, verify.stderr)


def test_rolled_out_units_pass_systemd_analyze_verify(rolled_out):
    """The units the rollout rendered on every node, as systemd would load them."""
    for view in rolled_out.views.views:
        unit = view.read_text("/etc/systemd/system/pvc-node-daemon.service")
        assert "Type=notify" in unit and "NotifyAccess=main" in unit
        for path in ("/etc/systemd/system/zookeeper.service", "/etc/systemd/system/pvc-node-daemon.service"):
            assert_unit_verifies(view, path)
        # journal only by default: no log file, so no logrotate rule
        assert view.read_text("/etc/logrotate.d/pvc-node-daemon") is None


def test_systemd_analyze_verify_finds_a_broken_unit(rolled_out):
    """The check above can fail: a unit with an unknown key or a missing program does not pass."""
    view = rolled_out.views.view(1)
    good = view.read_text("/etc/systemd/system/pvc-node-daemon.service")
    for broken in (
        good.replace("NotifyAccess=main", "NotifyAcess=main"),
        good.replace("ExecStart=/", "ExecStart=/nonexistent/"),
    ):
        view.run("cat >/etc/systemd/system/pvc-broken.service", input=broken)
        verify = view.run(
            ["systemd-analyze", "verify", "--man=no", "/etc/systemd/system/pvc-broken.service"], check=False
        )
        assert verify.returncode != 0 or (verify.stdout + verify.stderr).strip()
    view.run(["rm", "-f", "/etc/systemd/system/pvc-broken.service"])


def stored_sasl_password(view, db: str, account: str) -> str | None:
    """The password the SASL database holds for ``account`` (``user\\00realm`` as db_dump -p
    prints it; db_dump comes with sasl2-bin): the database keeps it in clear."""
    lines = view.run(["db_dump", "-p", db]).stdout.splitlines()
    key = f" {account}\\00userPassword"
    return lines[lines.index(key) + 1][1:] if key in lines else None


def test_libvirt_role_tls_and_sasl_modes(rolled_out, tmp_path):
    """TLS: the certificates installed with private keys 0600 and libvirtd.conf switched to the TLS
    socket; SASL: SASL on the TCP socket, the shared account in the SASL database and its client
    credentials (0600), nothing written in check mode, and a second run changes nothing. Neither
    touches the lab's libvirtd."""
    from tests.support.tls import make_tls_material

    cluster = rolled_out
    host = cluster.lab.host(2)
    view = cluster.views.view(host)
    tls = make_tls_material(tmp_path / "tls", names=(host.name,), ips=(host.address,))
    lab_conf = (host.dir / "etc" / "libvirtd.conf").read_text()
    files = {
        "libvirt_tls_ca_cert": tls.ca_cert,
        "libvirt_tls_server_cert": tls.client_cert,
        "libvirt_tls_server_key": tls.client_key,
        "libvirt_tls_client_cert": tls.client_cert,
        "libvirt_tls_client_key": tls.client_key,
    }
    extra = " ".join(f"{k}={v}" for k, v in files.items())
    # the operator's own certificates: the DNs of the nodes' client certificates are theirs to give
    refused = cluster.playbook(
        PLAYBOOKS / "libvirt_auth.yml", "--extra-vars", f"auth_host={host.name} libvirt_auth=tls {extra}"
    )
    assert refused.returncode != 0 and "libvirt_tls_allowed_dn_list too" in refused.failures()
    assert view.read_text("/etc/libvirt-tls/libvirtd.conf") is None
    dns = json.dumps({"libvirt_tls_allowed_dn_list": ["O=pvc.cluster tests,CN=pvc-client"]})
    for attempt in ("first", "second"):
        run = cluster.playbook(
            PLAYBOOKS / "libvirt_auth.yml",
            "--extra-vars",
            f"auth_host={host.name} libvirt_auth=tls {extra}",
            "--extra-vars",
            dns,
        )
        assert run.returncode == 0, run.failures()
        if attempt == "second":
            assert run.changed()[host.name] == 0, run.changed_tasks()
    conf = view.read_text("/etc/libvirt-tls/libvirtd.conf")
    for line in (
        "listen_tls = 1",
        "listen_tcp = 0",
        'auth_tls = "none"',
        "tls_no_verify_certificate = 0",
        f'listen_addr = "{host.address}"',
        'key_file = "/etc/pki-tls/libvirt/private/serverkey.pem"',
        'tls_allowed_dn_list = [ "O=pvc.cluster tests,CN=pvc-client" ]',
    ):
        assert line in conf
    assert 'migrate_tls_x509_cert_dir = "/etc/pki-tls/qemu"' in view.read_text("/etc/libvirt-tls/qemu.conf")
    modes = view.run(
        "stat -c '%n %a' /etc/pki-tls/CA/cacert.pem /etc/pki-tls/libvirt/private/serverkey.pem "
        "/etc/pki-tls/libvirt/private/clientkey.pem /etc/pki-tls/libvirt/private "
        "/etc/pki-tls/qemu/server-key.pem /etc/pki-tls/qemu/ca-cert.pem"
    ).stdout.split("\n")
    assert modes[:6] == [
        "/etc/pki-tls/CA/cacert.pem 644",
        "/etc/pki-tls/libvirt/private/serverkey.pem 600",
        "/etc/pki-tls/libvirt/private/clientkey.pem 600",
        "/etc/pki-tls/libvirt/private 750",
        "/etc/pki-tls/qemu/server-key.pem 640",
        "/etc/pki-tls/qemu/ca-cert.pem 644",
    ]
    assert view.read_text("/etc/libvirt-tls/auth.conf") is None

    sasl = cluster.playbook(
        PLAYBOOKS / "libvirt_auth.yml",
        "--check",
        "--extra-vars",
        f"auth_host={host.name} libvirt_auth=sasl libvirt_sasl_password=s3cret",
    )
    assert sasl.returncode == 0, sasl.failures()
    changed = "\n".join(sasl.changed_tasks())
    for task in (
        "Write libvirtd.conf",
        "Configure SASL for libvirtd (sasl)",
        "Give libvirt clients the peers' credentials (sasl)",
    ):
        assert task in changed
    assert view.read_text("/etc/libvirt-sasl/libvirtd.conf") is None  # check mode wrote nothing
    assert view.read_text("/etc/libvirt-sasl/passwd.db") is None

    for attempt in ("first", "second"):
        run = cluster.playbook(
            PLAYBOOKS / "libvirt_auth.yml",
            "--extra-vars",
            f"auth_host={host.name} libvirt_auth=sasl libvirt_sasl_password=s3cret",
        )
        assert run.returncode == 0, run.failures()
        if attempt == "second":  # the account exists: not created again
            assert run.changed()[host.name] == 0, run.changed_tasks()
    conf = view.read_text("/etc/libvirt-sasl/libvirtd.conf")
    for line in ("listen_tcp = 1", "listen_tls = 0", 'auth_tcp = "sasl"'):
        assert line in conf
    sasl_conf = view.read_text("/etc/sasl2-sasl/libvirt.conf")
    assert "mech_list: scram-sha-256" in sasl_conf and "sasldb_path: /etc/libvirt-sasl/passwd.db" in sasl_conf
    accounts = view.run(["sasldblistusers2", "-f", "/etc/libvirt-sasl/passwd.db"]).stdout
    assert f"pvc@{host.name}:" in accounts, accounts  # the realm is the host's name
    assert view.run("stat -c '%a' /etc/libvirt-sasl/auth.conf").stdout.strip() == "600"
    credentials = view.read_text("/etc/libvirt-sasl/auth.conf")
    assert "authname=pvc" in credentials and "password=s3cret" in credentials
    assert stored_sasl_password(view, "/etc/libvirt-sasl/passwd.db", f"pvc\\00{host.name}") == "s3cret"

    # a password rotated in the inventory reaches the database as well as the clients' credentials
    run = cluster.playbook(
        PLAYBOOKS / "libvirt_auth.yml",
        "--extra-vars",
        f"auth_host={host.name} libvirt_auth=sasl libvirt_sasl_password=n3w-s3cret",
    )
    assert run.returncode == 0, run.failures()
    assert "give it the new password (sasl)" in "\n".join(run.changed_tasks())
    assert stored_sasl_password(view, "/etc/libvirt-sasl/passwd.db", f"pvc\\00{host.name}") == "n3w-s3cret"
    assert "password=n3w-s3cret" in view.read_text("/etc/libvirt-sasl/auth.conf")
    assert (host.dir / "etc" / "libvirtd.conf").read_text() == lab_conf
