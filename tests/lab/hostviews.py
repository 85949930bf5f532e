"""The lab's hosts as Ansible hosts: a private file-system view per host, the inventory, an
``ansible-playbook`` runner, and the services the lab starts where production uses systemd.

How a lab host becomes an Ansible host
======================================
Each lab host is a network namespace (``lab-nK``) of this one machine, so by itself it shares the
machine's files: a role that writes ``/etc/sysctl.d`` on "node1" would write the machine's file, and
node2 would see it. ``up()`` therefore gives every host its own *view*: a persistent mount namespace
and UTS namespace (``unshare --mount=FILE --uts=FILE``: the namespaces stay alive through bind mounts
of their ``/proc/PID/ns`` files, no process needs to hold them) in which

* ``/etc``, ``/var/lib``, ``/var/log``, ``/opt`` and ``/usr/local`` are overlay mounts: the machine's
  directory below, the host's own copy-on-write layer above (``VIEWS/nK/upper/...``). A host reads
  the machine's files but everything it writes there stays its own; nothing of the machine changes;
* ``/etc/libvirt`` is the directory the host's libvirtd reads (``WORKDIR/nK/etc``), so the libvirt
  role configures the libvirtd that runs there, and ``/etc/hosts`` is the lab's (nodeK -> 10.77.0.K);
* ``/sys`` is mounted from inside the host's network namespace (it lists the host's interfaces) and
  the host name is ``nodeK``.

The lab's connection plugin ``netns`` (``tests/lab/ansible/connection_plugins``, not part of the
collection) enters the three namespaces with ``nsenter`` for every command and copies files through
them (``ansible_netns_mount_namespace``: ``VIEWS/nK/mnt.ns``).
Ansible itself runs in the controller's network namespace ``lab-ctl``, so that tasks on
``localhost`` (the pvc.cluster modules) reach the ensemble on 10.77.0.K:2181, but in the machine's
mount namespace: the kernel does not copy bind mounts of mount-namespace files into a new mount
namespace (such as the one ``ip netns exec`` creates), so the hosts' views are only reachable from
there.

Services
========
There is no systemd here. The roles run with ``*_service_manager: none``: they install the units
and render every file but start nothing. The lab's rollout hook (``tests/lab/ansible/lab_services.yml``)
then calls ``python -m tests.lab.hostviews`` on the controller to do what systemd would:

* ``services`` = ``restart-libvirtd`` then ``start-daemon``;
* ``restart-libvirtd``: restart the host's libvirtd (through the lab, which owns it) when the files
  the libvirt role rendered into ``/etc/libvirt`` differ from those it last started with;
* ``start-daemon``: start ``pvc-node-daemon`` in the host's view, exactly as the ``ExecStart=`` of the
  unit the node_daemon role rendered says, and restart it when the unit or its configuration changed.
  The unit is ``Type=notify``: as systemd does, the daemon gets a ``$NOTIFY_SOCKET`` and counts as
  started once it sends ``READY=1`` (it has loaded its state), so the rollout goes on from there.

Every process started here is recorded in ``VIEWS/processes.json`` (PID + start time) and ended by
PID by ``stop_services()`` / ``down()``.

ZooKeeper: the rolled-out cluster has an ensemble of its own, the zookeeper role's, as production
does: after the role the hook (``services --stage zookeeper``) starts each member from the
unit the role rendered and waits until it serves. It runs with the role's defaults: TLS only on
10.77.0.K:2281 with certificates of the cluster's one CA (cluster_ca role, in ``VIEWS/cluster-ca``),
the quorum over TLS on 2890/3890, digest authentication enforced. The daemons and the modules
connect to it secured (the identities of tests/support/identities.py). The lab's own ensemble
(2181) keeps serving the lab's other tests. By default every host is a member; ``members=N`` makes
the first N hosts the ensemble (``pvc_coordinators``, ``pvc_zookeeper_servers``, ``pvc_zk_hosts``)
and the others hypervisors only (tests/rollout/test_rollout_with_non_member.py).

CLI: ``python -m tests.lab.hostviews up|down|inventory|services|start-daemon|restart-libvirtd|status
--workdir W [--host nodeK]``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from tests.support import identities
from tests.support.zookeeper import ZooKeeperServer, in_netns

from .guests import lab_domain_policy
from .lab import REPO_ROOT, UNIX_PATH_MAX, Lab, LabError, LabHost, ProcRecord, proc_starttime, terminate

VIEW_OVERLAYS = ("/etc", "/var/lib", "/var/log", "/opt", "/usr/local")
NETNS_DIR = "/run/netns"
VENV_PYTHON = Path(sys.executable)
ANSIBLE_PLAYBOOK = VENV_PYTHON.parent / "ansible-playbook"
LAB_ANSIBLE = Path(__file__).resolve().parent / "ansible"
LAB_SERVICES_HOOK = LAB_ANSIBLE / "lab_services.yml"
LAB_CONNECTION_PLUGINS = LAB_ANSIBLE / "connection_plugins"
NODE_DAEMON_UNIT = "/etc/systemd/system/pvc-node-daemon.service"
ZOOKEEPER_UNIT = "/etc/systemd/system/zookeeper.service"
# The rolled-out cluster's own ensemble, from the zookeeper role's defaults (TLS on its secure client
# port, no plaintext port, digest authentication enforced), beside the lab's ensemble (2181, 2888,
# 3888 on the same addresses), whose quorum ports it must not take.
ROLLOUT_ZK_PORT = 2281
ROLLOUT_ZK_QUORUM_PORT = 2890
ROLLOUT_ZK_ELECTION_PORT = 3890
# the CA certificate the node_daemon role installs on every hypervisor, a ZooKeeper member or not
# (node_daemon_zookeeper_tls_ca's default): the daemons' trust
ROLLOUT_ZK_CA_ON_NODE = "/etc/pvc/zookeeper-ca.pem"
DEFAULT_ZK_ROOT = "/pvc"
DEFAULT_VM_BRIDGES = [{"name": "vmbr0"}, {"name": "vmbr1"}]
# Lab tuning of the node daemon: quick keepalives and short timeouts (a 2-core CI machine still
# completes every step well inside them), no memory held back, debug logs. The detection window and
# the ZooKeeper session timeout are the lab daemons' (daemons.py, LAB_ZK_TIMEOUT_S): a 6 s window
# against a 4 s failover plus one keepalive, as the daemon and the role require.
LAB_DAEMON_VARS = {
    "node_daemon_keepalive_s": 1,
    "node_daemon_dead_after": 6,
    "node_daemon_zookeeper_timeout_s": 6,
    "node_daemon_shutdown_timeout_s": 5,
    "node_daemon_step_timeout_s": 20,
    "node_daemon_memory_reserve_mib": 0,
    "node_daemon_libvirt_call_timeout_s": 20,
    "node_daemon_log_debug": True,
}


class ViewError(RuntimeError):
    """A host view cannot be created or used."""


def _mountpoints_below(base: Path) -> list[str]:
    """Mount points at or below ``base`` in this mount namespace, deepest first."""
    found = []
    prefix = str(base).rstrip("/")
    with open("/proc/self/mountinfo", encoding="utf-8") as handle:
        for line in handle:
            mountpoint = line.split()[4].replace("\\040", " ")
            if mountpoint == prefix or mountpoint.startswith(prefix + "/"):
                found.append(mountpoint)
    return sorted(set(found), key=lambda p: (-p.count("/"), p))


def _sha(*chunks: bytes) -> str:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(len(chunk).to_bytes(8, "big"))
        digest.update(chunk)
    return digest.hexdigest()[:16]


@dataclass
class HostView:
    """One lab host's private view of the file system (see the module docstring)."""

    views: HostViews
    host: LabHost

    @property
    def dir(self) -> Path:
        return self.views.base / f"n{self.host.index}"

    @property
    def mnt(self) -> Path:
        return self.dir / "mnt.ns"

    @property
    def uts(self) -> Path:
        return self.dir / "uts.ns"

    def layer(self, path: str) -> tuple[Path, Path]:
        rel = path.strip("/")
        return self.dir / "upper" / rel, self.dir / "work" / rel

    def nsenter(self) -> list[str]:
        """The command prefix that enters this host: its network, mount and UTS namespaces."""
        return ["nsenter", f"--net={NETNS_DIR}/{self.host.netns}", f"--mount={self.mnt}", f"--uts={self.uts}", "--"]

    def run(
        self, args: list[str] | str, *, check: bool = True, timeout: float = 60, **kw
    ) -> subprocess.CompletedProcess:
        """Run a command on this host, in its view (a string runs through /bin/sh -c)."""
        if isinstance(args, str):
            args = ["/bin/sh", "-c", args]
        if not {"stdout", "stderr", "capture_output"} & kw.keys():
            kw["capture_output"] = True
        kw.setdefault("text", True)
        proc = subprocess.run(self.nsenter() + list(args), timeout=timeout, **kw)
        if check and proc.returncode != 0:
            raise subprocess.CalledProcessError(proc.returncode, proc.args, proc.stdout, proc.stderr)
        return proc

    def read_text(self, path: str) -> str | None:
        """A file as this host sees it, or None when it does not exist there."""
        proc = self.run(["cat", path], check=False)
        return proc.stdout if proc.returncode == 0 else None

    def read_bytes(self, path: str) -> bytes | None:
        proc = self.run(["cat", path], check=False, text=False)
        return proc.stdout if proc.returncode == 0 else None

    def create(self) -> None:
        """Create the persistent namespaces and mount the view (see the module docstring)."""
        lab = self.views.lab
        self.dir.mkdir(parents=True, exist_ok=True)
        script = [
            "set -e",
            f"hostname {shlex.quote(self.host.name)}",
            # like `ip netns exec`: a /sys that lists this network namespace's interfaces
            "umount -l /sys",
            "mount -t sysfs -o nosuid,nodev,noexec sysfs /sys",
        ]
        for path in VIEW_OVERLAYS:
            upper, work = self.layer(path)
            upper.mkdir(parents=True, exist_ok=True)
            work.mkdir(parents=True, exist_ok=True)
            script.append(f"mount -t overlay pvc-view -o lowerdir={path},upperdir={upper},workdir={work} {path}")
        host_etc = self.host.dir / "etc"
        if host_etc.is_dir():  # the directory the host's libvirtd reads as /etc/libvirt
            script += ["mkdir -p /etc/libvirt", f"mount --bind {shlex.quote(str(host_etc))} /etc/libvirt"]
        host_pki = self.host.pki_dir
        if host_pki.is_dir():  # the certificates the host's libvirtd and QEMU read as /etc/pki
            script += ["mkdir -p /etc/pki", f"mount --bind {shlex.quote(str(host_pki))} /etc/pki"]
        if lab.hosts_file.exists():
            script.append(f"mount --bind {shlex.quote(str(lab.hosts_file))} /etc/hosts")
        for ns_file in (self.mnt, self.uts):
            ns_file.touch()
        proc = subprocess.run(
            [
                "unshare",
                f"--mount={self.mnt}",
                f"--uts={self.uts}",
                "--propagation",
                "private",
                "--",
                "nsenter",
                f"--net={NETNS_DIR}/{self.host.netns}",
                "--",
                "/bin/sh",
                "-c",
                "; ".join(script),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if proc.returncode != 0:
            raise ViewError(f"cannot create the view of {self.host.name}: {proc.stderr.strip()}")


class HostViews:
    """The views of every host of one lab, its inventory, its Ansible runs and its services."""

    def __init__(
        self,
        lab: Lab,
        zk_root: str = DEFAULT_ZK_ROOT,
        log=None,
        vm_bridges: list[dict] | None = None,
        node_vars: dict | None = None,
        members: int | None = None,
    ) -> None:
        """zk_root: the cluster's root znode; vm_bridges: the vm_bridges role's list (default vmbr0
        and vmbr1); node_vars: more variables for every node (they override the lab's); members:
        the first ``members`` hosts are the ZooKeeper ensemble (pvc_coordinators), the others
        hypervisors only, as in a production cluster with more hypervisors than members (default:
        every host is both)."""
        if members is not None and not 1 <= members <= len(lab.hosts):
            raise ViewError(f"members must be between 1 and {len(lab.hosts)}, not {members}")
        self.lab = lab
        self.zk_root = zk_root
        self.members = lab.hosts[: members or len(lab.hosts)]
        self.vm_bridges = vm_bridges if vm_bridges is not None else DEFAULT_VM_BRIDGES
        self.node_vars = node_vars or {}
        self._log = log or (lambda message: print(message, flush=True))
        self._lock_depth = 0
        self._lock_file = None

    @contextlib.contextmanager
    def locked(self):
        """Serialise changes to the services and the lab's libvirtds across processes (the rollout
        runs one hook process per host at once, and lab.json / processes.json are read-modify-write)."""
        if self._lock_depth == 0:
            self._lock_file = open(self.lab.workdir / ".hostviews.lock", "a")
            fcntl.flock(self._lock_file, fcntl.LOCK_EX)
        self._lock_depth += 1
        try:
            yield
        finally:
            self._lock_depth -= 1
            if self._lock_depth == 0:
                fcntl.flock(self._lock_file, fcntl.LOCK_UN)
                self._lock_file.close()
                self._lock_file = None

    # ---- paths -----------------------------------------------------------------------------

    @property
    def base(self) -> Path:
        return self.lab.workdir / "views"

    @property
    def logs(self) -> Path:
        """Logs of the services started here (kept until the next up)."""
        return self.lab.workdir / "view-logs"

    @property
    def inventory_file(self) -> Path:
        return self.base / "inventory.yml"

    @property
    def cluster_ca_dir(self) -> Path:
        """The cluster's one CA on the controller (pvc_cluster_ca_dir, the cluster_ca role's): the
        zookeeper role's members and the libvirt role's nodes get their certificates from it."""
        return self.base / "cluster-ca"

    @property
    def collections_dir(self) -> Path:
        return self.base / "collections"

    @property
    def state_file(self) -> Path:
        return self.base / "processes.json"

    @property
    def zk_hosts(self) -> str:
        """The rolled-out cluster's ensemble (the zookeeper role's members, TLS only), reachable from
        the lab's namespaces."""
        return ",".join(f"{h.address}:{ROLLOUT_ZK_PORT}" for h in self.members)

    def module_zk_options(self) -> dict:
        """The modules' ZooKeeper options besides zk_hosts and zk_root (pvc_zk_options)."""
        return {
            "zk_username": identities.OPERATOR_USER,
            "zk_password": identities.OPERATOR_PASSWORD,
            "zk_tls": True,
            "zk_tls_ca": str(self.zookeeper_ca_dir / "ca.pem"),
        }

    def operator_store(self, timeout_s: float = 10.0):
        """A started ClusterStore of the operator on the rolled-out ensemble (TLS, the CA checked),
        whose sockets live in the controller's namespace. The caller stops it."""
        from pvc_cluster_common._store import ClusterStore

        options = identities.operator_options(
            self.zk_hosts, self.zk_root, timeout_s=timeout_s, tls=True, tls_ca=str(self.zookeeper_ca_dir / "ca.pem")
        )
        store = ClusterStore(options)
        return in_netns(self.lab.ctl_netns, store.start)

    def zookeeper_member(self, host: LabHost | int | str) -> ZooKeeperServer:
        """The rolled-out ensemble's member on ``host``, for its four-letter words (over TLS)."""
        h = self.view(host).host
        return ZooKeeperServer(
            workdir=self.logs / f"zookeeper-{h.name}",
            client_port=ROLLOUT_ZK_PORT,
            client_address=h.address,
            netns=h.netns,
            client_tls_ca=str(self.zookeeper_ca_dir / "ca.pem"),
        )

    def start_zookeeper(self, host: LabHost | int | str, timeout_s: float = 120.0) -> str:
        """Start the host's member of the rolled-out ensemble from the unit the zookeeper role
        rendered (again when the unit or its zoo.cfg changed), then wait until it serves: in a quorum,
        which the other members' hooks, started at the same time, complete. Returns
        started|restarted|unchanged."""
        result = self.start_unit(host, "zookeeper", ZOOKEEPER_UNIT)
        member = self.zookeeper_member(host)
        deadline = time.monotonic() + timeout_s
        while member.mode() is None:
            if time.monotonic() > deadline:
                raise ViewError(
                    f"the zookeeper role's member on {member.client_address} does not serve after "
                    f"{timeout_s:.0f} s (log: {self.logs / ('zookeeper-' + self.view(host).host.name + '.log')})"
                )
            time.sleep(0.2)  # the JVM gives no readiness signal; its status port is polled
        return result

    @property
    def zookeeper_ca_dir(self) -> Path:
        """The CA of the zookeeper role's certificates: the cluster's one CA (cluster_ca_dir); ca.pem
        is the CA certificate that clients of the role's ensembles trust."""
        return self.cluster_ca_dir

    @property
    def play_vars_file(self) -> Path:
        """Extra variables every run gets: play keywords (serial) cannot see inventory variables."""
        return self.base / "play-vars.yml"

    def view(self, host: LabHost | int | str) -> HostView:
        if isinstance(host, int):
            host = self.lab.host(host)
        elif isinstance(host, str):
            host = next(h for h in self.lab.hosts if host in (h.name, h.netns))
        return HostView(self, host)

    @property
    def views(self) -> list[HostView]:
        return [HostView(self, h) for h in self.lab.hosts]

    # ---- up / down -------------------------------------------------------------------------

    def up(self) -> None:
        """Views for every host (after removing what an earlier run left), the collection path
        and the inventory. The lab must be up."""
        if not self.lab.state_file.exists():
            raise ViewError(f"the lab in {self.lab.workdir} is not up")
        t0 = time.monotonic()
        self.down(quiet=True)
        self.base.mkdir(parents=True)
        shutil.rmtree(self.logs, ignore_errors=True)
        self.logs.mkdir(parents=True)
        # `unshare --mount=FILE` needs FILE on a mount that does not propagate: a private bind
        # mount of the views directory onto itself (what `ip netns` does for /run/netns)
        subprocess.run(["mount", "--bind", str(self.base), str(self.base)], check=True)
        subprocess.run(["mount", "--make-private", str(self.base)], check=True)
        for view in self.views:
            view.create()
        link = self.collections_dir / "ansible_collections" / "pvc" / "cluster"
        link.parent.mkdir(parents=True)
        link.symlink_to(REPO_ROOT)
        self.write_inventory()
        self._log(
            f"[views] {len(self.lab.hosts)} host views and {self.inventory_file} ready in {time.monotonic() - t0:.1f} s"
        )

    def down(self, quiet: bool = False) -> None:
        """End the services started here, then unmount and remove every view."""
        ended = self.stop_services()
        mounts = _mountpoints_below(self.base)
        for mountpoint in mounts:
            subprocess.run(["umount", "-l", mountpoint], capture_output=True)
        shutil.rmtree(self.base, ignore_errors=True)
        if not quiet or ended or mounts:
            self._log(f"[views] down: ended {len(ended)} service(s), unmounted {len(mounts)} mount(s)")

    # ---- inventory -------------------------------------------------------------------------

    def inventory(self) -> dict:
        """The lab as an Ansible inventory (see playbooks/README.md for the variables)."""
        lab = self.lab
        nodes = {}
        for view in self.views:
            h = view.host
            nodes[h.name] = {
                "ansible_netns_name": h.netns,
                "ansible_netns_mount_namespace": str(view.mnt),
                "ansible_netns_uts_namespace": str(view.uts),
                "pvc_cluster_address": h.address,
                "libvirt_unix_sock_dir": str(h.libvirt_socket.parent),
                "libvirt_host_uuid": h.host_uuid,
                "node_daemon_libvirt_uri": h.libvirt_uri,
                "node_daemon_zookeeper_node_password": identities.node_password(h.name),
            }
        servers = [{"id": h.index, "name": h.name, "host": h.address} for h in self.members]
        node_vars = {
            "ansible_connection": "netns",
            # ZooKeeper: the lab runs the ensemble; the role renders its files (ports as the lab's)
            "zookeeper_install_packages": False,
            "zookeeper_service_manager": "none",
            "zookeeper_tick_time_ms": 500,
            "zookeeper_heap_mb": 128,
            "zookeeper_quorum_port": ROLLOUT_ZK_QUORUM_PORT,
            "zookeeper_election_port": ROLLOUT_ZK_ELECTION_PORT,
            # the cluster CA (pvc_cluster_ca_dir: its key, the members' keys and key stores) stays in
            # the lab's views, on the controller: one CA for ZooKeeper and libvirt
            # libvirt: the lab's libvirtd, reconfigured by the role (restarted by the lab hook), with
            # the role's defaults between hosts: TLS, certificates from the cluster CA
            # (pvc_cluster_ca_dir), TLS migrations.
            # LAB ONLY: no authentication on the unix socket.
            "libvirt_install_packages": False,
            "libvirt_service_manager": "none",
            "libvirt_log_outputs": "3:file:/var/log/libvirt/libvirtd.log",
            "libvirt_libvirtd_conf_extra": {
                "unix_sock_ro_perms": "0777",
                "unix_sock_rw_perms": "0700",
                "auth_unix_ro": "none",
                "auth_unix_rw": "none",
            },
            # QEMU as root without a security driver, cgroups or namespaces (no systemd, no AppArmor)
            "libvirt_qemu_user": "root",
            "libvirt_qemu_group": "root",
            "libvirt_qemu_dynamic_ownership": False,
            "libvirt_qemu_security_driver": "none",
            "libvirt_qemu_conf_extra": {
                "remember_owner": 0,
                "stdio_handler": "file",
                "cgroup_controllers": [],
                "namespaces": [],
            },
            # VM bridges: persisted for ifupdown in the host's view
            "vm_bridges": self.vm_bridges,
            "vm_bridges_service_manager": "none",
            # node daemon: the repository's venv, started by the lab hook from the rendered unit
            "node_daemon_install_method": "none",
            "node_daemon_executable": str(VENV_PYTHON.parent / "pvc-node-daemon"),
            "node_daemon_service_manager": "none",
            # the lab guests' paths and NBD disks (the vm tasks get the same: pvc_domain_policy)
            "node_daemon_domain_policy": lab_domain_policy(lab),
            # secure (docs/security.md): the nodes' identity and each node's own (per host, above), the
            # operator's digest id, TLS to the role's ensemble checked against the role's cluster CA
            "node_daemon_zookeeper_username": identities.NODES_USER,
            "node_daemon_zookeeper_password": identities.NODES_PASSWORD,
            "node_daemon_zookeeper_operator_digest": identities.operator_digest(),
            # TLS to ZooKeeper, the CA copied from the cluster CA: the node_daemon role's defaults
            **LAB_DAEMON_VARS,
            **self.node_vars,
        }
        return {
            "all": {
                "vars": {
                    "ansible_python_interpreter": str(VENV_PYTHON),
                    # the playbooks become root on the nodes; the lab's Ansible already runs as root
                    # and the machine has no sudo
                    "ansible_become": False,
                    "pvc_zk_hosts": self.zk_hosts,
                    # the modules: the operator, over TLS checked against the role's cluster CA
                    "pvc_zk_options": self.module_zk_options(),
                    "pvc_cluster_ca_dir": str(self.cluster_ca_dir),
                    "pvc_zk_root": self.zk_root,
                    "pvc_zookeeper_servers": servers,
                    "pvc_rollout_service_hook": str(LAB_SERVICES_HOOK),
                    "pvc_lab_workdir": str(lab.workdir),
                    "pvc_lab_repo": str(REPO_ROOT),
                    "pvc_domain_policy": lab_domain_policy(lab),
                },
                "children": {
                    "pvc_controller": {"hosts": {"localhost": {"ansible_connection": "local"}}},
                    "pvc_coordinators": {"hosts": {h.name: {} for h in self.members}},
                    "pvc_nodes": {"vars": node_vars, "hosts": nodes},
                },
            }
        }

    def write_inventory(self) -> Path:
        header = (
            f"# Generated by `python -m tests.lab.hostviews inventory` from {self.lab.state_file}.\n"
            "# The lab's hosts as Ansible hosts (connection netns, from tests/lab/ansible); see tests/lab/hostviews.py.\n"
        )
        self.inventory_file.write_text(header + yaml.safe_dump(self.inventory(), sort_keys=False, width=120))
        # every member at once: the hook of each waits until its member serves, in a quorum that
        # only the others complete (a rolling restart, serial 1, would wait for the first alone)
        self.play_vars_file.write_text(
            "# extra variables of the lab's playbook runs (see hostviews.py)\npvc_zookeeper_serial: 100%\n"
        )
        return self.inventory_file

    # ---- Ansible ---------------------------------------------------------------------------

    def ansible_env(self) -> dict[str, str]:
        env = dict(os.environ)
        tmp = self.base / "tmp"
        env.update(
            {
                "ANSIBLE_COLLECTIONS_PATH": str(self.collections_dir),
                "ANSIBLE_INVENTORY": str(self.inventory_file),
                "ANSIBLE_CONNECTION_PLUGINS": str(LAB_CONNECTION_PLUGINS),
                "ANSIBLE_PIPELINING": "true",
                "ANSIBLE_HOST_KEY_CHECKING": "false",
                "ANSIBLE_RETRY_FILES_ENABLED": "false",
                "ANSIBLE_LOCAL_TEMP": str(tmp / "local"),
                "ANSIBLE_REMOTE_TEMP": str(tmp / "remote"),
                "ANSIBLE_FORKS": "10",
                "ANSIBLE_NOCOWS": "1",
                "ANSIBLE_DEPRECATION_WARNINGS": "false",
                "PATH": f"{VENV_PYTHON.parent}:{env.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}",
            }
        )
        return env

    def playbook(
        self,
        playbook: str | Path,
        *args: str,
        extra_vars: dict | None = None,
        json_output: bool = True,
        progress: bool = False,
        timeout: float = 900,
    ) -> PlaybookRun:
        """Run ansible-playbook in the controller's network namespace.

        json_output: results and per-host stats are collected (the lab_json callback) and parsed.
        progress: one line per task is shown as the run goes (the lab_progress callback).
        Neither: Ansible's default output, captured.
        """
        playbook = Path(playbook)
        if not playbook.is_absolute():
            playbook = REPO_ROOT / playbook
        cmd = [str(ANSIBLE_PLAYBOOK), str(playbook), "--extra-vars", f"@{self.play_vars_file}", *args]
        if extra_vars:
            cmd += ["--extra-vars", json.dumps(extra_vars)]
        env = self.ansible_env()
        if progress or json_output:
            env["ANSIBLE_STDOUT_CALLBACK"] = "lab_progress" if progress else "lab_json"
            env["ANSIBLE_CALLBACK_PLUGINS"] = str(LAB_ANSIBLE / "callback_plugins")
        kw = {} if progress else {"capture_output": True}
        t0 = time.monotonic()
        # Only the network namespace is the controller's: a new mount namespace (as `ip netns exec`
        # makes) would not contain the bind mounts of the hosts' mount namespaces.
        proc = subprocess.run(
            ["nsenter", f"--net={NETNS_DIR}/{self.lab.ctl_netns}", "--"] + cmd,
            text=True,
            env=env,
            cwd=REPO_ROOT,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            **kw,
        )
        return PlaybookRun(proc, time.monotonic() - t0, json_output and not progress)

    # ---- services (what systemd does in production) -------------------------------------------

    def _records(self) -> list[dict]:
        try:
            return json.loads(self.state_file.read_text())
        except FileNotFoundError:
            return []

    def _save(self, records: list[dict]) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(records, indent=2) + "\n")
        os.replace(tmp, self.state_file)

    def services(self) -> list[dict]:
        """The live services started here: role, host, pid, key (what they were started from)."""
        return [r for r in self._records() if _record(r).alive()]

    def stop_services(
        self, role: str | None = None, host: str | None = None, timeout_s: float = 60
    ) -> list[ProcRecord]:
        """End services by PID (SIGTERM, then SIGKILL after ``timeout_s``)."""
        with self.locked():
            return self._stop_services(role, host, timeout_s)

    def _stop_services(self, role: str | None, host: str | None, timeout_s: float) -> list[ProcRecord]:
        records = self._records()
        chosen = [r for r in records if (role is None or r["role"] == role) and (host is None or r["host"] == host)]
        ended = terminate([_record(r) for r in chosen], timeout_s=timeout_s)
        keep = [r for r in records if r not in chosen]
        if self.base.is_dir():
            self._save(keep)
        return ended

    def _spawn(self, view: HostView, role: str, argv: list[str], key: str, env: dict | None = None) -> dict:
        self.logs.mkdir(parents=True, exist_ok=True)
        log = self.logs / f"{role}-{view.host.name}.log"
        with open(log, "ab") as out:
            out.write(f"\n===== {time.strftime('%H:%M:%S')} {shlex.join(argv)} =====\n".encode())
            out.flush()
            # nsenter exec()s the program (no --pid, so no fork): the PID is the service's own
            proc = subprocess.Popen(
                view.nsenter() + argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd="/",
                env={**os.environ, **(env or {})},
            )
        record = {
            "role": role,
            "host": view.host.netns,
            "node": view.host.name,
            "pid": proc.pid,
            "starttime": proc_starttime(proc.pid),
            "key": key,
            "argv": argv,
            "log": str(log),
        }
        self._save([r for r in self._records() if not (r["role"] == role and r["host"] == view.host.netns)] + [record])
        return record

    def start_daemon(self, host: LabHost | int | str, unit: str = NODE_DAEMON_UNIT) -> str:
        """Start pvc-node-daemon on ``host`` as the rendered unit's ExecStart says; restart it when
        the unit or any file its command line names changed. Returns started|restarted|unchanged,
        once the daemon is ready (see start_unit)."""
        return self.start_unit(host, "node-daemon", unit)

    def start_unit(self, host: LabHost | int | str, role: str, unit: str) -> str:
        """Like start_daemon, for any unit a role rendered (``role`` names the service in the records).
        A Type=notify unit counts as started once it sends READY=1 to the $NOTIFY_SOCKET it is given,
        as under systemd; the wait happens outside the lock, so hosts start in parallel."""
        view = self.view(host)
        with self.locked():
            result, waiter = self._start_unit(view, role, unit)
        if waiter is not None:
            waiter()
        return result

    def _start_unit(self, view: HostView, role: str, unit: str):
        text = view.read_text(unit)
        if text is None:
            raise ViewError(f"{view.host.name}: no {unit} (run the role that installs it first)")
        argv = unit_exec_start(text)
        files = [view.read_bytes(a) or b"" for a in argv if a.startswith("/")]
        key = _sha(text.encode(), *files)
        current = [r for r in self.services() if r["role"] == role and r["host"] == view.host.netns]
        if current and current[0]["key"] == key:
            return "unchanged", None
        if current:
            self._stop_services(role, view.host.netns, 60)
        if unit_setting(text, "Type") != "notify":
            self._spawn(view, role, argv, key)
            return ("restarted" if current else "started"), None
        notify = NotifySocket(f"{role}-{view.host.name}.sock")
        try:
            record = self._spawn(view, role, argv, key, env={"NOTIFY_SOCKET": str(notify.path)})
        except BaseException:
            notify.close()
            raise

        def wait_ready() -> None:
            timeout_s = systemd_seconds(unit_setting(text, "TimeoutStartSec"), default=90.0)
            try:
                notify.wait_ready(record["pid"], timeout_s, what=f"{role} on {view.host.name} (log: {record['log']})")
            except ViewError:
                self.stop_services(role, view.host.netns)  # as systemd ends a unit that failed to start
                raise
            finally:
                notify.close()

        return ("restarted" if current else "started"), wait_ready

    def restart_libvirtd(self, host: LabHost | int | str) -> str:
        """Restart the host's libvirtd (the lab owns it) when /etc/libvirt changed since the last
        restart made here. Returns restarted|unchanged."""
        with self.locked():
            return self._restart_libvirtd(self.view(host))

    def _restart_libvirtd(self, view: HostView) -> str:
        # what the libvirt role renders: /etc/libvirt and the certificates in /etc/pki
        files = sorted(p for sub in ("etc", "pki") for p in (view.host.dir / sub).rglob("*") if p.is_file())
        key = _sha(*[str(p.relative_to(view.host.dir)).encode() + b"\0" + p.read_bytes() for p in files])
        stamp = self.base / f"libvirtd-{view.host.name}.key"
        if stamp.exists() and stamp.read_text() == key:
            return "unchanged"
        view.host.stop_libvirtd()
        view.host.start_libvirtd()
        stamp.write_text(key)
        return "restarted"


def unit_setting(unit_text: str, name: str) -> str | None:
    """The last value of ``name=`` in a unit (the one systemd uses), or None."""
    value = None
    for line in unit_text.splitlines():
        key, sep, rest = line.strip().partition("=")
        if sep and key.strip() == name:
            value = rest.strip()
    return value


def systemd_seconds(value: str | None, default: float) -> float:
    """A time span as units write it: plain seconds or a number with s/min/ms (what our units use)."""
    if not value:
        return default
    for suffix, factor in (("ms", 0.001), ("min", 60.0), ("s", 1.0)):
        if value.endswith(suffix):
            return float(value[: -len(suffix)]) * factor
    return float(value)


class NotifySocket:
    """The service manager's end of sd_notify for one start: a datagram socket the service gets in
    $NOTIFY_SOCKET (a path: the service runs in another network namespace, where an abstract
    socket of ours would not exist, but in the same /tmp). The socket is ``name`` in a directory
    of its own under /tmp, not under the lab's workdir: the service connects to the path itself,
    and a path under a long workdir (PVC_LAB_PREFIX) could be longer than a socket address holds."""

    def __init__(self, name: str) -> None:
        self.path = Path(tempfile.mkdtemp(prefix="pvc-notify-", dir="/tmp")) / name
        if len(str(self.path)) > UNIX_PATH_MAX:
            raise ViewError(f"the notify socket's name is too long for a socket address: {name}")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self.sock.bind(str(self.path))
        except BaseException:
            self.close()
            raise

    def wait_ready(self, pid: int, timeout_s: float, what: str) -> None:
        """Return when READY=1 arrives; ViewError when the process exits first or time runs out.
        Waits on the socket and on the process (a pidfd) at once: no polling."""
        pidfd = os.pidfd_open(pid)
        try:
            deadline = time.monotonic() + timeout_s
            status = ""
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ViewError(f"{what} did not report ready within {timeout_s:.0f} s {status}".strip())
                readable, _, _ = select.select([self.sock, pidfd], [], [], remaining)
                if self.sock in readable:
                    lines = self.sock.recv(4096).decode(errors="replace").splitlines()
                    status = next((f"({line})" for line in lines if line.startswith("STATUS=")), status)
                    if "READY=1" in lines:
                        return
                elif pidfd in readable:
                    raise ViewError(f"{what} exited before it was ready {status}".strip())
        finally:
            os.close(pidfd)

    def close(self) -> None:
        self.sock.close()
        shutil.rmtree(self.path.parent, ignore_errors=True)


def unit_exec_start(unit_text: str) -> list[str]:
    """The command line of a systemd unit's ExecStart= (the one service kind the roles install)."""
    for line in unit_text.splitlines():
        line = line.strip()
        if line.startswith("ExecStart="):
            return shlex.split(line.split("=", 1)[1].lstrip("-@+!"))
    raise ViewError("the unit has no ExecStart=")


def _record(r: dict) -> ProcRecord:
    return ProcRecord(r["role"], r["host"], r["pid"], r["starttime"])


@dataclass
class PlaybookRun:
    """One ansible-playbook run: its process, duration and (json callback) results."""

    proc: subprocess.CompletedProcess
    duration_s: float
    parsed: bool

    @property
    def returncode(self) -> int:
        return self.proc.returncode

    @property
    def result(self) -> dict:
        if not self.parsed:
            return {}
        out = self.proc.stdout or ""
        start = out.find("{")
        try:
            return json.loads(out[start:]) if start >= 0 else {}
        except ValueError:
            return {}

    @property
    def stats(self) -> dict[str, dict]:
        return self.result.get("stats", {})

    def changed(self) -> dict[str, int]:
        return {host: s.get("changed", 0) for host, s in self.stats.items()}

    def changed_tasks(self) -> list[str]:
        """'host: task name' for every task result that reported a change."""
        found = []
        for play in self.result.get("plays", []):
            for task in play.get("tasks", []):
                for host, res in task.get("hosts", {}).items():
                    if res.get("changed"):
                        found.append(f"{host}: {task['task']['name']}")
        return found

    def task_results(self, name: str) -> dict[str, dict]:
        """host -> result of the (last) task called ``name``."""
        found = {}
        for play in self.result.get("plays", []):
            for task in play.get("tasks", []):
                if task["task"]["name"] == name:
                    found.update(task.get("hosts", {}))
        return found

    def slowest(self, count: int = 10) -> list[tuple[float, str]]:
        """The slowest tasks: (seconds, name)."""
        tasks = [
            (t.get("duration_s", 0.0), t["task"]["name"]) for p in self.result.get("plays", []) for t in p["tasks"]
        ]
        return sorted(tasks, reverse=True)[:count]

    def failures(self) -> str:
        """A readable account of what failed, for assertion messages."""
        lines = [f"ansible-playbook exited with {self.returncode} after {self.duration_s:.1f} s"]
        for play in self.result.get("plays", []):
            for task in play.get("tasks", []):
                for host, res in task.get("hosts", {}).items():
                    if res.get("failed") or res.get("unreachable"):
                        detail = {k: res.get(k) for k in ("msg", "stderr", "stdout", "rc", "results") if res.get(k)}
                        lines.append(f"{host}: {task['task']['name']}: {json.dumps(detail, default=str)[:3000]}")
        if not self.parsed or len(lines) == 1:
            lines.append((self.proc.stdout or "")[-6000:])
        lines.append((self.proc.stderr or "")[-3000:])
        return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.lab.hostviews", description=__doc__.split("\n")[0])
    parser.add_argument(
        "command", choices=("up", "down", "inventory", "services", "start-daemon", "restart-libvirtd", "status")
    )
    parser.add_argument("--workdir", default="/tmp/pvc-cluster/lab")
    parser.add_argument("--host", help="node name (nodeK) for services / start-daemon / restart-libvirtd")
    parser.add_argument("--zk-root", default=DEFAULT_ZK_ROOT)
    parser.add_argument(
        "--stage",
        choices=("zookeeper", "node"),
        default="node",
        help="services: the rollout's stage (pvc_rollout_stage): the ZooKeeper member, or libvirtd and the node daemon",
    )
    args = parser.parse_args(argv)
    try:
        views = HostViews(Lab.load(args.workdir), zk_root=args.zk_root)
        if args.command == "up":
            views.up()
        elif args.command == "down":
            views.down()
        elif args.command == "inventory":
            print(views.write_inventory())
        elif args.command == "status":
            print(json.dumps(views.services(), indent=2))
        else:
            if not args.host:
                parser.error(f"{args.command} needs --host")
            if args.command == "services" and args.stage == "zookeeper":
                # after the zookeeper role: its member, once it serves
                print(json.dumps({"zookeeper": views.start_zookeeper(args.host)}))
            elif args.command == "services":
                # what systemd would do after the roles ran: libvirtd first, then the daemon (which
                # returns once the daemon is ready, as a Type=notify unit's start does)
                done = {"libvirtd": views.restart_libvirtd(args.host)}
                done["node-daemon"] = views.start_daemon(args.host)
                print(json.dumps(done))
            else:
                fn = views.start_daemon if args.command == "start-daemon" else views.restart_libvirtd
                print(fn(args.host))
    except (ViewError, LabError, subprocess.CalledProcessError) as exc:
        print(f"hostviews {args.command}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.exit(main())
