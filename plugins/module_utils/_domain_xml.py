# -*- coding: utf-8 -*-
# Copyright: pvc.cluster developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
#
# PRIVATE: this module is internal to the pvc.cluster collection and its node daemon.
# It may change without notice; do not import it from other collections.
"""Parse the libvirt domain XML that a pvc.cluster keeps in ZooKeeper.

Used by the node daemon (installed as ``pvc_cluster_common._domain_xml``) and by the Ansible modules
(``ansible_collections.pvc.cluster.plugins.module_utils._domain_xml``). Needs lxml; the import is
guarded so that the module itself imports without it (check ``LXML_IMPORT_ERROR`` before parsing).

Memory sizes follow libvirt's rules exactly (``virScaleInteger`` and ``virDomainParseMemory``):

* unit names are case-insensitive: ``b``/``byte``/``bytes`` = 1; a single letter ``k m g t p e``
  or that letter followed by ``iB`` = a power of 1024; that letter followed by ``B`` = a power of
  1000. So ``KB`` = 1000 bytes, ``k`` = ``KiB`` = 1024 bytes, ``M`` = ``MiB``, ``MB`` = 10^6 bytes.
* no unit means KiB;
* the size in bytes is rounded *up* to whole KiB;
* the size must stay below 8 EiB (2^63 bytes; in KiB, below 2^53).

``DomainInfo.memory_mib`` is whole KiB // 1024, the same figure as libvirt's ``maxMemory() // 1024``
for the same XML (the tests check this against the libvirt test driver).
"""

from __future__ import annotations

import re
import traceback
from dataclasses import dataclass

LXML_IMPORT_ERROR: str | None
try:
    from lxml import etree
except ImportError:  # pragma: no cover - exercised by the ansible-test sanity import test
    etree = None  # type: ignore[assignment]  # used only when LXML_IMPORT_ERROR is None
    LXML_IMPORT_ERROR = traceback.format_exc()
else:
    LXML_IMPORT_ERROR = None

__all__ = [
    "ACCEPTED_UNITS",
    "DomainInfo",
    "DomainXMLError",
    "LXML_IMPORT_ERROR",
    "MAX_XML_BYTES",
    "memory_to_kib",
    "memory_to_mib",
    "normalise_domain_xml",
    "parse_domain_xml",
    "etree",
]

# The largest domain XML the vm module writes, in bytes of UTF-8 (normalise_domain_xml refuses
# more). ZooKeeper refuses any request larger than its jute.maxbuffer (1 MiB by default) by
# dropping the connection, and the XML shares its transaction with the VM's other keys: this
# leaves them room. (Reading, _decode.MAX_XML_BYTES allows what ZooKeeper itself could store.)
MAX_XML_BYTES = 1_000_000

# Human-readable list for error messages (libvirt accepts these in any letter case).
ACCEPTED_UNITS = (
    "b, byte, bytes; KB, MB, GB, TB, PB, EB (powers of 1000); "
    "k, M, G, T, P, E or KiB, MiB, GiB, TiB, PiB, EiB (powers of 1024); "
    "no unit = KiB; letter case is ignored"
)

_PREFIX_POWER = {"k": 1, "m": 2, "g": 3, "t": 4, "p": 5, "e": 6}
# libvirt limits a memory size to LLONG_MAX bytes, and the KiB figure to below ceil(that / 1024).
_MAX_BYTES = 2**63 - 1
_MAX_KIB_EXCLUSIVE = -(-_MAX_BYTES // 1024)
# libvirt reads sizes with strtoull, and <vcpu> and its current attribute as unsigned int
_MAX_ULLONG = 2**64 - 1
_MAX_UINT = 2**32 - 1
# strtoull as libvirt uses it: optional leading white space, optional '+', decimal digits, nothing after.
_INT_RE = re.compile(r"[ \t\n\r\f\v]*\+?[0-9]+")
# The encoding an XML declaration may name: the XML is kept and given to libvirt as UTF-8 text.
_DECLARED_ENCODING_RE = re.compile(r"""<\?xml\s[^>]*?\bencoding\s*=\s*(["'])([^"']*)\1""")
_UTF8_NAMES = ("utf-8", "utf8")
_UUID_RE = re.compile(r"[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}")


class DomainXMLError(ValueError):
    """The domain XML (or a memory size) is not what libvirt and pvc.cluster accept."""


@dataclass(frozen=True)
class DomainInfo:
    """What pvc.cluster needs from a domain XML.

    ``memory_mib`` is the configured maximum (``<memory>``, or the sum of the NUMA cells when
    ``<memory>`` is absent), which is what memory accounting counts. ``current_memory_mib`` is the
    balloon target (``<currentMemory>``, default and upper bound: ``memory_mib``). ``vcpus`` is the
    maximum from the ``<vcpu>`` text (default 1, as in libvirt), ``vcpus_current`` its ``current``
    attribute (default: ``vcpus``). ``bridges`` lists the source bridge of every
    ``<interface type='bridge'>`` and ``networks`` the source network of every
    ``<interface type='network'>``, both in document order.
    """

    uuid: str
    name: str
    domain_type: str
    memory_mib: int
    current_memory_mib: int
    vcpus: int
    vcpus_current: int
    bridges: tuple[str, ...] = ()
    networks: tuple[str, ...] = ()


def _unit_scale(unit: str) -> int:
    """Bytes per unit, as libvirt's virScaleInteger computes it."""
    folded = unit.lower()
    if folded in ("b", "byte", "bytes"):
        return 1
    power = _PREFIX_POWER.get(folded[:1])
    if power is not None:
        rest = unit[1:]
        if rest == "" or rest.lower() == "ib":
            return int(1024**power)
        if rest.lower() == "b":
            return int(1000**power)
    raise DomainXMLError(f"unknown memory unit {unit!r}; accepted units: {ACCEPTED_UNITS}")


def _parse_count(
    text: str, what: str, maximum: int = _MAX_ULLONG, limit: str = "libvirt reads it as an unsigned 64-bit integer"
) -> int:
    """A decimal count as libvirt's strtoull reads it, bounded by ``maximum`` before int() (a figure of
    thousands of digits would cost a big-number parse, and Python refuses to parse more than 4300)."""
    if not _INT_RE.fullmatch(text):
        raise DomainXMLError(f"{what} must be a non-negative decimal integer, got {_shown(text)!r}")
    digits = text.strip().lstrip("+").lstrip("0") or "0"
    if len(digits) > len(str(maximum)) or int(digits) > maximum:
        raise DomainXMLError(f"{what} {_shown(text.strip())} is too large: {limit}, at most {maximum}")
    return int(digits)


def _parse_vcpus(text: str, what: str) -> int:
    """A vCPU count: libvirt reads <vcpu> and its current attribute as an unsigned int."""
    if not _INT_RE.fullmatch(text):
        raise DomainXMLError(f"{what} must be a positive integer (the maximum vCPU count), got {_shown(text)!r}")
    return _parse_count(text, what, _MAX_UINT, "libvirt reads a vCPU count as an unsigned 32-bit integer")


def _shown(text: str) -> str:
    """A figure as a message shows it: a long one cut, with its length."""
    return text if len(text) <= 40 else f"{text[:20]}...{text[-10:]} ({len(text)} characters)"


def memory_to_kib(value: str | int, unit: str | None = None) -> int:
    """A libvirt memory size in whole KiB, rounded up as libvirt does.

    ``value`` is an int or the element's text (decimal digits, optionally a leading '+').
    ``unit`` is the ``unit`` attribute; None or "" means KiB. Raises DomainXMLError.
    """
    if isinstance(value, bool):
        raise DomainXMLError(f"memory size must be an integer, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise DomainXMLError(f"memory size must not be negative, got {value}")
        number = value
    elif isinstance(value, str):
        number = _parse_count(value, "memory size")
    else:
        raise DomainXMLError(f"memory size must be an int or a string of digits, got {type(value).__name__}")
    scale = 1024 if unit is None or unit == "" else _unit_scale(unit)
    if number and number > _MAX_BYTES // scale:
        raise DomainXMLError(
            f"memory size {number}{unit or ''} is too large: libvirt accepts sizes below 8 EiB (2^63 bytes)"
        )
    kib = -(-(number * scale) // 1024)
    if kib >= _MAX_KIB_EXCLUSIVE:
        raise DomainXMLError(
            f"memory size {number}{unit or ''} is too large: libvirt accepts sizes below 8 EiB (2^63 bytes)"
        )
    return kib


def memory_to_mib(value: str | int, unit: str | None = None) -> int:
    """A libvirt memory size in MiB: whole KiB (rounded up) // 1024, like ``maxMemory() // 1024``."""
    return memory_to_kib(value, unit) // 1024


def _element_kib(elem: etree._Element, what: str) -> int:
    try:
        return memory_to_kib(elem.text or "", elem.get("unit"))
    except DomainXMLError as exc:
        raise DomainXMLError(f"{what}: {exc}") from None


def _cell_kib(cell: etree._Element) -> int:
    """KiB of a NUMA ``<cell memory='...' unit='...'>``."""
    value = cell.get("memory")
    if value is None:
        raise DomainXMLError("<cpu><numa><cell> has no memory attribute; expected e.g. memory='512' unit='MiB'")
    try:
        return memory_to_kib(value, cell.get("unit"))
    except DomainXMLError as exc:
        raise DomainXMLError(f"<cpu><numa><cell memory>: {exc}") from None


def _parse_uuid(text: str | None) -> str:
    raw = (text or "").strip()
    if not _UUID_RE.fullmatch(raw) or (len(raw) not in (32, 36)) or (len(raw) == 36 and raw.count("-") != 4):
        raise DomainXMLError(
            f"<uuid> {raw!r} is not a valid UUID; accepted: 32 hexadecimal digits, optionally "
            "in the 8-4-4-4-12 form with hyphens (e.g. 6695eb01-f6a4-8304-79aa-97f2502e193f)"
        )
    digits = raw.replace("-", "").lower()
    return f"{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}"


def _make_parser(for_text: bool) -> etree.XMLParser:
    return etree.XMLParser(
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        dtd_validation=False,
        huge_tree=False,
        remove_comments=True,
        remove_pis=True,
        encoding="utf-8" if for_text else None,
    )


def parse_domain_xml(xml: str | bytes) -> DomainInfo:
    """Parse a libvirt domain XML document into a DomainInfo.

    The parser never touches the network, resolves no entities, loads no DTD and refuses documents
    that declare one. Raises DomainXMLError naming the element at fault and what is accepted, or
    RuntimeError when lxml is not installed.
    """
    if etree is None:
        raise RuntimeError(f"the lxml Python library is required to parse domain XML:\n{LXML_IMPORT_ERROR}")
    if isinstance(xml, str):
        data, parser = _utf8(xml), _make_parser(for_text=True)
    elif isinstance(xml, (bytes, bytearray)):
        data, parser = bytes(xml), _make_parser(for_text=False)
    else:
        raise DomainXMLError(f"domain XML must be str or bytes, got {type(xml).__name__}")
    if not data.strip():
        raise DomainXMLError("domain XML is empty; expected a <domain> document")
    try:
        root = etree.fromstring(data, parser)
    except etree.XMLSyntaxError as exc:
        raise DomainXMLError(f"domain XML is not well-formed XML: {exc}") from None
    doc = root.getroottree().docinfo
    if doc.doctype or doc.internalDTD is not None:
        raise DomainXMLError("domain XML must not contain a DOCTYPE declaration")
    if root.tag != "domain":
        raise DomainXMLError(f"root element is <{root.tag!s}>; expected <domain>")

    domain_type = (root.get("type") or "").strip()
    if not domain_type:
        raise DomainXMLError("<domain> has no type attribute; expected e.g. type='kvm', 'qemu' or 'test'")

    uuid_elem = root.find("uuid")
    if uuid_elem is None:
        raise DomainXMLError("<uuid> is missing; pvc.cluster needs every domain's UUID in its XML")
    uuid = _parse_uuid(uuid_elem.text)

    name_elem = root.find("name")
    name = name_elem.text if name_elem is not None and name_elem.text else ""
    if not name.strip():
        raise DomainXMLError("<name> is missing or empty; expected a non-empty domain name without '/'")
    if "/" in name:
        raise DomainXMLError(f"<name> {name!r} contains '/'; expected a non-empty domain name without '/'")

    memory_kib = 0
    memory_elem = root.find("memory")
    if memory_elem is not None:
        memory_kib = _element_kib(memory_elem, "<memory>")
    if memory_kib == 0:
        # libvirt takes the total from the NUMA cells when <memory> is absent or zero.
        for cell in root.iterfind("cpu/numa/cell"):
            memory_kib += _cell_kib(cell)
    if memory_kib == 0:
        raise DomainXMLError(
            "<memory> is missing or zero; expected a positive size, e.g. "
            "<memory unit='MiB'>1024</memory> (units: " + ACCEPTED_UNITS + ")"
        )

    current_kib = memory_kib
    current_elem = root.find("currentMemory")
    if current_elem is not None:
        current_kib = _element_kib(current_elem, "<currentMemory>")
        if current_kib == 0 or current_kib > memory_kib:
            # libvirt does the same: a zero or too large balloon target becomes the maximum.
            current_kib = memory_kib

    vcpus, vcpus_current = 1, None
    vcpu_elem = root.find("vcpu")
    if vcpu_elem is not None:
        text = vcpu_elem.text or ""
        vcpus = _parse_vcpus(text, "<vcpu>")
        if vcpus < 1:
            raise DomainXMLError(f"<vcpu> must be a positive integer (the maximum vCPU count), got {text!r}")
        current = vcpu_elem.get("current")
        if current is not None:
            vcpus_current = _parse_vcpus(current, "<vcpu current>") if _INT_RE.fullmatch(current) else 0
            if not 1 <= vcpus_current <= vcpus:
                raise DomainXMLError(
                    f"<vcpu current={_shown(current)!r}> must be an integer from 1 to the maximum vCPU count {vcpus}"
                )

    bridges, networks = [], []
    for iface in root.iterfind("devices/interface"):
        source = iface.find("source")
        if source is None:
            continue
        kind, bridge, network = iface.get("type"), source.get("bridge"), source.get("network")
        if kind == "bridge" and bridge:
            bridges.append(bridge)
        elif kind == "network" and network:
            networks.append(network)

    return DomainInfo(
        uuid=uuid,
        name=name,
        domain_type=domain_type,
        memory_mib=memory_kib // 1024,
        current_memory_mib=current_kib // 1024,
        vcpus=vcpus,
        vcpus_current=vcpus_current if vcpus_current is not None else vcpus,
        bridges=tuple(bridges),
        networks=tuple(networks),
    )


def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise DomainXMLError(
            f"domain XML holds a character that is not Unicode text ({text[exc.start]!r} at "
            f"position {exc.start}); expected UTF-8 text"
        ) from None


def _relative_namespaces(root: etree._Element) -> list[str]:
    """The namespace URIs of the document that have no scheme (C14N refuses them)."""
    found = []
    for element in root.iter():
        for uri in (element.nsmap or {}).values():
            if uri and not re.match(r"[A-Za-z][A-Za-z0-9+.-]*:", uri) and uri not in found:
                found.append(uri)
    return found


def normalise_domain_xml(xml: str) -> str:
    """The domain XML in a canonical, readable form: comments, processing instructions and blank
    text gone, attributes sorted and quoted alike (C14N), then indented. Two texts describe the
    same domain when these forms are equal.

    Raises DomainXMLError, saying what to change, for every text it cannot put in that form: not
    well-formed, over MAX_XML_BYTES, an XML declaration naming another encoding than UTF-8 (the
    text is kept and given to libvirt as UTF-8), or a relative namespace URI (C14N needs absolute
    ones). Never any other exception for a str.
    """
    if etree is None:
        raise RuntimeError(f"the lxml Python library is required to parse domain XML:\n{LXML_IMPORT_ERROR}")
    if not isinstance(xml, str):
        raise DomainXMLError(f"domain XML must be text, got {type(xml).__name__}")
    text = xml.strip()
    data = _utf8(text)
    if len(data) > MAX_XML_BYTES:
        raise DomainXMLError(
            f"domain XML is {len(data)} bytes long (UTF-8); a cluster keeps domain XML of at most "
            f"{MAX_XML_BYTES} bytes (ZooKeeper refuses requests over 1 MiB by default)"
        )
    declared = _DECLARED_ENCODING_RE.match(text)
    if declared and declared.group(2).strip().lower() not in _UTF8_NAMES:
        raise DomainXMLError(
            f"the XML declaration names the encoding {declared.group(2)!r}, but domain XML is kept and "
            "given to libvirt as UTF-8 text: declare encoding='UTF-8' or leave the declaration out"
        )
    parser = etree.XMLParser(
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        remove_comments=True,
        remove_pis=True,
        remove_blank_text=True,
        huge_tree=False,
        encoding="utf-8",
    )
    try:
        root = etree.fromstring(data, parser)
    except etree.XMLSyntaxError as exc:
        raise DomainXMLError(f"domain XML is not well-formed XML: {exc}") from None
    relative = _relative_namespaces(root)
    if relative:
        raise DomainXMLError(
            f"namespace URI {relative[0]!r} is relative; give namespaces an absolute URI "
            "(like http://example.org/ns), as libvirt's <metadata> expects"
        )
    try:
        canonical = etree.tostring(root, method="c14n")
        root = etree.fromstring(canonical, parser)
        return etree.tostring(root, pretty_print=True, encoding="unicode")
    except (etree.LxmlError, ValueError) as exc:
        raise DomainXMLError(f"domain XML cannot be put in canonical form (C14N): {exc}") from None
