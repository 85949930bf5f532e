"""The network-namespace lab: N hypervisor "hosts" on one machine, each with a real libvirtd and a
ZooKeeper ensemble member, plus a controller namespace from which tests and Ansible run.

Layout (prefix "lab", N hosts)::

    lab-sw    bridge br-lab; one port p-<ns> per namespace below
    lab-n1    v-lab-n1 10.77.0.1/24   libvirtd (own mount+UTS ns, hostname node1), ZooKeeper 10.77.0.1:2181
    ...
    lab-nN    v-lab-nN 10.77.0.N/24
    lab-ctl   v-lab-ctl 10.77.0.254/24   (tests, kazoo, ansible-playbook)

10.77.0.0/24 exists only inside these namespaces; nothing is routed to or from the machine's own
network. Each libvirtd sees per-host copies of /etc/libvirt, /run/libvirt, /var/lib/libvirt,
/var/cache/libvirt and /var/log/libvirt (bind mounts of WORKDIR/nK/{etc,run,lib,cache,log} in its
private mount namespace), and its unix socket lives in WORKDIR/nK/sock so that it is reachable from
every namespace.

Simulated BMCs (issue #16, ``start_bmcs``): one OpenIPMI ``ipmi_sim`` per host, in the controller
namespace on its own address 10.77.0.(200+K) (a BMC has its own port: it stays reachable when the
host's link is down), UDP 623. Its chassis power control runs ``python -m tests.lab power``: off
SIGKILLs every process in the host's namespace at once (daemon, libvirtd and its reaper, QEMU)
and empties its /run/libvirt, as a power cycle does, except the host's ZooKeeper member (the ensemble stands for the cluster's own ZooKeeper servers and
keeps its quorum), on starts the host's libvirtd again. The node daemon is the test's to start.

Between hosts, libvirt runs as the libvirt role sets it up by default: libvirtd listens on TLS
only (10.77.0.K:16514; its TCP socket is off), accepts a client certificate only when the lab's CA
signed it and its DN is one of the lab's hosts (``tls_allowed_dn_list``), and QEMU refuses a
migration without TLS (``migrate_tls_force``), so every live migration streams its memory over
TLS. The lab's CA and each host's certificates are made at every `up` (pki.py) and each host's
libvirtd sees its own as ``/etc/pki``.

LAB ONLY: libvirtd accepts unauthenticated clients on its unix socket, and QEMU runs as root
without a security driver. Never use these settings elsewhere.

Every process the lab starts is recorded in WORKDIR/lab.json (PID plus kernel start time, so a
reused PID is never mistaken for ours): per host a ZooKeeper JVM, a libvirtd, and reaper.py, the
libvirtd's parent that reaps the QEMU processes libvirt daemonizes, and the guests' storage
daemon once something started it (storage.py) (every change of the file is a read-modify-write
under an flock of WORKDIR/.lab.lock, so processes that share a lab lose no record).
`down`, in any process, ends those,
plus what the host's pidfiles name once checked to be that program in that host's namespace (the
QEMU pidfiles under the host's run directory; a daemon restarted by a test), then deletes the
namespaces. Nothing is ever killed by name. `up` first does the same for whatever an earlier run left;
if a lab namespace holds a process that is not ours (another lab, a test's leftover), it deletes
nothing and says which processes are in the way.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable, Iterable

from tests.support.zookeeper import Peer, ZooKeeperServer

from . import pki

REPO_ROOT = Path(__file__).resolve().parents[2]
REAPER = Path(__file__).resolve().parent / "reaper.py"
STATE_VERSION = 1
LAB_NET = "10.77.0"
CTL_ADDRESS = f"{LAB_NET}.254"
ZK_PORT = 2181
LIBVIRT_TCP_PORT = 16509  # libvirt's plain TCP socket: not listening (tests check it stays closed)
LIBVIRT_TLS_PORT = 16514
LIBVIRTD = "/usr/sbin/libvirtd"
QEMU = "/usr/bin/qemu-system-x86_64"
SWITCH_BRIDGE = "br-lab"
# per-host directory name -> where the host's libvirtd sees it
LIBVIRT_MOUNTS = {
    "etc": "/etc/libvirt",
    "run": "/run/libvirt",
    "lib": "/var/lib/libvirt",
    "cache": "/var/cache/libvirt",
    "log": "/var/log/libvirt",
    "pki": "/etc/pki",  # the host's certificates (pki.py), where libvirtd and QEMU look by default
}
# what `down` removes from a host directory (logs stay for post-mortems until the next `up`)
RUNTIME_DIRS = ("etc", "run", "lib", "cache", "sock", "pki")
CAPS_SUBDIR = Path("qemu") / "capabilities"
UNIX_PATH_MAX = 107


def connect_unix(sock: socket.socket, path: Path) -> None:
    """connect() to the unix socket at ``path`` through a descriptor of its directory: a path
    under the lab's workdir (a guest's channel in libvirt's channel directory, the storage
    daemon's QMP socket) can be longer than a socket address holds (UNIX_PATH_MAX), e.g. under a
    lab prefix (PVC_LAB_PREFIX), and connect() then fails with "AF_UNIX path too long"."""
    _through_directory(sock.connect, path)


def bind_unix(sock: socket.socket, path: Path) -> None:
    """bind() ``sock`` to ``path`` however long it is, as connect_unix connects."""
    _through_directory(sock.bind, path)


def _through_directory(call: Callable[[str], None], path: Path) -> None:
    directory = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
    try:
        call(f"/proc/self/fd/{directory}/{path.name}")
    finally:
        os.close(directory)


LIBVIRTD_CONF = """\
# pvc.cluster lab, host {name}. LAB ONLY: no authentication on the unix socket.
# Peers reach it over TLS on {address} (an address that exists only inside the lab's network
# namespaces) with a client certificate of one of the lab's hosts; no plain TCP socket.
unix_sock_dir = "{sock}"
unix_sock_ro_perms = "0777"
unix_sock_rw_perms = "0700"
auth_unix_ro = "none"
auth_unix_rw = "none"
listen_tls = 1
listen_tcp = 0
listen_addr = "{address}"
tls_port = "{tls_port}"
auth_tls = "none"
tls_no_verify_certificate = 0
tls_allowed_dn_list = [ {allowed_dns} ]
host_uuid = "{host_uuid}"
log_outputs = "3:file:/var/log/libvirt/libvirtd.log"
"""

# QEMU as root, no cgroups, no namespaces, no security driver, no virtlogd (see environment.md).
QEMU_CONF = """\
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
stdio_handler = "file"
cgroup_controllers = [ ]
namespaces = [ ]
migrate_tls_force = 1
"""


class LabError(RuntimeError):
    """The lab cannot be brought up, or a namespace holds processes the lab did not start."""


# --------------------------------------------------------------------------------------------
# processes, identified by PID + start time


def proc_starttime(pid: int) -> int | None:
    """The process's start time in clock ticks since boot, or None when it does not exist."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state); starttime is field 22
    if fields[0] in ("Z", "X"):
        _reap(pid)
        return None
    return int(fields[19])


def proc_cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def proc_name(pid: int) -> str | None:
    """Basename of the program's argv[0]."""
    argv = proc_cmdline(pid)
    return os.path.basename(argv[0]) if argv else None


def proc_ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2 :].split()[1])


def netns_inode_of_pid(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None


def netns_inode(name: str) -> int | None:
    try:
        return os.stat(f"/run/netns/{name}").st_ino
    except OSError:
        return None


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


@dataclass
class ProcRecord:
    role: str  # libvirtd | reaper (libvirtd's parent) | zookeeper | qemu | storage (storage.py)
    host: str  # the host's namespace
    pid: int
    starttime: int | None

    def alive(self) -> bool:
        current = proc_starttime(self.pid)
        return current is not None and current == self.starttime

    def as_dict(self) -> dict:
        return {"role": self.role, "host": self.host, "pid": self.pid, "starttime": self.starttime}


def terminate(records: Iterable[ProcRecord], timeout_s: float = 10.0) -> list[ProcRecord]:
    """SIGTERM every live record, wait for all, SIGKILL what is left. Returns what was signalled."""
    live = [r for r in records if r.alive()]
    for r in live:
        _signal(r, signal.SIGTERM)
    pending = _wait_gone(live, timeout_s)
    for r in pending:
        _signal(r, signal.SIGKILL)
    pending = _wait_gone(pending, 5.0)
    if pending:
        raise LabError("processes survived SIGKILL: " + ", ".join(f"{r.role} {r.pid}" for r in pending))
    return live


def _signal(record: ProcRecord, sig: int) -> None:
    if not record.alive():  # re-checked right before signalling: never hit a reused PID
        return
    try:
        os.kill(record.pid, sig)
    except ProcessLookupError:
        pass


def _bounded(fn: Callable[[], object], timeout_s: float, what: str):
    """fn() in a daemon thread, waited for at most ``timeout_s`` (a libvirt call has no timeout of
    its own); raises LabError when it is not done by then (the thread is left to finish)."""
    result: list = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            result.append(fn())
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=run, name=f"lab-{what}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise LabError(f"{what}: no answer within {timeout_s:g} s")
    if error:
        raise error[0]
    return result[0]


def _wait_gone(records: list[ProcRecord], timeout_s: float) -> list[ProcRecord]:
    # A process we did not spawn (or spawned from another `up`) gives no exit event we could wait
    # on, so /proc is polled every 50 ms; our own children are reaped on the way.
    deadline = time.monotonic() + timeout_s
    pending = list(records)
    while pending:
        pending = [r for r in pending if r.alive()]
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    return pending


def pids_by_netns() -> dict[int, list[int]]:
    """netns inode -> PIDs of the processes in it (like `ip netns pids`, for all at once)."""
    result: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        ino = netns_inode_of_pid(pid)
        if ino is not None and proc_starttime(pid) is not None:
            result.setdefault(ino, []).append(pid)
    return result


def list_netns() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        raise LabError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def _ip_batch(lines: list[str], netns: str | None = None) -> None:
    cmd = ["ip"] + (["-n", netns] if netns else []) + ["-batch", "-"]
    proc = subprocess.run(cmd, input="\n".join(lines) + "\n", capture_output=True, text=True)
    if proc.returncode != 0:
        raise LabError(f"ip {'-n ' + netns if netns else ''} -batch failed: {proc.stderr.strip()}")


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no {path})"


# --------------------------------------------------------------------------------------------


@dataclass
class LabHost:
    """One lab hypervisor host: a network namespace with a libvirtd and a ZooKeeper member."""

    lab: Lab = field(repr=False)
    index: int

    @property
    def name(self) -> str:
        """The host's hostname as its libvirtd reports it (and as the cluster should know it)."""
        return f"node{self.index}"

    @property
    def netns(self) -> str:
        return f"{self.lab.prefix}-n{self.index}"

    @property
    def address(self) -> str:
        return f"{LAB_NET}.{self.index}"

    @property
    def iface(self) -> str:
        """The host's interface on the lab network (inside its namespace)."""
        return f"v-{self.netns}"

    @property
    def switch_port(self) -> str:
        """The host's port on the lab bridge (inside the switch namespace)."""
        return f"p-{self.netns}"

    @property
    def dir(self) -> Path:
        return self.lab.workdir / f"n{self.index}"

    @property
    def host_uuid(self) -> str:
        return f"7ab1ab00-0000-4000-8000-{self.index:012d}"

    @property
    def libvirt_socket(self) -> Path:
        return self.dir / "sock" / "libvirt-sock"

    @property
    def libvirt_uri(self) -> str:
        """Reaches this host's libvirtd from any namespace (the unix socket is in the workdir)."""
        return f"qemu+unix:///system?socket={self.libvirt_socket}"

    @property
    def libvirt_tls_uri(self) -> str:
        """How a peer's libvirtd reaches this host's (the node daemon's default template): from
        inside the lab namespaces only, with a client certificate of a lab host."""
        return f"qemu+tls://{self.address}/system"

    def libvirt_tls_uri_as(self, client: str) -> str:
        """libvirt_tls_uri for a client process outside the hosts' mount namespaces, presenting
        the certificate of ``client`` (pki.CLIENTS: node1, controller, foreign)."""
        return f"{self.libvirt_tls_uri}?pkipath={self.lab.pki_clients_dir / client}"

    @property
    def migration_uri(self) -> str:
        """For VIR_MIGRATE_PARAM_URI: all hosts share one kernel, so name the address explicitly."""
        return f"tcp://{self.address}"

    @property
    def zk_address(self) -> str:
        """This host's own ensemble member."""
        return f"{self.address}:{ZK_PORT}"

    @property
    def zk_hosts(self) -> str:
        """The whole ensemble's connection string (reachable from lab namespaces only)."""
        return self.lab.zk_hosts

    @property
    def pki_dir(self) -> Path:
        """This host's /etc/pki as its libvirtd (and its Ansible view) sees it."""
        return self.dir / "pki"

    @property
    def libvirtd_pidfile(self) -> Path:
        return self.dir / "libvirtd.pid"

    @property
    def libvirtd_log(self) -> Path:
        return self.dir / "log" / "libvirtd.log"

    @property
    def qemu_log_dir(self) -> Path:
        return self.dir / "log" / "qemu"

    @property
    def zk(self) -> ZooKeeperServer:
        """The ZooKeeperServer for this member (its .process is set only in the process that ran up)."""
        return self.lab._zk[self.index]

    # -- actions ----------------------------------------------------------------------------

    def run(
        self, args: list[str] | str, *, check: bool = True, timeout: float = 120, **kw
    ) -> subprocess.CompletedProcess:
        """Run a command inside this host's network namespace (shared filesystem and hostname)."""
        return self.lab._ns_run(self.netns, args, check=check, timeout=timeout, **kw)

    def connect(self):
        """A new libvirt connection to this host's libvirtd (the caller closes it)."""
        import libvirt

        return libvirt.open(self.libvirt_uri)

    def domains(self, running_only: bool = True) -> list[str]:
        import libvirt

        flags = libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE if running_only else 0
        conn = self.connect()
        try:
            return sorted(d.name() for d in conn.listAllDomains(flags))
        finally:
            conn.close()

    def set_link(self, up: bool) -> None:
        """Cut (up=False) or restore this host's link to the lab network, for partition tests."""
        _run(["ip", "-n", self.lab.switch_netns, "link", "set", self.switch_port, "up" if up else "down"])

    @property
    def bmc_address(self) -> str:
        """Where this host's simulated BMC listens (in the controller namespace)."""
        return f"{LAB_NET}.{200 + self.index}"

    def power_off(self) -> list[int]:
        """A power loss: every process of this host killed at once (see the module docstring)."""
        return self.lab.power_off(self)

    def power_on(self) -> None:
        self.lab.power_on(self)

    @property
    def powered_off(self) -> bool:
        state = _read_state(self.lab.state_file) or {}
        return self.netns in state.get("powered_off", [])

    def stop_libvirtd(self, sig: int = signal.SIGTERM) -> None:
        """End this host's libvirtd (SIGKILL to simulate a crash). Its guests keep running."""
        self.lab._stop_libvirtd(self, sig)

    def start_libvirtd(self) -> None:
        """Start this host's libvirtd again (after stop_libvirtd) and wait until it answers."""
        self.lab._restart_libvirtd(self)

    def pause_libvirtd(self) -> None:
        """SIGSTOP this host's libvirtd: a hung libvirtd (its socket still accepts, nothing
        answers). Every client of it, the lab's own included, waits until resume_libvirtd()."""
        self.lab._signal_libvirtd(self, signal.SIGSTOP)

    def resume_libvirtd(self) -> None:
        """SIGCONT this host's libvirtd (after pause_libvirtd)."""
        self.lab._signal_libvirtd(self, signal.SIGCONT)


class Lab:
    """Bring the lab up and down; see the module docstring."""

    def __init__(
        self,
        workdir: str | Path,
        hosts: int = 3,
        *,
        prefix: str = "lab",
        caps_cache: str | Path | None = None,
        vm_bridge: str | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        if not 1 <= hosts <= 200:
            raise LabError(f"hosts must be between 1 and 200, not {hosts}")
        self.workdir = Path(workdir).resolve()
        self.prefix = prefix
        self.caps_cache = Path(caps_cache) if caps_cache else self.workdir.parent / "caps-cache"
        self.vm_bridge = vm_bridge
        self._log = log or _print
        self._t0 = time.monotonic()
        self.hosts = [LabHost(self, i) for i in range(1, hosts + 1)]
        self._zk = {
            h.index: ZooKeeperServer(
                workdir=h.dir / "zk",
                client_port=ZK_PORT,
                client_address=h.address,
                server_id=h.index,
                peers=[Peer(p.index, p.address) for p in self.hosts],
                netns=h.netns,
            )
            for h in self.hosts
        }
        self._libvirtd: dict[int, subprocess.Popen] = {}
        self._abort = threading.Event()
        longest = self.hosts[-1].libvirt_socket
        if len(str(longest)) > UNIX_PATH_MAX:
            raise LabError(f"workdir too long for a unix socket path: {longest}")

    @classmethod
    def load(cls, workdir: str | Path, log: Callable[[str], None] | None = None) -> Lab:
        """A Lab for the state `up` recorded in WORKDIR/lab.json (a 3-host default if none)."""
        state = _read_state(Path(workdir).resolve() / "lab.json")
        if not state:
            return cls(workdir, log=log)
        return cls(
            workdir,
            hosts=len(state["hosts"]),
            prefix=state["prefix"],
            caps_cache=state.get("caps_cache"),
            vm_bridge=state.get("vm_bridge"),
            log=log,
        )

    # -- names ------------------------------------------------------------------------------

    @property
    def switch_netns(self) -> str:
        return f"{self.prefix}-sw"

    @property
    def ctl_netns(self) -> str:
        return f"{self.prefix}-ctl"

    @property
    def ctl_address(self) -> str:
        return CTL_ADDRESS

    @property
    def namespaces(self) -> list[str]:
        return [self.switch_netns, self.ctl_netns] + [h.netns for h in self.hosts]

    @property
    def zk_hosts(self) -> str:
        return ",".join(h.zk_address for h in self.hosts)

    @property
    def state_file(self) -> Path:
        return self.workdir / "lab.json"

    @property
    def hosts_file(self) -> Path:
        """/etc/hosts as the hosts' libvirtds see it (nodeK -> 10.77.0.K)."""
        return self.workdir / "hosts"

    @property
    def pki_clients_dir(self) -> Path:
        """The tests' libvirt client certificates (pki.py: pkipath directories)."""
        return self.workdir / "pki" / "clients"

    @property
    def libvirt_allowed_dns(self) -> list[str]:
        """The client DNs every host's libvirtd accepts: the lab's hosts'."""
        return [pki.distinguished_name(h.name) for h in self.hosts]

    def host(self, index: int) -> LabHost:
        """Host by its 1-based number (node1 = host(1))."""
        return self.hosts[index - 1]

    # -- controller -------------------------------------------------------------------------

    def ctl_run(
        self, args: list[str] | str, *, check: bool = True, timeout: float = 300, **kw
    ) -> subprocess.CompletedProcess:
        """Run a command in the controller namespace (a string runs through /bin/sh -c).

        Output is captured as text unless stdout/stderr/capture_output are given; cwd defaults to
        the repository root. Raises subprocess.CalledProcessError on failure when check is true.
        """
        return self._ns_run(self.ctl_netns, args, check=check, timeout=timeout, **kw)

    def ctl_python(self, code: str, *args: str, **kw) -> subprocess.CompletedProcess:
        """Run a Python snippet with this interpreter (the venv) in the controller namespace."""
        return self.ctl_run([sys.executable, "-c", code, *args], **kw)

    def _ns_run(self, netns: str, args, *, check: bool, timeout: float, **kw) -> subprocess.CompletedProcess:
        if isinstance(args, str):
            args = ["/bin/sh", "-c", args]
        if not {"stdout", "stderr", "capture_output"} & kw.keys():
            kw["capture_output"] = True
        kw.setdefault("text", True)
        kw.setdefault("cwd", str(REPO_ROOT))
        proc = subprocess.run(["ip", "netns", "exec", netns, *args], timeout=timeout, **kw)
        if check and proc.returncode != 0:
            raise subprocess.CalledProcessError(proc.returncode, proc.args, proc.stdout, proc.stderr)
        return proc

    # -- preflight --------------------------------------------------------------------------

    @staticmethod
    def preflight() -> None:
        """Raise LabError naming what this machine lacks to run the lab."""
        problems = []
        if os.geteuid() != 0:
            problems.append("must run as root (network namespaces, bind mounts, libvirtd)")
        for tool in ("ip", "unshare", "java", LIBVIRTD, QEMU):
            if not shutil.which(tool):
                problems.append(f"{tool} not found (make setup installs it)")
        import grp
        import pwd

        try:
            pwd.getpwnam("libvirt-qemu")
            grp.getgrnam("libvirt-qemu")
        except KeyError:
            problems.append("user and group libvirt-qemu must exist (make setup creates them)")
        if not problems:
            probe = subprocess.run(["unshare", "--net", "--mount", "true"], capture_output=True, text=True)
            if probe.returncode != 0:
                problems.append(f"cannot create network/mount namespaces: {probe.stderr.strip()}")
        if problems:
            raise LabError("the lab cannot run here: " + "; ".join(problems))

    # -- up ---------------------------------------------------------------------------------

    def up(self, keep_on_failure: bool = False) -> None:
        """Clean up leftovers, then start everything and wait until it all answers."""
        self._t0 = time.monotonic()
        self.preflight()
        try:
            self._up()
        except BaseException as exc:
            if keep_on_failure or self._state is None:  # nothing of ours started yet
                raise
            self.log(f"up failed ({type(exc).__name__}: {exc}); cleaning up")
            try:
                self._cleanup()
            except LabError as cleanup_error:
                self.log(f"cleanup after the failed up also failed: {cleanup_error}")
            raise

    def _parallel(self, fn, items: list) -> list:
        """fn over items in threads; on any error (or Ctrl-C) tell the others to give up."""
        if not items:
            return []
        pool = ThreadPoolExecutor(max_workers=len(items))
        try:
            return list(pool.map(fn, items))
        except BaseException:
            self._abort.set()
            raise
        finally:
            pool.shutdown(wait=True)

    def _up(self) -> None:
        self._abort.clear()
        n = len(self.hosts)
        self.log(f"up: {n} hosts in {self.workdir}")
        self._cleanup()
        self.workdir.mkdir(parents=True, exist_ok=True)
        state = {
            "version": STATE_VERSION,
            "workdir": str(self.workdir),
            "prefix": self.prefix,
            "caps_cache": str(self.caps_cache),
            "vm_bridge": self.vm_bridge,
            "hosts": [{"name": h.name, "netns": h.netns, "address": h.address, "dir": str(h.dir)} for h in self.hosts],
            "namespaces": [],
            "netns_inodes": {},
            "processes": [],
            "started": time.time(),
            "ready": False,
        }
        self._state = state
        self._save_state()

        self._make_network()
        self.log(
            f"network: {self.switch_netns} ({SWITCH_BRIDGE}), {self.ctl_netns} {CTL_ADDRESS}, "
            f"{self.hosts[0].netns}..{self.hosts[-1].netns} {LAB_NET}.1-{n}"
        )

        seeded = self._write_host_dirs()
        for h in self.hosts:
            h.zk.start(wait=False)
            self._record(h.zk.process.pid, "zookeeper", h)
        for h in self.hosts:
            self._start_libvirtd(h)
        self.log("started ZooKeeper and libvirtd on every host")

        self._parallel(self._wait_libvirtd, self.hosts)
        self.log("libvirtd: every socket answers")

        self._warm_capabilities(seeded)

        for h in self.hosts:
            try:
                h.zk.wait_ready(timeout_s=60.0)
            except (RuntimeError, TimeoutError) as exc:
                raise LabError(f"{exc}\n{_tail(h.zk.workdir / 'zookeeper.log')}") from exc
        modes = {h.name: h.zk.mode() for h in self.hosts}
        self.log("ZooKeeper quorum: " + ", ".join(f"{k} {v}" for k, v in modes.items()))

        with self._changing_state() as state:
            state["ready"] = True
        self.log(f"lab up: ZooKeeper {self.zk_hosts}; libvirt {self.hosts[0].libvirt_uri} ...")

    def _make_network(self) -> None:
        sw = self.switch_netns
        peers = [(self.ctl_netns, CTL_ADDRESS)] + [(h.netns, h.address) for h in self.hosts]
        for ns in [sw] + [ns for ns, _ in peers]:
            _run(["ip", "netns", "add", ns])
            with self._changing_state() as state:
                state["namespaces"].append(ns)
                state["netns_inodes"][ns] = netns_inode(ns)
        # veth pairs are created directly in their namespaces: nothing appears in the root namespace
        _ip_batch([f"link add v-{ns} netns {ns} type veth peer name p-{ns} netns {sw}" for ns, _ in peers])
        _ip_batch(
            ["link set lo up", f"link add {SWITCH_BRIDGE} type bridge", f"link set {SWITCH_BRIDGE} up"]
            + [f"link set p-{ns} master {SWITCH_BRIDGE} up" for ns, _ in peers],
            sw,
        )
        for ns, address in peers:
            lines = ["link set lo up", f"addr add {address}/24 dev v-{ns}", f"link set v-{ns} up"]
            if self.vm_bridge and ns != self.ctl_netns:
                lines += [f"link add {self.vm_bridge} type bridge", f"link set {self.vm_bridge} up"]
            _ip_batch(lines, ns)

    def _write_host_dirs(self) -> bool:
        """Per-host libvirt directories and configs; returns whether the caps cache was seeded."""
        for mountpoint in LIBVIRT_MOUNTS.values():
            # empty mount points on the real root filesystem, for the per-host bind mounts
            Path(mountpoint).mkdir(parents=True, exist_ok=True)
        cached = sorted(self.caps_cache.glob("*.xml")) if self.caps_cache.is_dir() else []
        self.hosts_file.write_text(
            "127.0.0.1 localhost\n"
            + "".join(f"{h.address} {h.name}\n" for h in self.hosts)
            + f"{CTL_ADDRESS} controller\n"
        )
        ca = pki.Authority.create(f"pvc.cluster lab CA {self.prefix}")
        allowed_dns = ", ".join(f'"{dn}"' for dn in self.libvirt_allowed_dns)
        for h in self.hosts:
            if h.dir.exists():
                shutil.rmtree(h.dir)
            for sub in list(LIBVIRT_MOUNTS) + ["sock"]:
                (h.dir / sub).mkdir(parents=True)
            (h.dir / "etc" / "libvirtd.conf").write_text(
                LIBVIRTD_CONF.format(
                    name=h.name,
                    address=h.address,
                    sock=h.libvirt_socket.parent,
                    tls_port=LIBVIRT_TLS_PORT,
                    allowed_dns=allowed_dns,
                    host_uuid=h.host_uuid,
                )
            )
            pki.write_host_pki(ca, h.pki_dir, h.name, h.address)
            (h.dir / "etc" / "qemu.conf").write_text(QEMU_CONF)
            if cached:
                caps = h.dir / "cache" / CAPS_SUBDIR
                caps.mkdir(parents=True)
                for f in cached:
                    shutil.copy2(f, caps / f.name)
        if self.pki_clients_dir.parent.exists():
            shutil.rmtree(self.pki_clients_dir.parent)
        pki.write_client_dirs(ca, self.pki_clients_dir, self.hosts[0].pki_dir)
        return bool(cached)

    def _start_libvirtd(self, h: LabHost) -> None:
        d = h.dir
        mounts = "; ".join(f"mount --bind {d / sub} {target}" for sub, target in LIBVIRT_MOUNTS.items())
        # libvirtd resolves its own hostname (and peers' names); give it the lab's names
        mounts += f"; mount --bind {self.hosts_file} /etc/hosts"
        script = (
            f"set -e; hostname {h.name}; mount --make-rprivate /; {mounts}; "
            f"exec {sys.executable} -I -S {REAPER} "
            f"{LIBVIRTD} --listen -f /etc/libvirt/libvirtd.conf --pid-file {h.libvirtd_pidfile}"
        )
        out = open(d / "libvirtd.stdout", "ab")
        # ip netns exec, unshare and sh all exec(), so the PID we get is the reaper's (reaper.py:
        # libvirtd's parent, which reaps the QEMU processes libvirt daemonizes)
        proc = subprocess.Popen(
            ["ip", "netns", "exec", h.netns, "unshare", "--mount", "--uts", "sh", "-c", script],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        out.close()
        self._libvirtd[h.index] = proc
        self._record(proc.pid, "reaper", h)

    def _wait_libvirtd(self, h: LabHost, timeout_s: float = 30.0) -> None:
        import libvirt

        proc = self._libvirtd[h.index]
        deadline = time.monotonic() + timeout_s
        # libvirtd signals readiness only by answering on its socket; poll every 50 ms.
        while not h.libvirt_socket.exists():
            if self._abort.is_set():
                raise LabError("aborted")
            if proc.poll() is not None:
                raise LabError(
                    f"libvirtd on {h.name} exited with {proc.returncode}:\n"
                    f"{_tail(h.dir / 'libvirtd.stdout')}\n{_tail(h.libvirtd_log)}"
                )
            if time.monotonic() > deadline:
                raise LabError(f"libvirtd on {h.name}: no socket {h.libvirt_socket} after {timeout_s} s")
            time.sleep(0.05)
        last_error = None
        while time.monotonic() < deadline:
            try:
                conn = libvirt.open(h.libvirt_uri)
            except libvirt.libvirtError as exc:
                last_error = exc
                if self._abort.is_set():
                    raise LabError("aborted") from exc
                if proc.poll() is not None:
                    raise LabError(
                        f"libvirtd on {h.name} exited with {proc.returncode}:\n{_tail(h.libvirtd_log)}"
                    ) from exc
                time.sleep(0.05)
                continue
            try:
                hostname = conn.getHostname()
            finally:
                conn.close()
            if hostname != h.name:
                raise LabError(f"libvirtd on {h.netns} reports hostname {hostname!r}, not {h.name!r}")
            pid = _read_pid(h.libvirtd_pidfile)
            if pid is None or proc_ppid(pid) != proc.pid or proc_name(pid) != "libvirtd":
                raise LabError(f"libvirtd on {h.name}: pidfile names {pid}, not a libvirtd child of {proc.pid}")
            self._record(pid, "libvirtd", h)
            return
        raise LabError(f"libvirtd on {h.name} not answering after {timeout_s} s: {last_error}")

    def _warm_capabilities(self, seeded: bool) -> None:
        """Make each libvirtd load (or probe) the QEMU capabilities now rather than at the first VM
        start, and keep a copy for the next `up`. A cold probe takes ~4 s per daemon, so with an
        empty cache node1 probes alone and the others start from its result."""
        t = time.monotonic()
        if seeded:
            self._parallel(_domain_capabilities, self.hosts)
        else:
            first, rest = self.hosts[0], self.hosts[1:]
            _domain_capabilities(first)
            files = sorted((first.dir / "cache" / CAPS_SUBDIR).glob("*.xml"))
            for h in rest:
                caps = h.dir / "cache" / CAPS_SUBDIR
                caps.mkdir(parents=True, exist_ok=True)
                for f in files:
                    shutil.copy2(f, caps / f.name)
            self._parallel(_domain_capabilities, rest)
        self._save_caps_cache()
        self.log(
            f"QEMU capabilities {'loaded from cache' if seeded else 'probed (cold)'} in {time.monotonic() - t:.1f} s"
        )

    def _save_caps_cache(self) -> None:
        src = self.hosts[0].dir / "cache" / CAPS_SUBDIR
        files = sorted(src.glob("*.xml"))
        if not files:
            return
        self.caps_cache.mkdir(parents=True, exist_ok=True)
        for f in files:
            dest = self.caps_cache / f.name
            if dest.exists() and dest.read_bytes() == f.read_bytes():
                continue
            tmp = dest.with_suffix(f".tmp{os.getpid()}")
            shutil.copy2(f, tmp)
            os.replace(tmp, dest)

    # -- down -------------------------------------------------------------------------------

    def down(self) -> None:
        """End everything recorded in lab.json, delete the lab's namespaces and runtime state."""
        t0 = time.monotonic()
        self._cleanup()
        self.log(f"lab down in {time.monotonic() - t0:.1f} s")

    def _cleanup(self) -> None:
        state = _read_state(self.state_file)
        if state:
            owned = self._owned(state)
            ended = terminate([r for r in owned if r.role == "qemu"])
            ended += terminate([r for r in owned if r.role in ("libvirtd", "zookeeper", "storage", "bmc")])
            ended += terminate([r for r in owned if r.role == "reaper"])  # normally gone with libvirtd
            if ended:
                self.log("ended " + ", ".join(f"{r.role} {r.pid} ({r.host})" for r in ended))
        for proc in self._libvirtd.values():
            proc.poll()
        self._libvirtd.clear()
        for zk in self._zk.values():
            if zk.process is not None:
                zk.process.poll()
                zk.process = None

        leftovers = [ns for ns in list_netns() if ns.startswith(f"{self.prefix}-")]
        foreign: dict[str, list[int]] = {}
        if leftovers:
            by_ns = pids_by_netns()
            for ns in leftovers:
                pids = by_ns.get(netns_inode(ns) or -1, [])
                if pids:
                    foreign[ns] = pids
            # One busy namespace means another lab (or something a test left) is using this set:
            # then none of them is deleted, not even the idle switch or controller namespace.
            if not foreign:
                for ns in leftovers:
                    subprocess.run(["ip", "netns", "del", ns], capture_output=True)
                self.log("deleted namespaces " + " ".join(leftovers))

        if state is not None:
            self.state_file.unlink(missing_ok=True)
        for h in self._host_dirs(state):
            for sub in RUNTIME_DIRS:
                shutil.rmtree(h / sub, ignore_errors=True)
            shutil.rmtree(h / "zk" / "data", ignore_errors=True)
        shutil.rmtree(self.pki_clients_dir.parent, ignore_errors=True)
        self._state = None

        if foreign:
            raise LabError(self._foreign_message(foreign))

    def _owned(self, state: dict) -> list[ProcRecord]:
        """Every live process of this lab: those lab.json records, plus what the pidfiles name
        (QEMU; a daemon an interrupted `up` did not get to record or that a test restarted with
        ZooKeeperServer.start() / LabHost.start_libvirtd()), each checked before it counts."""
        inodes = state.get("netns_inodes", {})
        owned = [r for r in (ProcRecord(**d) for d in state.get("processes", [])) if r.alive()]
        for role in ("libvirtd", "zookeeper", "qemu"):
            known = {r.pid for r in owned}
            owned += [r for r in self._pidfile_records(state, inodes, role) if r.pid not in known and r.alive()]
        return owned

    def _host_dirs(self, state: dict | None) -> list[Path]:
        dirs = {h.dir for h in self.hosts}
        if state:
            dirs |= {Path(h["dir"]) for h in state.get("hosts", [])}
        return sorted(d for d in dirs if d.is_dir())

    def _pidfile_records(self, state: dict, inodes: dict[str, int | None], role: str) -> list[ProcRecord]:
        """Processes named by pidfiles of the recorded hosts (role "qemu": libvirt's QEMU pidfiles;
        "libvirtd", "zookeeper": the daemons' own), checked to be that program running in that
        host's namespace (inode recorded at creation) before they count as ours."""
        records = []
        for h in state.get("hosts", []):
            d = Path(h["dir"])
            if role == "qemu":
                files = list((d / "run" / "qemu").glob("*.pid"))
                probe = d / "lib" / "qemu" / "capabilities.pidfile"
                if probe.exists():
                    files.append(probe)
            elif role == "libvirtd":
                files = [d / "libvirtd.pid"]
            else:
                files = [d / "zk" / "zookeeper.pid"]
            for f in files:
                pid = _read_pid(f)
                if pid is None:
                    continue
                name = proc_name(pid) or ""
                if role == "qemu":
                    ours = name.startswith("qemu-system")
                elif role == "libvirtd":
                    ours = name == "libvirtd"
                else:
                    ours = name == "java" and str(d / "zk" / "zoo.cfg") in proc_cmdline(pid)
                if not ours:
                    continue
                want = inodes.get(h["netns"])
                if want is None or netns_inode_of_pid(pid) != want:
                    continue
                records.append(ProcRecord(role, h["netns"], pid, proc_starttime(pid)))
        return records

    def _foreign_message(self, foreign: dict[str, list[int]]) -> str:
        lines = []
        other_workdirs = set()
        for ns, pids in foreign.items():
            for pid in pids:
                argv = proc_cmdline(pid)
                lines.append(f"  {ns}: pid {pid}: {' '.join(argv)[:200]}")
                for a in argv:
                    for marker in ("/libvirtd.pid", "/zk/zoo.cfg"):
                        if a.endswith(marker):
                            other_workdirs.add(str(Path(a[: -len(marker)]).parent))
        hint = ""
        if other_workdirs:
            hint = "\nanother lab seems to be running; end it with: " + "; ".join(
                f"python -m tests.lab down --workdir {w}" for w in sorted(other_workdirs)
            )
        return (
            "lab namespaces hold processes this lab did not start; no namespace was deleted and\n"
            "no such process touched:\n" + "\n".join(lines) + hint
        )

    # -- status -----------------------------------------------------------------------------

    def status(self) -> list[dict]:
        """One row per host: what `up` recorded and whether it is alive and serving now."""
        state = _read_state(self.state_file)
        if not state:
            return []
        procs = [ProcRecord(**r) for r in state.get("processes", [])]
        rows = []
        for h in self.hosts:
            libvirtd = next((p for p in procs if p.role == "libvirtd" and p.host == h.netns), None)
            zk = next((p for p in procs if p.role == "zookeeper" and p.host == h.netns), None)
            libvirtd_alive = bool(libvirtd and libvirtd.alive())
            domains: list[str] | str = []
            if libvirtd_alive:
                try:
                    domains = h.domains()
                except Exception as exc:  # status must print something for every host
                    domains = f"error: {exc}"
            rows.append(
                {
                    "host": h.name,
                    "netns": h.netns,
                    "address": h.address,
                    "libvirtd_pid": libvirtd.pid if libvirtd else None,
                    "libvirtd_alive": libvirtd_alive,
                    "zk_pid": zk.pid if zk else None,
                    "zk_alive": bool(zk and zk.alive()),
                    "zk_mode": h.zk.mode() if zk and zk.alive() else None,
                    "domains": domains,
                }
            )
        return rows

    def status_table(self) -> str:
        rows = self.status()
        if not rows:
            return f"no lab recorded in {self.state_file}"
        header = ("HOST", "NAMESPACE", "ADDRESS", "LIBVIRTD", "ZOOKEEPER", "RUNNING DOMAINS")
        table = [header]
        for r in rows:
            doms = r["domains"] if isinstance(r["domains"], str) else (", ".join(r["domains"]) or "-")
            table.append(
                (
                    r["host"],
                    r["netns"],
                    r["address"],
                    f"{r['libvirtd_pid']} {'alive' if r['libvirtd_alive'] else 'DEAD'}",
                    f"{r['zk_pid']} {r['zk_mode'] or ('no quorum' if r['zk_alive'] else 'DEAD')}",
                    doms,
                )
            )
        widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
        lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
        lines.append(f"ZooKeeper: {self.zk_hosts} (from lab namespaces, e.g. {self.ctl_netns})")
        return "\n".join(lines)

    def healthy(self) -> bool:
        rows = self.status()
        return bool(rows) and all(r["libvirtd_alive"] and r["zk_mode"] for r in rows)

    # -- helpers for tests ------------------------------------------------------------------

    def recorded_pids(self) -> list[ProcRecord]:
        """The processes lab.json records: per host a ZooKeeper, a libvirtd and its reaper parent
        (empty when the lab is down)."""
        state = _read_state(self.state_file)
        return [ProcRecord(**r) for r in state.get("processes", [])] if state else []

    def processes(self) -> list[ProcRecord]:
        """Every live process the lab owns now (what `down` will end): daemons, reapers, QEMUs."""
        state = _read_state(self.state_file)
        return self._owned(state) if state else []

    def qemu_processes(self) -> list[ProcRecord]:
        """The QEMU processes of the lab's guests, from libvirt's pidfiles."""
        state = _read_state(self.state_file)
        return self._pidfile_records(state, state.get("netns_inodes", {}), "qemu") if state else []

    # A libvirt call of reset() that is not answered within this long (a healthy destroy takes
    # well under a second; libvirt gives up on a domain it cannot stop after 15-30 s).
    RESET_CALL_TIMEOUT_S = 45.0

    def reset(self, names: Iterable[str] | None = None) -> None:
        """Destroy (and undefine) every domain on every host (``names``: only those domains), for
        a clean slate between tests,
        whatever state a failed test left a host in: a libvirtd that is stopped (SIGSTOP) is
        continued, one that is not running is started again, and a domain that libvirt does not
        destroy (an error, or no answer within RESET_CALL_TIMEOUT_S) has its QEMU process ended by
        libvirt's pidfile, as `down` does, and then the host's libvirtd restarted if it still lists
        it (a restarted libvirtd drops a domain whose QEMU is gone). So one failed test does not
        leave the lab unusable for every later one. Raises LabError only when a host still has
        domains after all that (every host is tried first). A host powered off (power_off) is
        powered on."""
        only = None if names is None else set(names)
        failures = []
        for h in self.hosts:
            try:
                self._reset_host(h, only)
            except Exception as exc:  # the other hosts are reset all the same
                failures.append(f"{h.name}: {exc}")
        if failures:
            raise LabError("lab reset failed: " + "; ".join(failures))

    def _reset_host(self, h: LabHost, only: set[str] | None) -> None:
        libvirtds = [r for r in self.recorded_pids() if r.host == h.netns and r.role == "libvirtd" and r.alive()]
        if not libvirtds:
            self.log(f"reset: libvirtd on {h.name} is not running: starting it")
            self.power_on(h)
        else:
            for r in libvirtds:
                _signal(r, signal.SIGCONT)  # a test that stopped it and failed before continuing it
        stuck = self._destroy_all(h, only)
        if not stuck:
            return
        self.log(f"reset: libvirtd on {h.name} did not destroy {', '.join(stuck)}: ending their QEMU processes")
        self._end_qemus(h, stuck)
        stuck = self._destroy_all(h, only)
        if not stuck:
            return
        self.log(f"reset: libvirtd on {h.name} still lists {', '.join(stuck)}: restarting it")
        self._stop_libvirtd(h, signal.SIGKILL)
        self._restart_libvirtd(h)
        stuck = self._destroy_all(h, only)
        if stuck:
            raise LabError(
                f"domains {', '.join(stuck)} are still listed after their QEMUs ended and libvirtd restarted"
            )

    def _destroy_all(self, h: LabHost, only: set[str] | None = None) -> list[str]:
        """Destroy and undefine every domain of ``h`` (``only``: those of these names); the names
        of those that could not be."""
        import libvirt

        def listing() -> list[str]:
            conn = h.connect()
            try:
                return [dom.name() for dom in conn.listAllDomains(0) if only is None or dom.name() in only]
            finally:
                conn.close()

        def clear(name: str) -> None:
            conn = h.connect()
            try:
                dom = conn.lookupByName(name)
                persistent = dom.isPersistent()  # a transient domain is gone once destroyed
                if dom.isActive():
                    dom.destroy()
                if persistent:
                    dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE)
            except libvirt.libvirtError as exc:
                # gone meanwhile (e.g. a restarted libvirtd reaping its guests) is what reset wants
                if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                    raise
            finally:
                conn.close()

        stuck = []
        for name in _bounded(listing, self.RESET_CALL_TIMEOUT_S, f"listing the domains of {h.name}"):
            try:
                _bounded(lambda name=name: clear(name), self.RESET_CALL_TIMEOUT_S, f"destroying {name} on {h.name}")
            except Exception as exc:
                self.log(f"reset: {name} on {h.name}: {exc}")
                stuck.append(name)
        return stuck

    def _end_qemus(self, h: LabHost, names: list[str]) -> None:
        """SIGKILL the QEMU processes of the domains ``names`` of ``h`` (libvirt's pidfiles, each
        checked to be a QEMU of this lab in that host's namespace) and wait until they are gone."""
        ours = {r.pid: r for r in self.qemu_processes() if r.host == h.netns}
        records = []
        for name in names:
            pid = _read_pid(h.dir / "run" / "qemu" / f"{name}.pid")
            if pid in ours:
                records.append(ours[pid])
        for r in records:
            _signal(r, signal.SIGKILL)
        left = _wait_gone(records, 15.0)
        if left:
            raise LabError(f"QEMU processes survived SIGKILL: {[r.pid for r in left]}")

    # -- power and BMCs (issue #16) ------------------------------------------------------------

    def power_off(self, h: LabHost) -> list[int]:
        """SIGKILL every process in ``h``'s namespace but its ZooKeeper member, all at once, and
        wait until they are gone. Returns their PIDs."""
        with self._changing_state() as state:
            if h.netns not in state.setdefault("powered_off", []):
                state["powered_off"].append(h.netns)
            inode = state.get("netns_inodes", {}).get(h.netns)
            keep = {r["pid"] for r in state["processes"] if r["host"] == h.netns and r["role"] == "zookeeper"}
        keep |= {
            r.pid for r in self._pidfile_records(state, state.get("netns_inodes", {}), "zookeeper") if r.host == h.netns
        }
        pids = [pid for pid in pids_by_netns().get(inode or -1, []) if pid not in keep]
        records = [ProcRecord("power", h.netns, pid, proc_starttime(pid)) for pid in pids]
        for record in records:
            _signal(record, signal.SIGKILL)
        left = _wait_gone(records, 15.0)
        if left:
            raise LabError(f"power off of {h.name}: still alive: {[r.pid for r in left]}")
        h.libvirt_socket.unlink(missing_ok=True)
        self._libvirtd.pop(h.index, None)
        # /run is a tmpfs that a power cycle empties: without this, the restarted libvirtd would
        # load the killed QEMUs' status files and list them as running until it finds them gone
        shutil.rmtree(h.dir / "run", ignore_errors=True)
        (h.dir / "run").mkdir(parents=True, exist_ok=True)
        return pids

    def power_on(self, h: LabHost) -> None:
        """Start the host's libvirtd again (its daemon is the test's to start)."""
        with self._changing_state() as state:
            state["powered_off"] = [ns for ns in state.get("powered_off", []) if ns != h.netns]
        if not any(r.alive() for r in self.recorded_pids() if r.host == h.netns and r.role == "libvirtd"):
            self._restart_libvirtd(h)

    def bmcs(self, password: str = "lab-bmc") -> dict:
        """The simulated BMC of every host (tests.support.bmc.SimulatedBMC), not started."""
        from tests.support.bmc import SimulatedBMC

        python = f"cd {REPO_ROOT} && {sys.executable} -m tests.lab power --workdir {self.workdir}"
        return {
            h.name: SimulatedBMC(
                h.name,
                self.workdir / "bmc",
                address=h.bmc_address,
                port=623,
                password=password,
                off=f"{python} --host {h.index} off >> {self.workdir}/bmc/power.log 2>&1",
                on=f"{python} --host {h.index} on >> {self.workdir}/bmc/power.log 2>&1",
            )
            for h in self.hosts
        }

    def start_bmcs(self) -> dict:
        """Start every host's BMC (once per lab; again after a lab went down and up). Returns them."""
        bmcs = self.bmcs()
        state = _read_state(self.state_file) or {}
        running = {r.host for r in self.recorded_pids() if r.role == "bmc" and r.alive()}
        for h in self.hosts:
            bmc = bmcs[h.name]
            if h.netns in running:
                continue
            subprocess.run(
                ["ip", "-n", self.ctl_netns, "addr", "replace", f"{h.bmc_address}/24", "dev", f"v-{self.ctl_netns}"],
                check=True,
                capture_output=True,
            )

            def popen(argv, **kw):
                # ip netns exec execs: the PID is ipmi_sim's
                return subprocess.Popen(["ip", "netns", "exec", self.ctl_netns, *argv], start_new_session=True, **kw)

            bmc.start(
                popen=popen,
                probe=lambda b=bmc: self.ctl_run(
                    [sys.executable, "-c", _BMC_PROBE, b.address, str(b.port), b.password], check=False, timeout=15
                ),
            )
            self._record(bmc.process.pid, "bmc", h)
        del state
        return bmcs

    def stop_bmcs(self) -> None:
        """End every host's BMC that start_bmcs started (by its recorded PID) and forget them, so
        that the lab is back to its base set of processes for the tests that count them."""
        with self._changing_state() as state:
            bmcs = [ProcRecord(**r) for r in state["processes"] if r["role"] == "bmc"]
            state["processes"] = [r for r in state["processes"] if r["role"] != "bmc"]
        for record in bmcs:
            _signal(record, signal.SIGTERM)
        left = _wait_gone(bmcs, 15.0)
        for record in left:
            _signal(record, signal.SIGKILL)
        if _wait_gone(left, 15.0):
            raise LabError(f"BMCs still alive: {[r.pid for r in left]}")

    def _stop_libvirtd(self, h: LabHost, sig: int) -> None:
        mine = [r for r in self.recorded_pids() if r.host == h.netns and r.role in ("libvirtd", "reaper")]
        for r in mine:
            if r.role == "libvirtd":
                _signal(r, sig)
        if _wait_gone(mine, 15.0):
            terminate(mine, 0.0)
        h.libvirt_socket.unlink(missing_ok=True)  # so that a restart waits for the new socket
        self._libvirtd.pop(h.index, None)

    def _signal_libvirtd(self, h: LabHost, sig: int) -> None:
        mine = [r for r in self.recorded_pids() if r.host == h.netns and r.role == "libvirtd" and r.alive()]
        if not mine:
            raise LabError(f"libvirtd on {h.name} is not running")
        for r in mine:
            _signal(r, sig)

    def _restart_libvirtd(self, h: LabHost) -> None:
        # checked and changed under the state's lock (which refuses a lab that is not up)
        with self._changing_state() as state:
            if any(
                ProcRecord(**r).alive() for r in state["processes"] if r["host"] == h.netns and r["role"] == "libvirtd"
            ):
                raise LabError(f"libvirtd on {h.name} is running")
            state["processes"] = [
                r for r in state["processes"] if not (r["host"] == h.netns and r["role"] in ("libvirtd", "reaper"))
            ]
        self._start_libvirtd(h)
        self._wait_libvirtd(h)

    # -- state ------------------------------------------------------------------------------

    _state: dict | None = None
    _state_lock = threading.Lock()

    def _record(self, pid: int, role: str, h: LabHost) -> None:
        rec = ProcRecord(role, h.netns, pid, proc_starttime(pid))
        with self._changing_state() as state:
            state["processes"].append(rec.as_dict())

    @contextlib.contextmanager
    def _changing_state(self):
        """lab.json as it is now, to change in place; saved when the block ends. Serialised
        across threads (the lab starts hosts in parallel) and across processes: a lab loaded by
        another process (a rollout hook restarting a host's libvirtd, `python -m tests.lab`)
        records what it starts in the same file, so the file is read again under the lock
        rather than trusting this process's copy."""
        with self._state_lock, open(self.workdir / ".lab.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
            state = _read_state(self.state_file) or self._state
            if state is None:
                raise LabError("the lab is not up")
            yield state
            self._state = state
            self._save_state()

    def _save_state(self) -> None:
        tmp = self.state_file.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self._state, indent=2) + "\n")
        os.replace(tmp, self.state_file)

    def log(self, message: str) -> None:
        self._log(f"[lab +{time.monotonic() - self._t0:5.1f}s] {message}")


# run in the controller namespace: exit 0 when the BMC at argv[1]:argv[2] answers a power status
_BMC_PROBE = """
import os, subprocess, sys
r = subprocess.run(["ipmitool", "-I", "lanplus", "-C", "3", "-H", sys.argv[1], "-p", sys.argv[2], "-U", "admin", "-E",
                    "chassis", "power", "status"], capture_output=True, text=True, timeout=10,
                   env={"PATH": "/usr/bin:/bin", "IPMI_PASSWORD": sys.argv[3]})
sys.exit(0 if "Chassis Power is" in r.stdout else 1)
"""


def _domain_capabilities(h: LabHost) -> None:
    conn = h.connect()
    try:
        conn.getDomainCapabilities(QEMU, "x86_64", "pc", "qemu")
    finally:
        conn.close()


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _read_state(path: Path) -> dict | None:
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise LabError(f"unreadable lab state {path}: {exc}") from exc
    if state.get("version") != STATE_VERSION:
        raise LabError(f"{path}: state version {state.get('version')}, expected {STATE_VERSION}")
    return state


def _print(message: str) -> None:
    print(message, flush=True)
