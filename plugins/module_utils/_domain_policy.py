# -*- coding: utf-8 -*-
# Copyright: pvc.cluster developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
#
# PRIVATE: this module is internal to the pvc.cluster collection and its node daemon.
# It may change without notice; do not import it from other collections.
"""The domain XML policy: what a cluster VM's libvirt XML may contain.

libvirt runs as root on every hypervisor and does what a domain XML says: ``<qemu:commandline>``
runs any program, a ``<disk>`` on ``/dev/sda`` or a ``<filesystem>`` exporting ``/`` hands the
host's data to the guest, ``<seclabel type='none'>`` turns the sandbox off, ``<hostdev>`` passes a
host device through. The XML is read from ZooKeeper, so whoever can write ZooKeeper would be root
on every hypervisor. :func:`check_domain` is the one check, used by the ``vm`` module when it
writes a VM and by the daemon before every define, create and migration prepare. It accepts only
what a cluster VM needs and refuses everything else, naming the element and the rule.

The policy is data (:class:`DomainPolicy`), which an operator can widen in the daemon's
configuration (``domain_policy:``) and the ``vm`` module's ``domain_policy`` option; each key
given replaces its default. Rules, by name:

``identity``
    ``<uuid>`` and ``<name>`` are the VM's own (its key in ZooKeeper and its name there).
``namespace``
    No element or attribute of an XML namespace outside ``<metadata>`` (``qemu:commandline``,
    ``qemu:arg``, ``qemu:override``, ``lxc:``...), unless the namespace is in ``namespaces``.
``seclabel``
    No ``<seclabel>`` (per domain or per device): the host's security driver decides, unless
    ``seclabel`` is true.
``devices``
    Only the device elements in ``devices`` (by default no ``<hostdev>``, ``<filesystem>``,
    ``<shmem>``, ``<smartcard>``, ``<lease>`` or ``<pstore>``).
``emulator``
    ``<emulator>`` is one of ``emulators``.
``host-path``
    Every host path the XML names is absolute, has no ``..``, and lies under one of
    ``storage_roots``: disk and other ``<source>`` files, devices and directories, the
    ``path``, ``socket``, ``evdev``, ``template``, ``tap`` and ``vhost`` attributes anywhere,
    ``<kernel>``, ``<initrd>``, ``<dtb>``, ``<loader>``, ``<nvram>``, ACPI tables, and the file
    of an ``<rng>`` backend (except the host's random devices).
``interface``
    ``<interface>`` types are in ``interface_types`` (by default no ``ethernet``, whose set-up
    runs as root on the host), and no interface names a ``<script>`` or ``<downscript>``.
``disk-protocol``
    Network disks use a protocol in ``disk_protocols``.

Standard library and lxml (through _domain_xml) only, no I/O.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, fields
from collections.abc import Iterable
from typing import Any

from ._domain_xml import LXML_IMPORT_ERROR, DomainInfo, DomainXMLError, etree, parse_domain_xml

# ---- defaults (docs/security.md) --------------------------------------------------------------

# Where VM storage, firmware and kernels live on a Debian hypervisor; the lab adds its own.
DEFAULT_STORAGE_ROOTS = (
    "/var/lib/libvirt/images",
    "/var/lib/libvirt/boot",
    "/var/lib/libvirt/qemu/nvram",
    "/usr/share/OVMF",
    "/usr/share/qemu",
    "/usr/share/seabios",
    "/var/log/libvirt/qemu",
)
DEFAULT_EMULATORS = ("/usr/bin/qemu-system-x86_64", "/usr/bin/kvm", "/usr/libexec/qemu-kvm")
DEFAULT_DEVICES = (
    "emulator",
    "disk",
    "controller",
    "interface",
    "input",
    "graphics",
    "video",
    "audio",
    "sound",
    "console",
    "serial",
    "parallel",
    "channel",
    "memballoon",
    "rng",
    "watchdog",
    "panic",
    "tpm",
    "vsock",
    "iommu",
    "redirdev",
    "hub",
)
DEFAULT_INTERFACE_TYPES = ("bridge", "network")
DEFAULT_DISK_PROTOCOLS = ("rbd",)
# An <rng> backend reads one of these, which are not storage.
RANDOM_DEVICES = ("/dev/random", "/dev/urandom", "/dev/hwrng")

# Attributes that name a host path wherever they appear, and those that do only on <source>.
_PATH_ATTRIBUTES = ("path", "socket", "evdev", "template", "tap", "vhost")
_SOURCE_PATH_ATTRIBUTES = ("file", "dev", "dir")
_OS_PATHS = ("os/kernel", "os/initrd", "os/dtb", "os/loader", "os/nvram", "os/acpi/table")
_SYSINFO_FILES = ".//sysinfo//entry"
_QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"


class PolicyError(ValueError):
    """A domain XML that the policy refuses, or (rule ``options``) a policy that is not valid.
    ``rule`` names the rule (module docstring), and the message the element or the option."""

    def __init__(self, rule: str, message: str) -> None:
        self.rule = rule
        super().__init__(message if rule == "options" else f"{message} (rule {rule} of the domain XML policy)")


@dataclass(frozen=True)
class DomainPolicy:
    """What a cluster VM's XML may contain (see the module docstring for each rule)."""

    storage_roots: tuple[str, ...] = DEFAULT_STORAGE_ROOTS
    emulators: tuple[str, ...] = DEFAULT_EMULATORS
    devices: tuple[str, ...] = DEFAULT_DEVICES
    interface_types: tuple[str, ...] = DEFAULT_INTERFACE_TYPES
    disk_protocols: tuple[str, ...] = DEFAULT_DISK_PROTOCOLS
    namespaces: tuple[str, ...] = ()
    seclabel: bool = False

    @classmethod
    def from_options(cls, options: dict[str, Any] | None, where: str = "domain_policy") -> DomainPolicy:
        """A policy from the daemon's ``domain_policy`` section or the module option: each key
        given replaces its default. Raises PolicyError naming the key and what is accepted."""
        options = options or {}
        known = {field.name for field in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise PolicyError("options", f"{where}.{unknown[0]}: unknown key (accepted: {', '.join(sorted(known))})")
        values: dict[str, Any] = {}
        for name, value in options.items():
            if value is None:
                continue
            if name == "seclabel":
                if not isinstance(value, bool):
                    raise PolicyError("options", f"{where}.seclabel: {value!r} is not true or false")
                values[name] = value
                continue
            if not isinstance(value, (list, tuple)) or not all(
                isinstance(item, str) and item.strip() for item in value
            ):
                raise PolicyError("options", f"{where}.{name}: {value!r} is not a list of non-empty strings")
            if name in ("storage_roots", "emulators"):
                for item in value:
                    if not item.startswith("/") or ".." in item.split("/"):
                        raise PolicyError("options", f"{where}.{name}: {item!r} is not an absolute path without '..'")
            values[name] = tuple(
                posixpath.normpath(item) if name in ("storage_roots", "emulators") else item for item in value
            )
        return cls(**values)

    def to_options(self) -> dict[str, Any]:
        return {
            field.name: (list(getattr(self, field.name)) if field.name != "seclabel" else self.seclabel)
            for field in fields(self)
        }


# ---- the check --------------------------------------------------------------------------------


def _describe(element: etree._Element) -> str:
    """``<tag attr='value' ...>`` of an element, for messages (its first few attributes)."""
    tag = _local(element.tag)
    prefix = element.prefix + ":" if element.prefix else ""
    attrs = " ".join(f"{_local(key)}='{value}'" for key, value in list(element.attrib.items())[:3])
    return f"<{prefix}{tag}{' ' + attrs if attrs else ''}>"


def _local(tag: object) -> str:
    return tag.split("}", 1)[1] if isinstance(tag, str) and tag.startswith("{") else str(tag)


def _namespace(tag: object) -> str:
    return tag[1:].split("}", 1)[0] if isinstance(tag, str) and tag.startswith("{") else ""


def _under_roots(path: str, roots: Iterable[str]) -> bool:
    if not path.startswith("/") or ".." in path.split("/"):
        return False
    normal = posixpath.normpath(path)
    return any(normal == root or normal.startswith(root.rstrip("/") + "/") for root in roots)


def _check_path(path: str, element: etree._Element, what: str, policy: DomainPolicy) -> None:
    if not _under_roots(path, policy.storage_roots):
        raise PolicyError(
            "host-path",
            f"{_describe(element)}: {what} {path!r} is not under a storage root "
            f"({', '.join(policy.storage_roots) or 'none configured'})",
        )


def check_domain(xml: str, policy: DomainPolicy, uuid: str | None = None, name: str | None = None) -> DomainInfo:
    """Check a domain XML against ``policy``; returns its DomainInfo (_domain_xml). ``uuid`` and
    ``name``: the VM's key and name in the cluster, which the XML's must equal (None: not
    checked). Raises DomainXMLError when the XML is not a valid domain, PolicyError naming the
    element and the rule when the policy refuses it."""
    info = parse_domain_xml(xml)
    if uuid is not None and info.uuid != uuid:
        raise PolicyError("identity", f"<uuid> {info.uuid} is not the VM's own ({uuid})")
    if name is not None and info.name != name:
        raise PolicyError("identity", f"<name> {info.name!r} is not the VM's name in the cluster ({name!r})")
    if etree is None:  # pragma: no cover - parse_domain_xml raised already
        raise RuntimeError(LXML_IMPORT_ERROR)
    root = etree.fromstring(
        xml.encode("utf-8") if isinstance(xml, str) else xml,
        etree.XMLParser(
            resolve_entities=False,
            no_network=True,
            load_dtd=False,
            huge_tree=False,
            remove_comments=True,
            remove_pis=True,
        ),
    )
    devices = root.find("devices")
    for device in devices if devices is not None else []:
        if not isinstance(device.tag, str):
            continue
        if device.tag not in policy.devices:
            raise PolicyError(
                "devices", f"{_describe(device)}: this device is not accepted (accepted: {', '.join(policy.devices)})"
            )
        if device.tag == "emulator" and (device.text or "").strip() not in policy.emulators:
            raise PolicyError(
                "emulator",
                f"<emulator>{(device.text or '').strip()}</emulator> is not an accepted "
                f"emulator ({', '.join(policy.emulators)})",
            )
        if device.tag == "interface" and device.get("type") not in policy.interface_types:
            raise PolicyError(
                "interface",
                f"{_describe(device)}: interfaces of type {device.get('type')!r} are not "
                f"accepted (accepted: {', '.join(policy.interface_types)})",
            )
        if device.tag == "rng":
            for backend in device.iterfind("backend"):
                if backend.get("model") == "random" and (backend.text or "").strip():
                    random_source = (backend.text or "").strip()
                    if random_source not in RANDOM_DEVICES:
                        _check_path(random_source, backend, "file", policy)
        if device.tag == "disk":
            for source in device.iter("source"):
                protocol = source.get("protocol")
                if protocol is not None and protocol not in policy.disk_protocols:
                    raise PolicyError(
                        "disk-protocol",
                        f"{_describe(source)}: network disks of protocol {protocol!r} "
                        f"are not accepted (accepted: {', '.join(policy.disk_protocols)})",
                    )
    metadata = root.find("metadata")
    inside_metadata = set(metadata.iter()) if metadata is not None else set()
    for element in root.iter():
        if element in inside_metadata or not isinstance(element.tag, str):
            continue
        namespace = _namespace(element.tag)
        if namespace and namespace not in policy.namespaces:
            raise PolicyError(
                "namespace",
                f"{_describe(element)}: elements of the namespace {namespace} are not "
                "accepted outside <metadata>" + (" (QEMU command line pass-through)" if namespace == _QEMU_NS else ""),
            )
        for key in element.attrib:
            if _namespace(key) and _namespace(key) not in policy.namespaces:
                raise PolicyError(
                    "namespace",
                    f"{_describe(element)}: attribute {key} of the namespace {_namespace(key)} is not accepted",
                )
        tag = element.tag
        if tag == "seclabel" and not policy.seclabel:
            raise PolicyError(
                "seclabel",
                f"{_describe(element)}: security label overrides are not accepted; the "
                "host's security driver labels every VM",
            )
        if tag in ("script", "downscript"):
            raise PolicyError(
                "interface", f"{_describe(element)}: interface scripts run on the host as root and are not accepted"
            )
        for attribute in _PATH_ATTRIBUTES:
            if attribute in element.attrib and tag != "target":  # a <target>'s path is the guest's
                _check_path(element.attrib[attribute], element, f"host path ({attribute})", policy)
        if tag == "source":
            for attribute in _SOURCE_PATH_ATTRIBUTES:
                if attribute in element.attrib:
                    _check_path(element.attrib[attribute], element, f"host path ({attribute})", policy)
    for path in _OS_PATHS:
        for element in root.iterfind(path):
            _check_path((element.text or "").strip(), element, "file", policy)
    for element in root.iterfind(_SYSINFO_FILES):
        if "file" in element.attrib:
            _check_path(element.attrib["file"], element, "host file", policy)
    return info


def refusal(xml: str, policy: DomainPolicy, uuid: str | None = None, name: str | None = None) -> str:
    """Why ``xml`` may not be given to libvirt (not a valid domain, or refused by the policy),
    or "" when it may."""
    try:
        check_domain(xml, policy, uuid, name)
    except (DomainXMLError, PolicyError) as exc:
        return str(exc)
    return ""
