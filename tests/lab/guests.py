"""Guest domains for the lab: QEMU/TCG, x86_64 'pc' machines.

Two kinds:

* **real guests** (``linux=``): a Debian cloud kernel and a busybox initramfs built by
  guest_image.py, booted straight from ``<kernel>/<initrd>`` in about 3 s. They power off cleanly
  on the ACPI power button (so a shutdown migration ends with a clean shutdown), tick on a virtio
  console that the lab backs with UDP to its TickCollector (ticks.py: the downtime as the guest
  sees it), can dirty memory at a given rate (kernel command line, or the command port below), and
  have a disk on the lab's shared storage (storage.py: NBD, ``cache='none'``), so a live migration
  moves memory only;
* **no-OS guests** (no ``linux``): no disk, SeaBIOS spins on "no bootable device". About 40 MB of
  host memory, started in 0.4 s, and deaf to ACPI: what a test of the forced stop after the
  shutdown timeout needs.

``LabGuests`` gives a lab what its real guests need (the image copied into the lab's storage
directory, the storage daemon, the tick collector's address); ``GuestPort`` talks to a running
guest's command port (``org.pvc-cluster.guest.0``, a virtio serial port whose host side libvirt
creates as a unix socket on the host that runs the guest).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import time
import uuid as uuidlib
from dataclasses import dataclass, replace
from pathlib import Path
from xml.sax.saxutils import quoteattr

from typing import TYPE_CHECKING

from .guest_image import GuestImage, build
from .lab import QEMU, Lab, LabHost, connect_unix
from .storage import LabStorage, NbdDisk

if TYPE_CHECKING:
    from .ticks import TickCollector

# uuid5 namespace so that a name gives the same UUID every run unless the test passes one
GUEST_UUID_NAMESPACE = uuidlib.UUID("7ab1ab00-6c61-4200-8000-000000000000")
COMMAND_PORT = "org.pvc-cluster.guest.0"
# A real guest's smallest memory: the kernel and its initramfs do not boot in 64 MiB.
MIN_LINUX_MIB = 96
DEFAULT_TICK_MS = 10
# The lab's QEMU (Debian 12's 7.2) loses guest writes during a live migration under TCG: its
# dirty-bitmap sync for RAM blocks aligned to 64 pages (all of a guest's RAM) clears the
# migration's dirty bits without resetting the vCPUs' TLB entries that write to those pages
# unchecked, so a page written through such an entry after it was sent is never marked dirty
# and the target resumes with an old copy (QEMU's fix, 03bfc2188f "physmem: Fix migration dirty
# bitmap coherency with TCG memory access", is in 9.0, not in 7.2.x). The guest kernel panicked
# after almost every busy migration. Every full TLB flush of the vCPU ends the window, and
# page-table isolation makes the guest kernel reload CR3 (a full flush under TCG; nopcid, so
# that no reload keeps entries) on every entry from and return to user space. What is left is a
# kernel path that runs without coming from user space (the wake-up from idle): pvc-guest never
# idles while it dirties memory, and an idle guest idles between its ticks only (its kernel
# writes little there). Only for TCG's sake: KVM tracks dirty pages in the host kernel, where
# this QEMU bug does not apply.
GUEST_KERNEL_WORKAROUND = "pti=on nopcid"


def guest_uuid(name: str) -> str:
    return str(uuidlib.uuid5(GUEST_UUID_NAMESPACE, name))


def lab_domain_policy(lab: Lab) -> dict:
    """The domain XML policy (docs/security.md) the lab's daemons and `vm` tasks are given: every
    host path of a lab guest (kernel, initramfs, disks, consoles) is under the lab's workdir, and
    its shared disks are NBD exports (storage.py)."""
    return {"storage_roots": [str(lab.workdir)], "disk_protocols": ["rbd", "nbd"]}


@dataclass(frozen=True)
class LinuxGuest:
    """What makes a domain a real guest: its kernel and initramfs (paths every host of the lab
    sees) and the settings pvc-guest reads from the kernel command line."""

    kernel: Path
    initrd: Path
    ticks: tuple[str, int] | None = None  # where the ticks go (TickCollector.address); None: no ticks
    tick_ms: int = DEFAULT_TICK_MS
    dirty_mib_s: int = 0
    dirty_buf_mib: int = 32

    def with_(self, **changes) -> LinuxGuest:
        return replace(self, **changes)

    def cmdline(self, name: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,60}", name):
            raise ValueError(
                f"guest name {name!r}: a real guest's name goes on its kernel command line "
                "(accepted: 1-60 letters, digits, '_', '.', '-')"
            )
        tick_ms = self.tick_ms if self.ticks else 0
        # quiet: the console shows pvc-guest's lines and any kernel warning, not the boot log.
        # GUEST_KERNEL_WORKAROUND: so that the guest survives a live migration under the lab's
        # QEMU 7.2 TCG (see its comment).
        return (
            f"console=ttyS0 quiet {GUEST_KERNEL_WORKAROUND} pvc.name={name} pvc.tick_ms={tick_ms or 1000} "
            f"pvc.dirty_mib_s={self.dirty_mib_s} pvc.dirty_buf_mib={self.dirty_buf_mib}"
        )


def domain_xml(
    name: str,
    uuid: str | None = None,
    memory_mib: int = 64,
    vcpus: int = 1,
    serial_path: str | Path | None = None,
    bridge: str | None = None,
    mac: str | None = None,
    metadata: str | None = None,
    linux: LinuxGuest | None = None,
    disk: NbdDisk | None = None,
    disk_cache: str = "none",
) -> str:
    """A `<domain type='qemu'>` for an x86_64 'pc' machine.

    serial_path: the serial console (ttyS0) is appended to this file (it must be writable by root
        on every host the guest visits; /tmp paths are shared by all lab hosts). None: no serial.
    bridge: adds `<interface type='bridge'><source bridge=.../>` (virtio, no option ROM, so SeaBIOS
        does not try PXE). The bridge must exist in the namespace of every host the guest runs on
        (Lab(vm_bridge=...) creates one).
    metadata: raw XML placed inside `<metadata>` (give it its own namespace).
    linux: boot this real guest (see the module docstring); None: a no-OS guest.
    disk: a disk on the lab's shared storage (``LabStorage.disk``), with ``disk_cache``.
    """
    if not 16 <= memory_mib <= 4096:
        raise ValueError(f"memory_mib {memory_mib} out of the lab's range")
    if linux is not None and memory_mib < MIN_LINUX_MIB:
        raise ValueError(f"memory_mib {memory_mib}: a real guest needs at least {MIN_LINUX_MIB} MiB")
    uuid = uuid or guest_uuid(name)
    devices = [f"<emulator>{QEMU}</emulator>", "<controller type='usb' model='none'/>"]
    if disk is not None:
        devices += disk.xml(cache=disk_cache).splitlines()
    if serial_path is not None:
        devices += [
            "<serial type='file'>",
            f"  <source path={quoteattr(str(serial_path))} append='on'/>",
            "  <target port='0'/>",
            "</serial>",
        ]
    if linux is not None:
        devices += [
            # the command port; libvirt makes its unix socket on the host that runs the guest
            "<channel type='unix'>",
            f"  <target type='virtio' name='{COMMAND_PORT}'/>",
            "</channel>",
        ]
        if linux.ticks is not None:
            host, port = linux.ticks
            devices += [
                # hvc0 in the guest: each tick is one write, so one datagram to the collector
                "<console type='udp'>",
                "  <source mode='bind' host='0.0.0.0' service='0'/>",
                f"  <source mode='connect' host={quoteattr(host)} service='{int(port)}'/>",
                "  <target type='virtio'/>",
                "</console>",
            ]
    if bridge is not None:
        devices += [
            "<interface type='bridge'>",
            f"  <source bridge={quoteattr(bridge)}/>",
            *([f"  <mac address={quoteattr(mac)}/>"] if mac else []),
            "  <model type='virtio'/>",
            "  <rom enabled='no'/>",
            "</interface>",
        ]
    devices.append("<memballoon model='virtio'/>")
    meta = f"  <metadata>{metadata}</metadata>\n" if metadata else ""
    body = "\n".join("    " + line for line in devices)
    if linux is not None:
        boot = (
            f"    <kernel>{_text(str(linux.kernel))}</kernel>\n"
            f"    <initrd>{_text(str(linux.initrd))}</initrd>\n"
            f"    <cmdline>{_text(linux.cmdline(name))}</cmdline>\n"
        )
    else:
        boot = "    <boot dev='hd'/>\n"
    return f"""<domain type='qemu'>
  <name>{_text(name)}</name>
  <uuid>{uuid}</uuid>
{meta}  <memory unit='MiB'>{memory_mib}</memory>
  <currentMemory unit='MiB'>{memory_mib}</currentMemory>
  <vcpu>{vcpus}</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
{boot}  </os>
  <features><acpi/></features>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
{body}
  </devices>
</domain>
"""


def _text(value: str) -> str:
    return value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


# --------------------------------------------------------------------------------------------
# a lab's real guests


class LabGuests:
    """What a lab's real guests need, made ready by ``prepare`` (idempotent, and cheap once done:
    call it again after the lab went down and up): the guest image (built or taken from its
    cache) linked into ``WORKDIR/storage`` (one directory holds everything a guest reads from the
    hosts: kernel, initramfs and disks), the storage daemon, and the tick collector (``collector``,
    optional: without one the guests do not tick)."""

    def __init__(self, lab: Lab, collector: TickCollector | None = None, log=None) -> None:
        self.lab = lab
        self.collector = collector
        self.storage = LabStorage(lab)
        self.image: GuestImage | None = None
        self._log = log
        self._linux: LinuxGuest | None = None

    @property
    def boot_dir(self) -> Path:
        return self.storage.dir / "boot"

    @property
    def console_dir(self) -> Path:
        return self.lab.workdir / "consoles"

    def prepare(self) -> LabGuests:
        if self.image is None:
            self.image = build(log=self._log)
        self.boot_dir.mkdir(parents=True, exist_ok=True)
        self.console_dir.mkdir(parents=True, exist_ok=True)
        kernel, initrd = (self.boot_dir / f"{self.image.key}-{f.name}" for f in (self.image.kernel, self.image.initrd))
        for source, dest in ((self.image.kernel, kernel), (self.image.initrd, initrd)):
            if not dest.exists():
                tmp = dest.with_suffix(f".tmp{os.getpid()}")
                try:
                    os.link(source, tmp)  # same file system: no copy
                except OSError:
                    shutil.copy2(source, tmp)
                os.replace(tmp, dest)
        self.storage.start()
        if self.collector is not None:
            self.collector.ensure()
        self._linux = LinuxGuest(
            kernel=kernel, initrd=initrd, ticks=self.collector.address if self.collector is not None else None
        )
        return self

    def linux(self, **settings) -> LinuxGuest:
        if self._linux is None:
            raise RuntimeError("LabGuests.prepare() first")
        return self._linux.with_(**settings) if settings else self._linux

    def console(self, name: str) -> Path:
        return self.console_dir / f"{name}.log"

    def xml(
        self,
        name: str,
        uuid: str | None = None,
        memory_mib: int = 64,
        bridge: str | None = None,
        disk: bool = True,
        disk_cache: str = "none",
        **settings,
    ) -> str:
        """A real guest's domain XML: its console in ``WORKDIR/consoles/<name>.log`` and (unless
        ``disk`` is false) a disk of its own on the shared storage. ``settings``: LinuxGuest's
        (dirty_mib_s, tick_ms, ...)."""
        return domain_xml(
            name,
            uuid=uuid,
            memory_mib=memory_mib,
            serial_path=self.console(name),
            bridge=bridge,
            linux=self.linux(**settings),
            disk=self.storage.disk(name) if disk else None,
            disk_cache=disk_cache,
        )

    def no_os_xml(self, name: str, uuid: str | None = None, memory_mib: int = 64, bridge: str | None = None) -> str:
        """A guest with no OS (deaf to ACPI), its console beside the others'."""
        return domain_xml(name, uuid=uuid, memory_mib=memory_mib, serial_path=self.console(name), bridge=bridge)

    def console_text(self, name: str) -> str:
        try:
            return self.console(name).read_text(errors="replace")
        except FileNotFoundError:
            return ""


# --------------------------------------------------------------------------------------------
# talking to a running guest


class GuestPortError(RuntimeError):
    """The guest's command port cannot be reached or did not answer."""


class GuestPort:
    """The command port of a running real guest (see tests/lab/guest/pvc-guest.c): one line per
    command, one line per answer. The socket is looked up on the host that runs the guest now (it
    moves with the guest)."""

    def __init__(self, host: LabHost, uuid: str) -> None:
        self.host = host
        self.uuid = uuid

    def socket_path(self) -> Path:
        conn = self.host.connect()
        try:
            xml = conn.lookupByUUIDString(self.uuid).XMLDesc(0)
        finally:
            conn.close()
        found = re.search(r"<source mode='bind' path='([^']*/" + re.escape(COMMAND_PORT) + ")'", xml)
        if not found:
            raise GuestPortError(f"guest {self.uuid} on {self.host.name} has no {COMMAND_PORT} port")
        # libvirt names the path as its host sees it: /var/lib/libvirt is the host's lib directory
        return self.host.dir / "lib" / Path(found.group(1)).relative_to("/var/lib/libvirt")

    def ask(self, command: str, timeout_s: float = 20.0) -> str:
        """Send one command and return the answer ("ok ..." or "pong"); raises GuestPortError on an
        "error ..." answer or when none comes within ``timeout_s``. The guest may not be listening
        yet right after the host side connects (it looks at its port between ticks), so a command
        without an answer within a second is sent again on a new connection: every command is
        idempotent."""
        path = self.socket_path()
        deadline = time.monotonic() + timeout_s
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                    sock.settimeout(1.0)
                    connect_unix(sock, path)
                    sock.sendall(command.encode() + b"\n")
                    answer = b""
                    while not answer.endswith(b"\n"):
                        chunk = sock.recv(512)
                        if not chunk:
                            break
                        answer += chunk
                    if answer.endswith(b"\n"):
                        text = answer.decode(errors="replace").strip()
                        if text.startswith("error"):
                            raise GuestPortError(f"guest {self.uuid}: {command!r}: {text}")
                        return text
            except (TimeoutError, OSError) as exc:
                last_error = exc
        raise GuestPortError(
            f"guest {self.uuid} on {self.host.name} did not answer {command!r} within {timeout_s} s ({last_error})"
        )

    def status(self) -> dict[str, str]:
        """pvc-guest's figures: name, tick_ms, ticks, dirty_mib_s, dirtied_mib, uptime_ms ..."""
        answer = self.ask("status")
        return dict(item.split("=", 1) for item in answer.split()[1:] if "=" in item)

    def set_dirty_rate(self, mib_s: int) -> None:
        self.ask(f"dirty {int(mib_s)}")
