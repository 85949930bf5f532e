"""Tiny guest domains for lab tests: QEMU/TCG, no disk (SeaBIOS spins on "no bootable device"),
so a guest costs ~40 MB of host memory, starts in ~0.4 s and live-migrates in ~2 s."""
from __future__ import annotations

import uuid as uuidlib
from pathlib import Path
from xml.sax.saxutils import quoteattr

from .lab import QEMU

# uuid5 namespace so that a name gives the same UUID every run unless the test passes one
GUEST_UUID_NAMESPACE = uuidlib.UUID("7ab1ab00-6c61-4200-8000-000000000000")


def guest_uuid(name: str) -> str:
    return str(uuidlib.uuid5(GUEST_UUID_NAMESPACE, name))


def domain_xml(
    name: str,
    uuid: str | None = None,
    memory_mib: int = 64,
    vcpus: int = 1,
    serial_path: str | Path | None = None,
    bridge: str | None = None,
    mac: str | None = None,
    metadata: str | None = None,
) -> str:
    """A `<domain type='qemu'>` for an x86_64 'pc' machine.

    serial_path: the serial console is appended to this file (it must be writable by root on every
        host the guest visits; /tmp paths are shared by all lab hosts). None: no serial device.
    bridge: adds `<interface type='bridge'><source bridge=.../>` (virtio, no option ROM, so SeaBIOS
        does not try PXE). The bridge must exist in the namespace of every host the guest runs on
        (Lab(vm_bridge=...) creates one).
    metadata: raw XML placed inside `<metadata>` (give it its own namespace).
    """
    if not 16 <= memory_mib <= 4096:
        raise ValueError(f"memory_mib {memory_mib} out of the lab's range")
    uuid = uuid or guest_uuid(name)
    devices = [f"<emulator>{QEMU}</emulator>", "<controller type='usb' model='none'/>"]
    if serial_path is not None:
        devices += [
            "<serial type='file'>",
            f"  <source path={quoteattr(str(serial_path))} append='on'/>",
            "  <target port='0'/>",
            "</serial>",
        ]
    if bridge is not None:
        devices += [
            "<interface type='bridge'>",
            f"  <source bridge={quoteattr(bridge)}/>",
            *( [f"  <mac address={quoteattr(mac)}/>"] if mac else [] ),
            "  <model type='virtio'/>",
            "  <rom enabled='no'/>",
            "</interface>",
        ]
    devices.append("<memballoon model='virtio'/>")
    meta = f"  <metadata>{metadata}</metadata>\n" if metadata else ""
    body = "\n".join("    " + line for line in devices)
    return f"""<domain type='qemu'>
  <name>{_text(name)}</name>
  <uuid>{uuid}</uuid>
{meta}  <memory unit='MiB'>{memory_mib}</memory>
  <currentMemory unit='MiB'>{memory_mib}</currentMemory>
  <vcpu>{vcpus}</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <boot dev='hd'/>
  </os>
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
