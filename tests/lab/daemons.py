"""One pvc-node-daemon per lab host, and the test side of a cluster running in the lab.

* ``LabDaemon``: ``ip netns exec lab-nK setpriv --pdeathsig KILL <venv python> -m pvc_node_daemon
  --config FILE`` for one host (in a mount namespace of its own where ``/etc/pki`` is the
  host's certificates, lab.py), with ``libvirt.uri`` = the host's libvirtd (its unix socket),
  ``zookeeper.hosts`` = the lab's ensemble and ``migration.address`` = the host's lab address, so
  that it publishes ``qemu+tls://10.77.0.K/system`` and ``tcp://10.77.0.K`` and migrates with
  ``VIR_MIGRATE_TLS`` (the defaults). ``ip``, ``unshare``, ``sh`` and
  ``setpriv`` exec(), so the PID we hold *is* the daemon's: ``stop()`` sends it SIGTERM, ``kill()``
  SIGKILL, by that PID only; and the daemon dies with pytest should pytest itself be killed.
  Config and log live in the lab workdir (``WORKDIR/daemons/<cluster>/nodeK.{yaml,log}``).
* ``LabCluster``: three such daemons on a private cluster root, plus a ``ClusterStore`` for the
  test's own reads, writes and watches.
* ``RunningMonitor``: samples libvirt on every host all through a test and records any moment a VM
  ran on two hosts at once (I1).

How the tests reach ZooKeeper
=============================
The ensemble listens only on 10.77.0.K, which exists only inside the lab's namespaces. The test
process stays in the machine's namespace (libvirt is reached through unix sockets in the workdir,
which work from any namespace), and only its ZooKeeper client joins the controller namespace:
``setns(CLONE_NEWNET)`` changes the namespace of the *calling thread* only, and threads inherit it
from the thread that creates them. ``ctl_store()`` therefore starts the kazoo client from a
throw-away thread that first joined ``lab-ctl``: kazoo's connection thread (which opens every
socket, including reconnections to other ensemble members) and its callback workers are created
inside that thread, so they live in ``lab-ctl`` for the client's lifetime, while pytest, fixtures
and libvirt calls stay where they were. Compared to the alternatives:

* running pytest itself under ``nsenter --net=/run/netns/lab-ctl`` needs the lab up *before* pytest
  starts (the session fixture creates it), and puts the non-lab tests' loopback ZooKeeper out of
  reach in the same session;
* a snippet subprocess per read (``lab.ctl_python``) cannot hold a watch, so waits would have to
  poll;
* a forwarder process in lab-ctl would be one more process to own, and kazoo speaks only TCP;
* ZooKeeper 3.8 binds ``clientPortAddress`` once, so the members cannot also listen on loopback.

The store must be stopped before the lab goes down (``LabCluster.close()`` does it): a later
``lab.up()`` creates a new lab-ctl, which a client of the old one could not reach.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid as uuidlib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from pvc_cluster_common import _schema as S
from pvc_cluster_common._cluster import (
    read_history,
    read_node_state,
    read_vm,
    vm_definition,
    wait_for_key,
    wait_for_node_state,
)
from pvc_cluster_common._requests import request_vm
from pvc_cluster_common._records import MigrationRecord
from pvc_cluster_common._store import ClusterStore, ConnectionOptions
from tests.support.identities import node_auth, operator_options
from tests.support.runstate import runstate_reached
from tests.support.zookeeper import in_netns

from .guests import GuestPort, LabGuests, domain_xml, lab_domain_policy
from .lab import REPO_ROOT, Lab, LabHost

# Crash-safety fault injection understood by the daemon (node_daemon/migration.py).
CRASH_ENV = "PVC_NODE_DAEMON_CRASH_AT"
PAUSE_ENV = "PVC_NODE_DAEMON_PAUSE_AT"
PAUSE_RELEASE_ENV = "PVC_NODE_DAEMON_PAUSE_RELEASE"

# Lab daemon defaults: short enough that a test of a timeout takes seconds, long enough that a
# busy 2-core CI machine running QEMU under TCG never hits them by accident.
# The detection window (1 s x 6 = 6 s) exceeds a ZooKeeper client's failover after a silent
# partition (2/3 of the lab's 6 s session timeout, 4 s) plus one keepalive, as the daemon requires
# (config.check_detection_window; docs/high-availability.md, "Detection"): a shorter session than
# production's 10 s keeps the window, and bench e's time to recovery, short.
LAB_ZK_TIMEOUT_S = 6
DEFAULT_CONFIG = {
    "migration": {"step_timeout_s": 10, "live_timeout_base_s": 60, "live_timeout_per_gib_s": 30, "flush_parallel": 2},
    "intervals": {"keepalive_s": 1, "dead_after": 6, "shutdown_timeout_s": 2},
    "memory": {"reserve_mib": 0},
    "libvirt": {"call_timeout_s": 20},
    "log": {"stdout": True, "debug": True, "colours": False},
}


def _quiet_libvirt() -> None:
    """libvirt prints every error (e.g. "domain not found" while we look for a VM) to stderr."""
    import libvirt

    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)


def ctl_store(lab: Lab, root: str, timeout_s: float = 10.0, secure: bool = True) -> ClusterStore:
    """A started ClusterStore of the operator on the lab's ensemble whose sockets live in the
    controller namespace. ``secure``: the cluster's daemons are secured (LabCluster's); False for
    a cluster whose daemons run insecure (the rolled-out lab's), whose keys must stay open."""
    options = (
        operator_options(lab.zk_hosts, root, timeout_s=timeout_s)
        if secure
        else ConnectionOptions(hosts=lab.zk_hosts, root=root, timeout_s=timeout_s)
    )
    store = ClusterStore(options)
    return in_netns(lab.ctl_netns, store.start)


def _merge(base: dict, overrides: dict) -> dict:
    result = json.loads(json.dumps(base))
    for section, values in overrides.items():
        if isinstance(values, dict):
            result.setdefault(section, {}).update(values)
        else:
            result[section] = values
    return result


# --------------------------------------------------------------------------------------------
# one daemon


@dataclass
class LabDaemon:
    host: LabHost
    workdir: Path
    config: dict
    process: subprocess.Popen | None = None
    starts: int = 0

    @property
    def node(self) -> str:
        return self.host.name

    @property
    def config_path(self) -> Path:
        return self.workdir / f"{self.node}.yaml"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.node}.log"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, **env: str) -> None:
        """Start the daemon in the host's namespace; ``env`` adds variables (fault injection)."""
        if self.running():
            raise RuntimeError(f"daemon on {self.node} is already running (pid {self.pid})")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(self.config))
        environment = {k: v for k, v in os.environ.items() if k not in (CRASH_ENV, PAUSE_ENV, PAUSE_RELEASE_ENV)}
        environment.update(env)
        self.starts += 1
        with open(self.log_path, "ab") as out:
            out.write(f"\n===== start {self.starts} {time.strftime('%H:%M:%S')} env {env or {}} =====\n".encode())
            out.flush()
            # ip, unshare, sh and setpriv exec(), so the PID is the daemon's. setpriv --pdeathsig:
            # if pytest itself is killed (a CI timeout), the daemon dies with it instead of
            # lingering in a lab namespace, where it would make the next `lab up` refuse to clean
            # up. A mount namespace of its own shows it the host's /etc/pki, as on a node: its
            # libvirt client presents the host's certificate when it asks a peer's libvirtd
            # (qemu+tls://, the default template) where a VM runs.
            self.process = subprocess.Popen(
                [
                    "ip",
                    "netns",
                    "exec",
                    self.host.netns,
                    "unshare",
                    "--mount",
                    "--propagation",
                    "private",
                    "sh",
                    "-c",
                    'mount --bind "$0" /etc/pki && exec setpriv --pdeathsig KILL "$@"',
                    str(self.host.pki_dir),
                    sys.executable,
                    "-m",
                    "pvc_node_daemon",
                    "--config",
                    str(self.config_path),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=environment,
                cwd=REPO_ROOT,
            )

    def stop(self, timeout_s: float = 60) -> int | None:
        """SIGTERM (the orderly shutdown) and wait; SIGKILL if it does not end in time."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL, by our child's PID (a crash)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
        if self.process is not None:
            self.process.wait(timeout=30)

    def wait_exit(self, timeout_s: float = 120) -> int:
        """Wait for the daemon to end by itself (a crash point SIGKILLs it)."""
        return self.process.wait(timeout=timeout_s)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_log(self, text: str, timeout_s: float = 90, after: int = 0) -> int:
        """Wait until the log has ``text`` past offset ``after`` (for events that leave no trace
        in ZooKeeper, e.g. a step timeout that only re-arms). Returns the offset after it."""
        deadline = time.monotonic() + timeout_s
        while True:
            found = self.log().find(text, after)
            if found >= 0:
                return found + len(text)
            if time.monotonic() >= deadline:
                raise AssertionError(f"{self.node}: no {text!r} in the log within {timeout_s} s\n{self.log()[-6000:]}")
            time.sleep(0.1)


# --------------------------------------------------------------------------------------------
# a cluster in the lab


class LabCluster:
    """One daemon per lab host on a private cluster root, and the test's own store on it."""

    __test__ = False

    def __init__(self, lab: Lab, name: str, guests: LabGuests | None = None, **overrides) -> None:
        self.lab = lab
        self.name = name
        # real guests (define_vm's default) need it; a cluster of no-OS guests does not
        self.guests = guests
        short = "".join(c if c.isalnum() or c in "-_.=" else "_" for c in name.removeprefix("test_"))
        if len(short) > 64:
            short = short[:24] + "~" + short[-39:]
        self.root = f"/lab-{short}-{uuidlib.uuid4().hex[:6]}"
        self.workdir = lab.workdir / "daemons" / self.root.strip("/")
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = _merge(DEFAULT_CONFIG, overrides)
        self.daemons: dict[str, LabDaemon] = {}
        for h in lab.hosts:
            c = _merge(config, {})
            c["node"] = h.name
            # secured (docs/security.md): each daemon is the nodes and itself, the test's store the operator
            c["zookeeper"] = {
                "hosts": lab.zk_hosts,
                "root": self.root,
                "timeout_s": LAB_ZK_TIMEOUT_S,
                "auth": node_auth(h.name),
            }
            c.setdefault("libvirt", {})["uri"] = h.libvirt_uri
            c.setdefault("migration", {})["address"] = h.address
            # The domain XML policy as a lab configures it (docs/security.md): the lab's own
            # storage (disk images, kernels, serial logs of its guests) is under its workdir, and
            # its shared disks are NBD exports (guests.lab_domain_policy).
            for key, value in lab_domain_policy(lab).items():
                c.setdefault("domain_policy", {}).setdefault(key, value)
            self.daemons[h.name] = LabDaemon(h, self.workdir, c)
        _quiet_libvirt()
        self.store = ctl_store(lab, self.root)
        self.store.ensure_schema()
        self.schema = self.store.schema
        self.requests: dict[str, list[str]] = {}  # uuid -> migration ids requested by the test
        self.names: dict[str, str] = {}  # uuid -> name

    @property
    def nodes(self) -> list[str]:
        return list(self.daemons)

    def host(self, node: str) -> LabHost:
        return self.daemons[node].host

    # ---- daemons ------------------------------------------------------------------------------

    def start(self, *nodes: str, ready: bool = True, env: dict[str, dict] | None = None) -> None:
        """Start the daemons (all by default; ``env``: node -> extra environment, for fault
        injection), wait until they run, and make them ready."""
        nodes = nodes or tuple(self.nodes)
        for node in nodes:
            self.daemons[node].start(**(env or {}).get(node, {}))
        for node in nodes:
            self.wait_daemon_state(node, "run")
        if ready:
            for node in nodes:
                # new nodes start flushed; an operator makes them ready
                self.store.commit({self.schema.node_key(node, S.NODE_DOMAIN_STATE): "unflush"})
            for node in nodes:
                self.wait_domain_state(node, "ready")

    def restart(self, node: str, wait: bool = True, **env: str) -> None:
        daemon = self.daemons[node]
        if daemon.running():
            daemon.kill()
        daemon.start(**env)
        if wait:
            self.wait_daemon_state(node, "run")

    def close(self) -> None:
        """Stop every daemon (orderly, then by force), the store, and remove the cluster root."""
        errors = []
        for daemon in self.daemons.values():
            try:
                daemon.stop(timeout_s=30)
            except Exception as exc:  # keep going: every daemon must be ended
                errors.append(exc)
                daemon.kill()
        try:
            self.store.delete([self.root])
        finally:
            self.store.stop()
        if errors:
            raise errors[0]

    def logs(self, tail: int = 8000) -> str:
        return "\n".join(f"----- {n} (pid {d.pid}) -----\n{d.log()[-tail:]}" for n, d in self.daemons.items())

    # ---- waits on ZooKeeper watches ----------------------------------------------------------

    def wait(self, path: str, predicate, timeout_s: float = 90, what: str = "") -> str | None:
        if not wait_for_key(self.store, path, predicate, timeout_s):
            raise AssertionError(
                f"timed out after {timeout_s} s waiting for {what or path} "
                f"(value now {self.store.find_text(path)!r})\n{self.logs()}"
            )
        return self.store.find_text(path)

    def wait_daemon_state(self, node: str, state: str = "run", timeout_s: float = 60) -> None:
        """Wait for ``node``'s daemon state as everyone reads it (its own, or a peer's verdict)."""
        self._wait_state(node, lambda found: found.daemon_state == state, timeout_s, f"daemon state {state}")

    def wait_domain_state(self, node: str, state: str, timeout_s: float = 120) -> None:
        self._wait_state(node, lambda found: found.domain_state == state, timeout_s, f"domain state {state}")

    def node_state(self, node: str):
        """``node``'s state as everyone reads it (_cluster.read_node_state)."""
        return read_node_state(self.store, node)

    def _wait_state(self, node: str, predicate, timeout_s: float, what: str) -> None:
        if (
            wait_for_node_state(self.store, node, lambda found: found is not None and predicate(found), timeout_s)
            is None
        ):
            raise AssertionError(
                f"timed out after {timeout_s} s waiting for {node} {what} (now {self.node_state(node)!r})\n{self.logs()}"
            )

    def wait_step(self, uuid: str, step: str, timeout_s: float = 90) -> dict:
        def at(value):
            if not value:
                return False
            try:
                return json.loads(value).get("step") == step
            except ValueError:
                return False

        return json.loads(
            self.wait(self.schema.domain_migration(uuid), at, timeout_s, f"migration of {uuid} at {step}")
        )

    def wait_no_migration(self, uuid: str, timeout_s: float = 120) -> None:
        self.wait(self.schema.domain_migration(uuid), lambda v: v is None, timeout_s, f"the migration of {uuid} to end")

    def wait_vm_state(self, uuid: str, state: str, timeout_s: float = 90) -> None:
        """Wait until a daemon has moved the VM to ``state`` (its runstate record) for the
        desired state written last."""
        path, predicate = runstate_reached(self.store, uuid, state)
        self.wait(path, predicate, timeout_s, f"{self.names.get(uuid, uuid)} state {state}")

    def wait_key(self, uuid: str, key: str, value: str, timeout_s: float = 90) -> None:
        self.wait(self.schema.domain_key(uuid, key), lambda v: v == value, timeout_s, f"{uuid} {key} = {value}")

    def wait_running_on(self, node: str, uuid: str, timeout_s: float = 90) -> None:
        """The VM runs on ``node`` according to libvirt, and nowhere else."""
        self.wait_libvirt(
            uuid,
            lambda states: self.running_nodes(states) == [node],
            timeout_s,
            f"{self.names.get(uuid, uuid)} running on {node} only",
        )

    # ---- libvirt, read directly on every host -------------------------------------------------

    def libvirt_states(self, uuid: str) -> dict[str, str | None]:
        """node -> libvirt state name of the VM there (None: libvirt does not know it)."""
        import libvirt

        from pvc_node_daemon.hypervisor import STATE_NAMES

        states = {}
        for node, daemon in self.daemons.items():
            if daemon.host.powered_off:
                states[node] = None  # every process of a powered-off host is gone (Lab.power_off)
                continue
            conn = daemon.host.connect()
            try:
                try:
                    dom = conn.lookupByUUIDString(uuid)
                    states[node] = STATE_NAMES.get(dom.state()[0], "nostate")
                except libvirt.libvirtError as exc:
                    if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                        raise
                    states[node] = None
            finally:
                conn.close()
        return states

    @staticmethod
    def running_nodes(states: dict[str, str | None]) -> list[str]:
        return sorted(node for node, state in states.items() if state == "running")

    def domain_id(self, node: str, uuid: str) -> int:
        """libvirt's domain ID on ``node``: it changes whenever the VM is (re)started."""
        conn = self.host(node).connect()
        try:
            return conn.lookupByUUIDString(uuid).ID()
        finally:
            conn.close()

    def wait_libvirt(self, uuid: str, predicate, timeout_s: float = 90, what: str = "") -> dict:
        """Re-read libvirt on every host until predicate(states) holds (libvirt has no cross-host
        watch; each round is three local socket calls)."""
        deadline = time.monotonic() + timeout_s
        while True:
            states = self.libvirt_states(uuid)
            if predicate(states):
                return states
            if time.monotonic() >= deadline:
                vm = read_vm(self.store, uuid)
                raise AssertionError(
                    f"timed out after {timeout_s} s waiting for {what}: libvirt {states}, "
                    f"ZooKeeper node {vm.node if vm else None}, migration "
                    f"{vm.migration if vm else None}\n{self.logs()}"
                )
            time.sleep(0.1)

    # ---- cluster writes a test makes -----------------------------------------------------------

    def define_vm(
        self,
        name: str,
        node: str,
        state: str = "start",
        meta: dict | None = None,
        memory_mib: int | None = None,
        disk: str | None = None,
        disk_cache: str = "writeback",
        bridge: str | None = "default",
        guest: str = "linux",
        **settings,
    ) -> str:
        """Write a VM into ZooKeeper (the daemons do the rest). Returns its UUID.

        guest: ``linux``, a real guest (128 MiB by default) with a disk on the lab's shared storage
        (``settings``: LinuxGuest's, e.g. dirty_mib_s); ``none``, a guest with no OS (64 MiB by
        default), which ignores the ACPI power button. disk: instead of the shared disk, this
        file, with ``disk_cache``: a disk that libvirt does not consider shared."""
        uuid = str(uuidlib.uuid4())
        bridge = self.lab.vm_bridge if bridge == "default" else bridge
        if guest == "linux":
            if self.guests is None:
                raise ValueError("a real guest needs the cluster's LabGuests (LabCluster(..., guests=...))")
            xml = self.guests.xml(
                name, uuid=uuid, memory_mib=memory_mib or 128, bridge=bridge, disk=disk is None, **settings
            )
        elif guest == "none":
            xml = domain_xml(
                name,
                uuid=uuid,
                memory_mib=memory_mib or 64,
                bridge=bridge,
                serial_path=self.guests.console(name) if self.guests else None,
            )
        else:
            raise ValueError(f"guest {guest!r}: accepted are linux and none")
        if disk:
            xml = xml.replace(
                "<memballoon",
                (
                    "<disk type='file' device='disk'>\n"
                    f"      <driver name='qemu' type='raw' cache='{disk_cache}'/>\n"
                    f"      <source file='{disk}'/>\n"
                    "      <target dev='vda' bus='virtio'/>\n"
                    "    </disk>\n    <memballoon"
                ),
                1,
            )
        self.store.commit(vm_definition(self.schema, uuid, name, xml, node, state, meta))
        self.names[uuid] = name
        return uuid

    def wait_guest_up(
        self, uuid: str, node: str | None = None, since: float | None = None, timeout_s: float = 120
    ) -> None:
        """Wait until the real guest ticks (from ``node``, after ``since``): it has booted and its
        ACPI power button works. Woken by its ticks (no polling)."""
        if self.guests is None or self.guests.collector is None:
            raise ValueError("the cluster's guests do not tick (no TickCollector)")
        self.guests.collector.wait_ticking(self.names.get(uuid, uuid), host=node, since=since, timeout_s=timeout_s)

    def record_guest_downtime(self, uuid: str, migration_id: str):
        """Measure the downtime the real guest saw at the switch-over of live migration
        ``migration_id`` (done) and add it to its audit record, as the lab's measurement hook
        does (ticks.record_switchover). Returns the Switchover, or None when none was seen."""
        from .ticks import record_switchover

        entry = next((e for e in self.history(uuid) if e["id"] == migration_id), None)
        if entry is None or self.guests is None or self.guests.collector is None:
            return None
        return record_switchover(self.store, self.guests.collector, uuid, self.names.get(uuid, uuid), entry)

    def guest_port(self, uuid: str) -> GuestPort:
        """The command port of the real guest, on the host that runs it now."""
        running = self.running_nodes(self.libvirt_states(uuid))
        if len(running) != 1:
            raise AssertionError(f"{self.names.get(uuid, uuid)} runs on {running}, not on one host")
        return GuestPort(self.host(running[0]), uuid)

    def set_state(self, uuid: str, state: str) -> None:
        self.store.commit({self.schema.domain_key(uuid, S.DOMAIN_STATE): state})

    def set_domain_state(self, node: str, state: str) -> None:
        self.store.commit({self.schema.node_key(node, S.NODE_DOMAIN_STATE): state})

    def request(
        self, uuid: str, kind: str = "migrate", target: str | None = None, force_live: bool = False
    ) -> MigrationRecord | None:
        """Plan and submit a request exactly as the Ansible modules do."""
        record = request_vm(self.store, uuid, kind, "lab test", target=target, force_live=force_live)
        if record is not None:
            self.requests.setdefault(uuid, []).append(record.id)
        return record

    def history(self, uuid: str) -> list[dict]:
        return read_history(self.store, uuid, last=S.HISTORY_KEEP)

    # ---- the invariants -------------------------------------------------------------------------

    def lock_holders(self) -> dict[str, list[str]]:
        """Lock znodes with contenders below /locks (a released kazoo lock has none)."""
        held = {}
        for kind in ("domains", "nodes"):
            base = f"{self.schema.root}/locks/{kind}"
            for name in self.store.list_children(base, missing_ok=True):
                contenders = self.store.list_children(f"{base}/{name}", missing_ok=True)
                if contenders:
                    held[f"{base}/{name}"] = contenders
        return held

    def settle(self, uuid: str, timeout_s: float = 120) -> dict:
        """Wait until the migration record is gone and libvirt agrees with ZooKeeper (I2 for a VM
        whose state is start): the VM runs on its node, and no other host holds it any more (a
        live migration ends when the target resumes the VM, while the source's libvirtd may still
        be ending its side of the job, its copy paused). Returns the VM's libvirt states."""
        self.wait_no_migration(uuid, timeout_s)
        vm = read_vm(self.store, uuid)
        if vm.state != "start":
            return self.libvirt_states(uuid)

        def settled(states) -> bool:
            node = read_vm(self.store, uuid).node
            return self.running_nodes(states) == [node] and all(s is None for n, s in states.items() if n != node)

        return self.wait_libvirt(
            uuid,
            settled,
            timeout_s,
            f"{self.names.get(uuid, uuid)} to run on exactly its ZooKeeper node, and only there",
        )

    def wait_reservations_folded(self, node: str, timeout_s: float = 60) -> list[str]:
        """Wait (a children watch) until ``node`` holds no reservation; returns those left."""
        path = self.schema.node_reservations(node)
        empty = threading.Event()

        def watcher(children):
            if not children:
                empty.set()
                return False
            return True

        if self.store.exists(path):
            self.store.client.ChildrenWatch(path, watcher)
            empty.wait(timeout_s)
        return self.store.list_children(path, missing_ok=True)

    def check_invariants(self, uuids, monitor: RunningMonitor | None = None) -> None:
        """I1-I4 for these VMs, once settled (see docs/migration-protocol.md)."""
        problems = []
        if monitor is not None:
            problems += [f"I1: {p}" for p in monitor.violations()]
        for uuid in uuids:
            vm = read_vm(self.store, uuid)
            name = self.names.get(uuid, uuid)
            states = self.libvirt_states(uuid)
            running = self.running_nodes(states)
            if len(running) > 1:
                problems.append(f"I1: {name} runs on {running}")
            if vm.state == "start" and running != [vm.node]:
                problems.append(f"I2: {name} (state start, node {vm.node}) runs on {running} (libvirt {states})")
            if vm.migration is not None:
                problems.append(f"I3: {name} still has a migration record {vm.migration}")
            ids = {entry.get("id"): entry for entry in self.history(uuid)}
            for mid in self.requests.get(uuid, []):
                entry = ids.get(mid)
                if entry is None:
                    problems.append(f"I4: no audit record for migration {mid} of {name}")
                elif entry.get("result") not in ("done", "aborted"):
                    problems.append(f"I4: audit record of {mid} has result {entry.get('result')!r}")
        for node in self.nodes:
            # a reservation lives until the next keepalive of the node the VM ended on counts the
            # VM in memprov (docs/architecture.md, "Memory accounting"): wait for that, bounded
            reservations = self.wait_reservations_folded(node)
            if reservations:
                problems.append(f"I3: reservations left on {node}: {reservations}")
        held = self.lock_holders()
        if held:
            problems.append(f"I3: locks still held: {held}")
        if problems:
            raise AssertionError("invariants broken:\n  " + "\n  ".join(problems) + "\n" + self.logs())


# --------------------------------------------------------------------------------------------
# I1, all the time


@dataclass
class RunningMonitor:
    """Samples the running domains of every host, round after round, in a background thread.

    Samples of different hosts are not simultaneous, so "running on X in one sample and on Y in
    the next" would also match a clean live-migration switch-over. A VM counts as running on two
    hosts only when it runs on Y in a sample taken *between two samples* that both see it running
    on X: then X ran it before and after Y was seen running it.
    """

    hosts: list[LabHost]
    interval_s: float = 0.05
    samples: list[tuple[str, frozenset]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> RunningMonitor:
        self._thread = threading.Thread(target=self._run, name="i1-monitor", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _run(self) -> None:
        import libvirt

        conns = {}
        try:
            while not self._stop.is_set():
                for h in self.hosts:
                    try:
                        if h.name not in conns:
                            conns[h.name] = h.connect()
                        # RUNNING only: a paused incoming copy or a source paused for the
                        # switch-over does not count
                        doms = conns[h.name].listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_RUNNING)
                        running = frozenset(d.UUIDString() for d in doms)
                    except libvirt.libvirtError as exc:
                        # a domain that vanished between list and state(), or a restarted libvirtd
                        if len(self.errors) < 20:
                            self.errors.append(f"{h.name}: {exc}")
                        conns.pop(h.name, None)
                        continue
                    self.samples.append((h.name, running))
                self._stop.wait(self.interval_s)
        finally:
            for conn in conns.values():
                try:
                    conn.close()
                except libvirt.libvirtError:
                    pass

    def violations(self) -> list[str]:
        found = []
        samples = list(self.samples)
        last_seen: dict[str, int] = {}  # host -> index of its previous sample
        for index, (host, running) in enumerate(samples):
            previous = last_seen.get(host)
            last_seen[host] = index
            if previous is None:
                continue
            both = running & samples[previous][1]  # running on `host` before and after
            if not both:
                continue
            for other_host, other_running in samples[previous + 1 : index]:
                if other_host != host:
                    for uuid in both & other_running:
                        found.append(f"{uuid} ran on {host} and {other_host} at once (samples {previous}..{index})")
        return sorted(set(found))

    def ever_running_on(self, uuid: str) -> set[str]:
        return {host for host, running in self.samples if uuid in running}


# --------------------------------------------------------------------------------------------
# the fixture (a test module imports it: `from .daemons import lab_cluster`, marked noqa F401)


_OLD_LOGS_REMOVED = False


@pytest.fixture
def lab_cluster(lab, lab_guests, request):
    """lab_cluster(**config_overrides) -> LabCluster (daemons not started yet), whose VMs are real
    guests unless a test asks for none. At teardown every daemon is stopped, the cluster root
    removed and every domain on every host destroyed."""
    made: list[LabCluster] = []
    global _OLD_LOGS_REMOVED
    if not _OLD_LOGS_REMOVED:  # keep this session's daemon logs only, for post-mortems
        shutil.rmtree(lab.workdir / "daemons", ignore_errors=True)
        _OLD_LOGS_REMOVED = True

    def make(**overrides) -> LabCluster:
        lab_guests.prepare()
        cluster = LabCluster(lab, request.node.name.replace("[", "-").replace("]", ""), guests=lab_guests, **overrides)
        print(f"cluster root {cluster.root}, daemon logs in {cluster.workdir}")
        made.append(cluster)
        return cluster

    yield make
    try:
        for cluster in made:
            cluster.close()
    finally:
        lab.reset()
