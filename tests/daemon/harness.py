"""Run node daemons as real processes against a real ZooKeeper, with libvirt's test driver.

Each daemon is its own process with its own test-driver "host" (a node XML file), so its VMs live
and die with the process, like a host's VMs with the host. Waits use ZooKeeper watches.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid as uuidlib
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pvc_cluster_common import _schema as S
from pvc_cluster_common._cluster import (
    read_node_state,
    vm_definition,
    wait_for_key,
    wait_for_node_state,
    wait_until_gone,
)
from pvc_cluster_common._store import ClusterStore, ConnectionOptions
from pvc_node_daemon.config import min_dead_after
from tests.support.identities import node_auth, operator_options
from tests.support.runstate import runstate_reached

REPO = Path(__file__).resolve().parents[2]

NODE_XML = """<node>
  <cpu><nodes>1</nodes><sockets>1</sockets><cores>4</cores><threads>2</threads>
  <active>8</active><mhz>2000</mhz><model>x86_64</model></cpu>
  <memory>{kib}</memory>
</node>
"""


def domain_xml(
    name: str, memory: str = "512", unit: str | None = "MiB", vcpus: int = 1, uuid: str | None = None
) -> tuple[str, str]:
    uuid = uuid or str(uuidlib.uuid4())
    unit_attr = f" unit='{unit}'" if unit else ""
    xml = (
        f"<domain type='test'><name>{name}</name><uuid>{uuid}</uuid><memory{unit_attr}>{memory}</memory>"
        f"<vcpu>{vcpus}</vcpu><os><type>hvm</type></os><devices/></domain>"
    )
    return uuid, xml


@dataclass
class DaemonProcess:
    node: str
    workdir: Path
    config: dict
    process: subprocess.Popen | None = None
    env: dict = field(default_factory=dict)

    @property
    def config_path(self) -> Path:
        return self.workdir / f"{self.node}.yaml"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.node}.log"

    def start(self, **env) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(self.config))
        environment = dict(os.environ)
        environment.update(env)
        out = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "pvc_node_daemon", "--config", str(self.config_path)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=environment,
            cwd=REPO,
        )
        out.close()

    def stop(self, timeout_s: float = 60) -> int | None:
        """SIGTERM and wait: the orderly shutdown."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else None
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)

    def wait_exit(self, timeout_s: float = 60) -> int:
        return self.process.wait(timeout=timeout_s)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


# The daemons' ZooKeeper session timeout, and the fewest keepalives missed before a peer is dead:
# the detection window must exceed a ZooKeeper client's failover (2/3 of the session timeout) plus
# one keepalive (pvc_node_daemon.config.check_detection_window), so it follows the keepalive.
ZK_TIMEOUT_S = 10
DEAD_AFTER = 4


def intervals(keepalive_s: float) -> dict:
    """The daemons' ``intervals`` at this keepalive: at least DEAD_AFTER keepalives, and as many
    more as the rule needs."""
    return {
        "keepalive_s": keepalive_s,
        "dead_after": max(DEAD_AFTER, min_dead_after(keepalive_s, ZK_TIMEOUT_S)),
        "shutdown_timeout_s": 5,
    }


class TestCluster:
    """N daemons on one ZooKeeper (below a private root) plus a store for the test's own reads."""

    __test__ = False  # not a pytest class

    def __init__(
        self,
        zk_hosts: str,
        root: str,
        workdir: Path,
        keepalive_s: float = 0.5,
        insecure: bool = False,
        zk_tls: dict | None = None,
        **overrides,
    ) -> None:
        self.zk_hosts = zk_hosts
        self.root = root
        self.workdir = Path(workdir)
        self.keepalive_s = keepalive_s
        self.insecure = insecure
        self.overrides = overrides
        self.daemons: dict[str, DaemonProcess] = {}
        # secure by default: the test's store is the operator, each daemon the nodes and itself
        # zk_tls: {"ca": ..., "cert": ..., "key": ...} to reach ZooKeeper's secure client port
        # (cert and key only for a server that asks clients for a certificate)
        self.zk_tls = zk_tls
        tls = (
            {}
            if not zk_tls
            else {"tls": True, "tls_ca": zk_tls["ca"], "tls_cert": zk_tls.get("cert"), "tls_key": zk_tls.get("key")}
        )
        options = (
            ConnectionOptions(hosts=zk_hosts, root=root, timeout_s=10, **tls)
            if insecure
            else operator_options(zk_hosts, root, timeout_s=10, **tls)
        )
        self.store = ClusterStore(options).start()
        self.store.ensure_schema()
        self.schema = self.store.schema

    def config_for(self, node: str, memory_mib: int = 8192, **overrides) -> dict:
        host = self.workdir / f"{node}-host.xml"
        self.workdir.mkdir(parents=True, exist_ok=True)
        host.write_text(NODE_XML.format(kib=memory_mib * 1024))
        config = {
            "node": node,
            "zookeeper": {
                "hosts": self.zk_hosts,
                "root": self.root,
                "timeout_s": ZK_TIMEOUT_S,
                **({} if self.insecure else {"auth": node_auth(node)}),
                **({"tls": {"enabled": True, **self.zk_tls}} if self.zk_tls else {}),
            },
            "libvirt": {"uri": f"test://{host}", "call_timeout_s": 10},
            "migration": {"step_timeout_s": 10, "live_timeout_base_s": 10, "flush_parallel": 2},
            "intervals": intervals(self.keepalive_s),
            "memory": {"reserve_mib": 0},
            "log": {"stdout": True, "debug": True},
            **({"insecure": True} if self.insecure else {}),
        }
        for section, values in {**self.overrides, **overrides}.items():
            if isinstance(values, dict):
                config.setdefault(section, {}).update(values)
            else:
                config[section] = values
        return config

    def add(self, node: str, start: bool = True, env: dict | None = None, **overrides) -> DaemonProcess:
        daemon = DaemonProcess(node, self.workdir, self.config_for(node, **overrides))
        self.daemons[node] = daemon
        if start:
            daemon.start(**(env or {}))
        return daemon

    # ---- waits (ZooKeeper watches) -------------------------------------------------------------

    def wait(self, path: str, predicate, timeout_s: float = 60, what: str = "") -> None:
        if not wait_for_key(self.store, path, predicate, timeout_s):
            value = self.store.find_text(path)
            logs = "\n".join(f"--- {n} ---\n{d.log()[-6000:]}" for n, d in self.daemons.items())
            raise AssertionError(f"timed out waiting for {what or path} (value now {value!r})\n{logs}")

    def wait_vm_state(self, uuid: str, state: str, timeout_s: float = 60) -> None:
        """Wait until a daemon has moved the VM to ``state`` (its runstate record) for the
        desired state written last."""
        path, predicate = runstate_reached(self.store, uuid, state)
        self.wait(path, predicate, timeout_s, f"VM {uuid} state {state}")

    def wait_node_state(self, node: str, daemon_state: str = "run", timeout_s: float = 60) -> None:
        """Wait for ``node``'s daemon state as everyone reads it (its own, or a peer's verdict)."""
        self._wait_state(
            node, lambda state: state.daemon_state == daemon_state, timeout_s, f"daemon state {daemon_state}"
        )

    def wait_domain_state(self, node: str, state: str, timeout_s: float = 60) -> None:
        self._wait_state(node, lambda found: found.domain_state == state, timeout_s, f"domain state {state}")

    def node_state(self, node: str):
        """``node``'s state as everyone reads it (_cluster.read_node_state)."""
        return read_node_state(self.store, node)

    def _wait_state(self, node: str, predicate, timeout_s: float, what: str) -> None:
        if (
            wait_for_node_state(self.store, node, lambda state: state is not None and predicate(state), timeout_s)
            is None
        ):
            logs = "\n".join(f"--- {n} ---\n{d.log()[-6000:]}" for n, d in self.daemons.items())
            raise AssertionError(f"timed out waiting for {node} {what} (now {self.node_state(node)!r})\n{logs}")

    def wait_running_on(self, node: str, uuid: str, running: bool = True, timeout_s: float = 60) -> None:
        import json

        def check(value):
            return (uuid in json.loads(value or "[]")) == running

        self.wait(
            self.schema.node_key(node, S.NODE_RUNNINGDOMAINS),
            check,
            timeout_s,
            f"{uuid} {'running' if running else 'not running'} on {node}",
        )

    def wait_no_migration(self, uuid: str, timeout_s: float = 60) -> None:
        # On the parent's children, as the flusher waits: a data watch would also wake (and read
        # the record) at every step, competing for the CPU with the daemons being measured.
        path = self.schema.domain_migration(uuid)
        if not wait_until_gone(self.store, path, timeout_s):
            self.wait(path, lambda v: v is None, 0, f"migration of {uuid} to end")

    def wait_no_reservations(self, node: str, timeout_s: float = 60) -> None:
        """Wait (a children watch) until ``node`` holds no reservation: its keepalive has counted
        every VM whose migration ended here in memprov, deleting the reservation with it."""
        import threading

        path = self.schema.node_reservations(node)
        empty = threading.Event()

        def watcher(children):
            if not children:
                empty.set()
                return False
            return True

        self.store.client.ensure_path(path)
        self.store.client.ChildrenWatch(path, watcher)
        if not empty.wait(timeout_s):
            raise AssertionError(
                f"reservations of {node} still there after {timeout_s} s: {self.store.list_children(path, missing_ok=True)}"
            )

    # ---- cluster writes a test needs ---------------------------------------------------------------

    def define_vm(
        self, xml: str, uuid: str, name: str, node: str, state: str = "start", meta: dict | None = None
    ) -> None:
        self.store.commit(vm_definition(self.schema, uuid, name, xml, node, state, meta))

    def set_domain_state(self, node: str, state: str) -> None:
        self.store.commit({self.schema.node_key(node, S.NODE_DOMAIN_STATE): state})

    def close(self) -> None:
        for daemon in self.daemons.values():
            try:
                daemon.stop(timeout_s=30)
            except Exception:
                daemon.kill()
        self.store.stop()
