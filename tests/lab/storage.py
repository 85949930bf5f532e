"""Shared storage for the lab's guests: network block devices every lab host reaches.

Production runs its VM disks on Ceph RBD: network disks, the same disk from every hypervisor, so
a live migration moves memory only. The lab does the same with NBD: one ``qemu-storage-daemon``
(Debian's qemu-system-common, installed with QEMU) in the controller namespace serves each guest
disk as an NBD export on ``<controller address>:10809``, and a guest's domain XML names it as a
``<disk type='network'>`` with ``cache='none'``. libvirt lets a domain migrate live only when every
disk is shared: a network disk is; a file on the hosts' common /tmp is not (it is a local ext4,
and libvirt refuses with "Migration without shared storage is unsafe").

The daemon is started on first use and recorded in the lab's lab.json (role ``storage``), so the
lab's ``down`` ends it like its other processes; exports are added over its QMP socket. The disk
images are sparse raw files in ``WORKDIR/storage/disks``, opened with O_DIRECT (``cache.direct``).
Several processes may share a lab (pytest, a rollout's hooks): starting and adding exports are
serialised by an flock in the storage directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from .lab import Lab, LabError, ProcRecord, connect_unix, proc_starttime

NBD_PORT = 10809
STORAGE_DAEMON = "/usr/bin/qemu-storage-daemon"
DEFAULT_DISK_MIB = 64
_NAME = re.compile(r"[^A-Za-z0-9_.-]")


@dataclass(frozen=True)
class NbdDisk:
    """A guest disk served by the lab's storage: where a domain XML finds it."""

    export: str
    host: str
    port: int
    path: Path  # the image behind the export, on the machine

    def xml(self, cache: str = "none", target: str = "vda") -> str:
        return (
            f"<disk type='network' device='disk'>\n"
            f"  <driver name='qemu' type='raw' cache='{cache}'/>\n"
            f"  <source protocol='nbd' name='{self.export}'><host name='{self.host}' port='{self.port}'/></source>\n"
            f"  <target dev='{target}' bus='virtio'/>\n"
            f"</disk>"
        )


class StorageError(LabError):
    """The lab's storage daemon cannot be started or asked."""


class LabStorage:
    """The lab's storage daemon and its exports (see the module docstring)."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.dir = lab.workdir / "storage"

    @property
    def qmp_socket(self) -> Path:
        return self.dir / "qmp.sock"

    @property
    def log_file(self) -> Path:
        return self.dir / "storage-daemon.log"

    @contextlib.contextmanager
    def _locked(self):
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
            yield

    # ---- the daemon ---------------------------------------------------------------------------

    def running(self) -> ProcRecord | None:
        """The lab's storage daemon, if lab.json records one that is alive."""
        for record in self.lab.recorded_pids():
            if record.role == "storage" and record.alive():
                return record
        return None

    def start(self) -> None:
        """Start the daemon unless it runs (idempotent; waits until its QMP socket answers)."""
        with self._locked():
            if self.running() is not None:
                return
            # A new daemon starts with no exports: images left by an earlier lab are of no use.
            shutil.rmtree(self.dir / "disks", ignore_errors=True)
            (self.dir / "disks").mkdir(parents=True)
            self.qmp_socket.unlink(missing_ok=True)
            cmd = [
                "ip",
                "netns",
                "exec",
                self.lab.ctl_netns,
                STORAGE_DAEMON,
                "--nbd-server",
                f"addr.type=inet,addr.host={self.lab.ctl_address},addr.port={NBD_PORT},max-connections=0",
                "--chardev",
                # relative to the daemon's working directory (its own): the socket's absolute path
                # under the lab's workdir may be longer than a socket address holds
                f"socket,id=qmp,path={self.qmp_socket.name},server=on,wait=off",
                "--monitor",
                "chardev=qmp",
            ]
            with open(self.log_file, "ab") as out:
                # ip netns exec execs, so the PID is the daemon's; it belongs to the lab (lab.json),
                # not to this process, and `down` ends it
                proc = subprocess.Popen(
                    cmd,
                    cwd=self.qmp_socket.parent,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            with self.lab._changing_state() as state:
                state["processes"].append(
                    ProcRecord("storage", self.lab.ctl_netns, proc.pid, proc_starttime(proc.pid)).as_dict()
                )
            deadline = time.monotonic() + 30
            while True:
                # the daemon signals readiness only by answering on its socket: poll every 50 ms
                if proc.poll() is not None:
                    raise StorageError(
                        f"qemu-storage-daemon exited with {proc.returncode}: "
                        f"{self.log_file.read_text(errors='replace')[-2000:]}"
                    )
                try:
                    self._ask("query-block-exports")
                    return
                except (OSError, StorageError):
                    if time.monotonic() > deadline:
                        raise StorageError(f"qemu-storage-daemon does not answer on {self.qmp_socket}") from None
                    time.sleep(0.05)

    def _ask(self, *commands: tuple) -> list:
        """Run QMP commands (name, arguments) in one session; their answers, in order."""
        if commands and isinstance(commands[0], str):
            commands = (commands,)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            connect_unix(sock, self.qmp_socket)
            stream = sock.makefile("rw", encoding="utf-8")
            json.loads(stream.readline())  # the greeting
            answers = []
            for name, *arguments in (("qmp_capabilities",),) + tuple(commands):
                stream.write(json.dumps({"execute": name, "arguments": arguments[0] if arguments else {}}) + "\n")
                stream.flush()
                while True:
                    line = stream.readline()
                    if not line:
                        raise StorageError(f"qemu-storage-daemon closed the QMP session during {name}")
                    reply = json.loads(line)
                    if "event" not in reply:
                        break
                if "error" in reply:
                    raise StorageError(f"qemu-storage-daemon: {name}: {reply['error'].get('desc')}")
                answers.append(reply.get("return"))
            return answers[1:]

    # ---- disks --------------------------------------------------------------------------------

    def disk(self, name: str, size_mib: int = DEFAULT_DISK_MIB) -> NbdDisk:
        """The NBD disk named ``name`` (a sparse image of ``size_mib``), exported once; the same
        disk again on later calls."""
        export = _NAME.sub("_", name)[:200]
        if not export:
            raise StorageError(f"no disk name can be made of {name!r}")
        path = self.dir / "disks" / f"{export}.img"
        self.start()
        with self._locked():
            exports = {e["id"] for e in self._ask("query-block-exports")[0]}
            if export not in exports:
                with open(path, "ab") as image:
                    if image.tell() == 0:
                        image.truncate(size_mib << 20)
                node = "n" + hashlib.sha1(export.encode()).hexdigest()[:24]  # node names: 31 characters at most
                self._ask(
                    (
                        "blockdev-add",
                        {
                            "driver": "raw",
                            "node-name": node,
                            "file": {"driver": "file", "filename": str(path), "cache": {"direct": True}},
                        },
                    ),
                    (
                        "block-export-add",
                        {"type": "nbd", "id": export, "node-name": node, "writable": True, "name": export},
                    ),
                )
        return NbdDisk(export=export, host=self.lab.ctl_address, port=NBD_PORT, path=path)

    def exports(self) -> list[str]:
        if self.running() is None:
            return []
        with self._locked():
            return sorted(e["id"] for e in self._ask("query-block-exports")[0])

    def remove(self, name: str) -> None:
        """Withdraw a disk's export and delete its image (the guests using it must be gone)."""
        export = _NAME.sub("_", name)[:200]
        with self._locked():
            found = [e for e in self._ask("query-block-exports")[0] if e["id"] == export]
            if found:
                self._ask(("block-export-del", {"id": export}))
                # the export ends asynchronously; its node can go once it has
                deadline = time.monotonic() + 10
                while any(e["id"] == export for e in self._ask("query-block-exports")[0]):
                    if time.monotonic() > deadline:
                        raise StorageError(f"export {export} does not end")
                    time.sleep(0.05)  # QMP reports the end as an event we do not subscribe to
                self._ask(("blockdev-del", {"node-name": found[0]["node-name"]}))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.dir / "disks" / f"{export}.img")
