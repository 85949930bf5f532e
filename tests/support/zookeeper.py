"""Run real ZooKeeper servers (Debian's `zookeeper` package) for tests, the lab and the demo.

No systemd here: each server is a JVM we start ourselves, remember by PID and end by PID.
The same class runs a standalone server on loopback for pytest and an ensemble member inside a
lab network namespace.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

JAVA_DIR = Path("/usr/share/java")
# The JVM options come from the zookeeper role's defaults: servers here run as the role deploys them.
ROLE_DEFAULTS = Path(__file__).resolve().parents[2] / "roles" / "zookeeper" / "defaults" / "main.yml"
# zookeeper.jar's manifest lacks netty-codec, which the Netty connection factory (needed for TLS)
# requires, so the classpath is spelled out.
CLASSPATH_JARS = (
    "zookeeper.jar",
    "zookeeper-jute.jar",
    "netty-codec.jar",
    "netty-handler.jar",
    "netty-buffer.jar",
    "netty-common.jar",
    "netty-resolver.jar",
    "netty-transport.jar",
    "netty-transport-native-unix-common.jar",
    "netty-transport-native-epoll.jar",
    "log4j-1.2.jar",
    "slf4j-api.jar",
    "slf4j-log4j12.jar",
    "jline.jar",
    "commons-cli.jar",
    "metrics-core.jar",
    "snappy-java.jar",
)
LOG4J = """log4j.rootLogger=INFO, FILE
log4j.appender.FILE=org.apache.log4j.FileAppender
log4j.appender.FILE.File={log}
log4j.appender.FILE.layout=org.apache.log4j.PatternLayout
log4j.appender.FILE.layout.ConversionPattern=%d{{ISO8601}} [myid:%X{{myid}}] - %-5p [%t:%C{{1}}@%L] - %m%n
"""


def role_java_opts() -> list[str]:
    import yaml  # ansible-core's dependency, in the project's venv

    return [str(opt) for opt in yaml.safe_load(ROLE_DEFAULTS.read_text())["zookeeper_java_opts"]]


def classpath() -> str:
    return ":".join(str(JAVA_DIR / jar) for jar in CLASSPATH_JARS if (JAVA_DIR / jar).exists())


@dataclass
class Peer:
    """One ensemble member as every member's zoo.cfg names it."""

    server_id: int
    address: str
    quorum_port: int = 2888
    election_port: int = 3888


@dataclass
class TLSFiles:
    """Java keystores for a TLS client port (see tests/support/tls.py to make them)."""

    keystore: str
    truststore: str
    password: str


@dataclass
class ZooKeeperServer:
    workdir: Path
    client_port: int
    client_address: str = "127.0.0.1"
    server_id: int = 1
    peers: list[Peer] = field(default_factory=list)
    netns: str | None = None
    secure_client_port: int | None = None
    tls: TLSFiles | None = None
    # ssl.clientAuth of the TLS client port: need (every client shows a certificate of the CA) or
    # none (clients authenticate by digest over TLS, as the zookeeper role's default has it)
    tls_client_auth: str = "need"
    # every client must authenticate (digest) before its first request, as the zookeeper role's
    # servers do by default (enforce.auth)
    enforce_auth: bool = False
    heap_mb: int = 128
    tick_ms: int = 500
    # a member whose client_port is a TLS port (a server started from the zookeeper role's files):
    # the CA certificate its four-letter words are checked against
    client_tls_ca: str | None = None
    process: subprocess.Popen | None = None

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir)

    @property
    def pidfile(self) -> Path:
        return self.workdir / "zookeeper.pid"

    @property
    def hosts(self) -> str:
        return f"{self.client_address}:{self.client_port}"

    def write_config(self) -> Path:
        data = self.workdir / "data"
        data.mkdir(parents=True, exist_ok=True)
        lines = [
            f"tickTime={self.tick_ms}",
            "initLimit=20",
            "syncLimit=10",
            f"dataDir={data}",
            f"clientPort={self.client_port}",
            f"clientPortAddress={self.client_address}",
            "admin.enableServer=false",
            "4lw.commands.whitelist=*",
            "maxClientCnxns=0",
            # short sessions are allowed so that tests can watch a session expire quickly
            "minSessionTimeout=1000",
        ]
        if self.secure_client_port and self.tls:
            lines += [
                f"secureClientPort={self.secure_client_port}",
                f"secureClientPortAddress={self.client_address}",
                "serverCnxnFactory=org.apache.zookeeper.server.NettyServerCnxnFactory",
                f"ssl.keyStore.location={self.tls.keystore}",
                f"ssl.keyStore.password={self.tls.password}",
                f"ssl.trustStore.location={self.tls.truststore}",
                f"ssl.trustStore.password={self.tls.password}",
                f"ssl.clientAuth={self.tls_client_auth}",
            ]
        if self.enforce_auth:
            lines += ["enforce.auth.enabled=true", "enforce.auth.schemes=digest"]
        for peer in self.peers:
            lines.append(f"server.{peer.server_id}={peer.address}:{peer.quorum_port}:{peer.election_port}")
        if self.peers:
            (data / "myid").write_text(f"{self.server_id}\n")
        cfg = self.workdir / "zoo.cfg"
        cfg.write_text("\n".join(lines) + "\n")
        (self.workdir / "log4j.properties").write_text(LOG4J.format(log=self.workdir / "zookeeper.log"))
        return cfg

    def command(self) -> list[str]:
        cmd = [
            "java",
            f"-Xmx{self.heap_mb}m",
            *role_java_opts(),
            f"-Dzookeeper.log.dir={self.workdir}",
            f"-Dlog4j.configuration=file:{self.workdir / 'log4j.properties'}",
            "-cp",
            classpath(),
            "org.apache.zookeeper.server.quorum.QuorumPeerMain",
            str(self.workdir / "zoo.cfg"),
        ]
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns] + cmd
        return cmd

    def start(self, wait: bool = True, timeout_s: float = 60.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.write_config()
        out = open(self.workdir / "stdout.log", "ab")
        self.process = subprocess.Popen(self.command(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        out.close()
        self.pidfile.write_text(f"{self.process.pid}\n")
        if wait:
            self.wait_ready(timeout_s)

    def four_letter(self, word: str, timeout_s: float = 1.0) -> str | None:
        """Send a four-letter word (srvr, mntr, ...) and return the reply, or None if unreachable.

        A member inside a network namespace is reached from a socket created in that namespace
        (see connect()), so this works from the root namespace too.
        """
        try:
            raw = connect(self.client_address, self.client_port, timeout_s, self.netns)
            if self.client_tls_ca:  # wrap_socket takes over the socket (and closes it with its own)
                raw = ssl.create_default_context(cafile=self.client_tls_ca).wrap_socket(
                    raw, server_hostname=self.client_address
                )
            with raw as s:
                s.sendall(word.encode())
                chunks = []
                while True:
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    chunks.append(chunk)
        except OSError:
            return None
        return b"".join(chunks).decode(errors="replace")

    def packets_received(self, timeout_s: float = 1.0) -> int | None:
        """How many requests the server has received from all its clients since it started
        (``mntr``'s ``zk_packets_received``: every read, write, transaction, watch registration
        and session ping), or None if it cannot be asked."""
        for line in (self.four_letter("mntr", timeout_s) or "").splitlines():
            name, _, value = line.partition("\t")
            if name == "zk_packets_received" and value.strip().isdigit():
                return int(value)
        return None

    def mode(self, timeout_s: float = 1.0) -> str | None:
        """'standalone', 'leader' or 'follower' while serving; None otherwise."""
        reply = self.four_letter("srvr", timeout_s) or ""
        for line in reply.splitlines():
            if line.startswith("Mode:"):
                return line.split(":", 1)[1].strip()
        return None

    def ruok(self, timeout_s: float = 1.0) -> bool:
        """Ask the server's four-letter-word port whether it serves (standalone or in a quorum)."""
        return self.mode(timeout_s) is not None

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        # The JVM gives no readiness signal we can wait on; poll its status port every 100 ms.
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(
                    f"ZooKeeper on {self.hosts} exited with {self.process.returncode}; "
                    f"see {self.workdir / 'zookeeper.log'}"
                )
            if self.ruok() and self._secure_port_open():
                return
            time.sleep(0.1)
        raise TimeoutError(f"ZooKeeper on {self.hosts} not serving after {timeout_s} s")

    def _secure_port_open(self) -> bool:
        """Whether the TLS client port (if any) accepts connections: it opens after the plain one."""
        if not (self.secure_client_port and self.tls):
            return True
        try:
            connect(self.client_address, self.secure_client_port, 1.0, self.netns).close()
        except OSError:
            return False
        return True

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 15.0) -> None:
        """End the server we started, by PID (never by name)."""
        pid = self.process.pid if self.process else _read_pid(self.pidfile)
        if pid is None:
            return
        _end_pid(pid, sig, timeout_s)
        if self.process is not None:
            self.process.wait(timeout=timeout_s)
        self.process = None
        self.pidfile.unlink(missing_ok=True)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def restart(self, timeout_s: float = 60.0) -> None:
        self.stop()
        self.start(timeout_s=timeout_s)


def _read_pid(pidfile: Path) -> int | None:
    try:
        return int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None


def _end_pid(pid: int, sig: int, timeout_s: float) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        try:
            # reap it if it is our child
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done == pid:
                return
        except ChildProcessError:
            pass
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


_CLONE_NEWNET = 0x40000000
_libc = None


def _setns_net(netns: str) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{netns}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({netns}): {os.strerror(err)}")
    finally:
        os.close(fd)


def connect(address: str, port: int, timeout_s: float = 1.0, netns: str | None = None) -> socket.socket:
    """A TCP connection to address:port, made from inside network namespace `netns` if given.

    setns(CLONE_NEWNET) changes only the calling thread's namespace, so the socket is created in a
    throw-away thread that joined the namespace; the socket keeps that namespace for its lifetime and
    can be used from any thread. Needs root (CAP_SYS_ADMIN), like `ip netns exec`.
    """
    if not netns:
        return socket.create_connection((address, port), timeout=timeout_s)
    return in_netns(netns, lambda: socket.create_connection((address, port), timeout=timeout_s))


def in_netns(netns: str, fn):
    """Call fn() in a thread that joined network namespace ``netns`` and return what it returned
    (or raise what it raised); threads fn starts stay there, and sockets it makes keep the
    namespace for their lifetime, whichever thread uses them."""
    result: dict = {}

    def run() -> None:
        try:
            _setns_net(netns)
            result["value"] = fn()
        except BaseException as exc:  # handed to the caller below
            result["error"] = exc

    thread = threading.Thread(target=run, name=f"netns-{netns}", daemon=True)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result.get("value")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
