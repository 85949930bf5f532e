"""plugins/module_utils/_domain_xml.py: memory units, parsing, errors, and a cross-check with libvirt."""

from __future__ import annotations

import importlib.util
import itertools
import sys
import uuid as uuidlib
from pathlib import Path

import pytest

from pvc_cluster_common import _domain_xml
from pvc_cluster_common._domain_xml import (
    DomainInfo,
    DomainXMLError,
    memory_to_kib,
    memory_to_mib,
    parse_domain_xml,
)

KIB, MIB, GIB, TIB, PIB, EIB = (1024**n for n in range(1, 7))

# ---- units ----------------------------------------------------------------------------------------

# (value, unit, KiB) for every unit libvirt accepts, with libvirt's rounding up to whole KiB.
UNIT_TABLE = [
    (2048, None, 2048),
    (2048, "", 2048),
    (1, "b", 1),
    (1024, "b", 1),
    (1025, "bytes", 2),
    (1048576, "byte", 1024),
    (1, "KB", 1),  # 1000 bytes, rounded up
    (1000, "KB", 977),
    (1024, "KB", 1000),
    (1, "k", 1),
    (7, "KiB", 7),
    (1, "MB", 977),
    (3, "MB", 2930),
    (1, "M", 1024),
    (512, "MiB", 512 * MIB // KIB),
    (1, "GB", 976563),
    (2, "G", 2 * 1024 * 1024),
    (4, "GiB", 4 * 1024 * 1024),
    (1, "TB", 976562500),
    (1, "T", TIB // KIB),
    (1, "TiB", TIB // KIB),
    (1, "PB", 976562500000),
    (1, "P", PIB // KIB),
    (1, "PiB", PIB // KIB),
    (1, "EB", 976562500000000),
    (1, "E", EIB // KIB),
    (1, "EiB", EIB // KIB),
    (7, "EiB", 7 * EIB // KIB),
    # letter case is ignored, as in libvirt
    (1, "B", 1),
    (1, "Bytes", 1),
    (1, "K", 1),
    (1, "kib", 1),
    (1, "m", 1024),
    (1, "mib", 1024),
    (1, "mb", 977),
    (1, "kB", 1),
    (1, "gIb", GIB // KIB),
    (0, "GiB", 0),
]


@pytest.mark.parametrize(("value", "unit", "kib"), UNIT_TABLE)
def test_memory_to_kib(value, unit, kib):
    assert memory_to_kib(value, unit) == kib
    assert memory_to_kib(str(value), unit) == kib
    assert memory_to_mib(value, unit) == kib // 1024


def test_memory_to_kib_default_unit_is_kib():
    assert memory_to_kib("4096") == 4096
    assert memory_to_mib("4096") == 4


@pytest.mark.parametrize(
    ("value", "unit", "mib"),
    [(1, "GiB", 1024), (1, "GB", 953), (1500, "MB", 1430), (1048575, None, 1023), (1, "MiB", 1), (1, "b", 0)],
)
def test_memory_to_mib_truncates_whole_kib(value, unit, mib):
    assert memory_to_mib(value, unit) == mib


@pytest.mark.parametrize("unit", ["iB", "KiBB", "x", "Ki", " KiB", "KiB ", "kibi", "MBB", "bit", "Mb2", "ZiB", "YB"])
def test_unknown_unit(unit):
    with pytest.raises(DomainXMLError) as err:
        memory_to_kib(1, unit)
    assert repr(unit) in str(err.value)
    assert "KiB, MiB, GiB" in str(err.value)  # says what is accepted


@pytest.mark.parametrize("value", ["-1", "1.5", "0x10", "", " 1024 ", "1 024", "1e3", "abc", "1024\n", "١٢"])
def test_invalid_memory_text(value):
    with pytest.raises(DomainXMLError) as err:
        memory_to_kib(value, "MiB")
    assert "non-negative decimal integer" in str(err.value)


@pytest.mark.parametrize("value", [-1, 1.5, True, None, b"1"])
def test_invalid_memory_values(value):
    with pytest.raises(DomainXMLError):
        memory_to_kib(value, "MiB")


def test_memory_text_accepted_like_libvirt():
    assert memory_to_kib("+5") == 5
    assert memory_to_kib("  1024") == 1024  # leading white space: strtoull skips it


@pytest.mark.parametrize(("value", "unit"), [(8, "EiB"), (8192, "PiB"), (2**53, None), (2**64, "b"), (10**19, "b")])
def test_too_large(value, unit):
    with pytest.raises(DomainXMLError) as err:
        memory_to_kib(value, unit)
    assert "too large" in str(err.value)


def test_largest_accepted():
    assert memory_to_kib(2**53 - 1) == 2**53 - 1
    assert memory_to_kib((2**53 - 1) * 1024, "b") == 2**53 - 1
    with pytest.raises(DomainXMLError):
        memory_to_kib((2**53 - 1) * 1024 + 1, "b")


# ---- parsing --------------------------------------------------------------------------------------

UUID = "6695eb01-f6a4-8304-79aa-97f2502e193f"

REALISTIC = """<?xml version="1.0" encoding="UTF-8"?>
<!-- written by virsh dumpxml -->
<domain type='kvm' id='7' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>web-01</name>
  <uuid>{uuid}</uuid>
  <description>Web server &amp; proxy</description>
  <metadata><pvc:vm xmlns:pvc="https://pvc.example/1">ignored</pvc:vm></metadata>
  <memory unit='{unit}'>{memory}</memory>
  <currentMemory unit='{unit}'>{current}</currentMemory>
  <vcpu placement='static' current='2'>4</vcpu>
  <os>
    <type arch='x86_64' machine='pc-q35-7.2'>hvm</type>
    <boot dev='hd'/>
  </os>
  <features><acpi/><apic/></features>
  <cpu mode='host-passthrough' check='none' migratable='on'/>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>restart</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='network' device='disk'>
      <driver name='qemu' type='raw' cache='writeback'/>
      <source protocol='rbd' name='vms/web-01_sda'>
        <host name='10.0.0.1' port='6789'/>
      </source>
      <target dev='sda' bus='scsi'/>
    </disk>
    <interface type='bridge'>
      <mac address='52:54:00:12:34:56'/>
      <source bridge='vmbr100'/>
      <model type='virtio'/>
    </interface>
    <interface type='network'>
      <source network='default'/>
      <model type='virtio'/>
    </interface>
    <interface type='bridge'>
      <source bridge='vmbr200'/>
      <model type='virtio'/>
    </interface>
    <interface type='direct'>
      <source dev='eth0' mode='bridge'/>
    </interface>
    <interface type='bridge'>
      <model type='virtio'/>
    </interface>
    <memballoon model='virtio'><stats period='1'/></memballoon>
  </devices>
  <qemu:commandline><qemu:arg value='-no-user-config'/></qemu:commandline>
</domain>
"""


@pytest.mark.parametrize(
    ("unit", "memory", "current", "memory_mib", "current_mib"),
    [
        ("KiB", "4194304", "2097152", 4096, 2048),
        ("MiB", "4096", "2048", 4096, 2048),
        ("GiB", "4", "2", 4096, 2048),
        ("bytes", "4294967296", "2147483648", 4096, 2048),
        ("MB", "4000", "2000", 3814, 1907),
    ],
)
def test_parse_realistic_xml(unit, memory, current, memory_mib, current_mib):
    xml = REALISTIC.format(uuid=UUID, unit=unit, memory=memory, current=current)
    expected = DomainInfo(
        uuid=UUID,
        name="web-01",
        domain_type="kvm",
        memory_mib=memory_mib,
        current_memory_mib=current_mib,
        vcpus=4,
        vcpus_current=2,
        bridges=("vmbr100", "vmbr200"),
        networks=("default",),
    )
    assert parse_domain_xml(xml) == expected
    assert parse_domain_xml(xml.encode("utf-8")) == expected


def _minimal(
    body: str = "",
    *,
    name="vm1",
    uuid=UUID,
    memory="<memory unit='MiB'>512</memory>",
    vcpu="<vcpu>2</vcpu>",
    dtype="qemu",
) -> str:
    name_elem = "" if name is None else f"<name>{name}</name>"
    uuid_elem = "" if uuid is None else f"<uuid>{uuid}</uuid>"
    type_attr = "" if dtype is None else f" type='{dtype}'"
    return f"<domain{type_attr}>{name_elem}{uuid_elem}{memory}{vcpu}{body}</domain>"


def test_minimal_defaults():
    info = parse_domain_xml(_minimal(vcpu=""))
    assert info == DomainInfo(UUID, "vm1", "qemu", 512, 512, 1, 1, (), ())


def test_result_is_frozen():
    info = parse_domain_xml(_minimal())
    with pytest.raises(AttributeError):
        info.memory_mib = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    "text",
    [
        "6695EB01-F6A4-8304-79AA-97F2502E193F",
        "6695eb01f6a4830479aa97f2502e193f",
        "6695EB01F6A4830479AA97F2502E193F",
        "  6695eb01-f6a4-8304-79aa-97f2502e193f\n",
    ],
)
def test_uuid_normalised(text):
    assert parse_domain_xml(_minimal(uuid=text)).uuid == UUID


def test_current_memory_default_and_clamp():
    assert parse_domain_xml(_minimal()).current_memory_mib == 512
    bigger = _minimal("<currentMemory unit='GiB'>2</currentMemory>")
    assert parse_domain_xml(bigger).current_memory_mib == 512
    smaller = _minimal("<currentMemory>262144</currentMemory>")
    assert parse_domain_xml(smaller).current_memory_mib == 256


def test_numa_cells_give_the_total_when_memory_is_absent():
    cells = (
        "<cpu><numa><cell id='0' cpus='0' memory='512' unit='MiB'/>"
        "<cell id='1' cpus='1' memory='1048576'/></numa></cpu>"
    )
    assert parse_domain_xml(_minimal(cells, memory="")).memory_mib == 1536
    # with <memory> present, <memory> wins (what libvirt's XML output always has consistent)
    assert parse_domain_xml(_minimal(cells)).memory_mib == 512


def test_vcpu_forms():
    assert parse_domain_xml(_minimal(vcpu="<vcpu placement='static'>8</vcpu>")).vcpus == 8
    info = parse_domain_xml(_minimal(vcpu="<vcpu current='3'>8</vcpu>"))
    assert (info.vcpus, info.vcpus_current) == (8, 3)
    assert parse_domain_xml(_minimal(vcpu="<vcpu>+2</vcpu>")).vcpus == 2


def test_bridges_in_document_order_only_from_devices():
    body = (
        "<devices>"
        "<interface type='bridge'><source bridge='b2'/></interface>"
        "<interface type='bridge'><source bridge='b1'/></interface>"
        "<interface type='bridge'><source bridge='b2'/></interface>"
        "<interface type='network'><source network='n1'/></interface>"
        "<interface type='ethernet'><target dev='tap0'/></interface>"
        "</devices>"
        "<metadata><interface type='bridge'><source bridge='not-a-device'/></interface></metadata>"
    )
    info = parse_domain_xml(_minimal(body))
    assert info.bridges == ("b2", "b1", "b2")
    assert info.networks == ("n1",)


def test_encoding_declarations():
    latin = ("<?xml version='1.0' encoding='ISO-8859-1'?>" + _minimal(name="caf\xe9")).encode("latin-1")
    assert parse_domain_xml(latin).name == "caf\xe9"
    text = "<?xml version='1.0' encoding='ISO-8859-1'?>" + _minimal(name="caf\xe9")
    assert parse_domain_xml(text).name == "caf\xe9"


# ---- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("xml", "fragments"),
    [
        ("", ["empty"]),
        ("   \n", ["empty"]),
        ("not xml at all", ["not well-formed"]),
        ("<domain type='kvm'><name>x</name>", ["not well-formed"]),
        ("<vm><name>x</name></vm>", ["<vm>", "expected <domain>"]),
        ("<domain xmlns='urn:x' type='kvm'/>", ["expected <domain>"]),
        (_minimal(dtype=None), ["type attribute", "kvm"]),
        (_minimal(dtype=""), ["type attribute"]),
        (_minimal(uuid=None), ["<uuid>", "missing"]),
        (_minimal(uuid=""), ["<uuid>", "not a valid UUID", "8-4-4-4-12"]),
        (_minimal(uuid="zz"), ["<uuid>", "'zz'", "32 hexadecimal digits"]),
        (_minimal(uuid="{6695eb01-f6a4-8304-79aa-97f2502e193f}"), ["<uuid>", "not a valid UUID"]),
        (_minimal(uuid="6695-eb01-f6a4-8304-79aa-97f2502e193f"), ["<uuid>", "not a valid UUID"]),
        (_minimal(uuid="6695eb01-f6a4-8304-79aa-97f2502e193"), ["<uuid>", "not a valid UUID"]),
        (_minimal(uuid="urn:uuid:6695eb01-f6a4-8304-79aa-97f2502e193f"), ["<uuid>"]),
        (_minimal(name=None), ["<name>", "missing"]),
        (_minimal(name=""), ["<name>", "missing or empty"]),
        (_minimal(name="  "), ["<name>"]),
        (_minimal(name="a/b"), ["<name>", "'/'"]),
        (_minimal(memory=""), ["<memory>", "missing or zero", "MiB"]),
        (_minimal(memory="<memory>0</memory>"), ["<memory>", "missing or zero"]),
        (_minimal(memory="<memory unit='MiB'>lots</memory>"), ["<memory>", "'lots'", "non-negative decimal integer"]),
        (_minimal(memory="<memory unit='MiB'>-512</memory>"), ["<memory>", "non-negative"]),
        (_minimal(memory="<memory unit='MiB'>1.5</memory>"), ["<memory>"]),
        (_minimal(memory="<memory unit='Mi'>512</memory>"), ["<memory>", "unknown memory unit 'Mi'", "GiB"]),
        (_minimal(memory="<memory unit='EiB'>8</memory>"), ["<memory>", "too large"]),
        (_minimal("<currentMemory unit='XB'>1</currentMemory>"), ["<currentMemory>", "'XB'"]),
        (_minimal("<currentMemory>half</currentMemory>"), ["<currentMemory>", "'half'"]),
        (_minimal("<cpu><numa><cell id='0' cpus='0'/></numa></cpu>", memory=""), ["<cell>", "memory attribute"]),
        (
            _minimal("<cpu><numa><cell id='0' cpus='0' memory='1' unit='QiB'/></numa></cpu>", memory=""),
            ["<cell memory>", "'QiB'"],
        ),
        (_minimal(vcpu="<vcpu>0</vcpu>"), ["<vcpu>", "positive integer", "'0'"]),
        (_minimal(vcpu="<vcpu>-1</vcpu>"), ["<vcpu>", "positive integer"]),
        (_minimal(vcpu="<vcpu>two</vcpu>"), ["<vcpu>", "'two'"]),
        (_minimal(vcpu="<vcpu></vcpu>"), ["<vcpu>", "positive integer"]),
        (_minimal(vcpu="<vcpu>2 </vcpu>"), ["<vcpu>"]),
        (_minimal(vcpu="<vcpu current='3'>2</vcpu>"), ["<vcpu current='3'>", "from 1 to the maximum vCPU count 2"]),
        (_minimal(vcpu="<vcpu current='0'>2</vcpu>"), ["<vcpu current='0'>"]),
        (_minimal(vcpu="<vcpu current='x'>2</vcpu>"), ["<vcpu current='x'>"]),
    ],
)
def test_errors_name_the_element_and_what_is_accepted(xml, fragments):
    with pytest.raises(DomainXMLError) as err:
        parse_domain_xml(xml)
    for fragment in fragments:
        assert fragment in str(err.value)


def test_error_is_a_value_error():
    assert issubclass(DomainXMLError, ValueError)


@pytest.mark.parametrize("value", [None, 42, ["<domain/>"]])
def test_wrong_argument_type(value):
    with pytest.raises(DomainXMLError) as err:
        parse_domain_xml(value)
    assert "str or bytes" in str(err.value)


def test_no_entity_expansion_or_dtd():
    billion_laughs = (
        '<?xml version="1.0"?><!DOCTYPE domain [<!ENTITY a "aaaaaaaaaa">'
        '<!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">]>'
        "<domain type='kvm'><name>&b;</name><uuid>" + UUID + "</uuid><memory>1024</memory></domain>"
    )
    with pytest.raises(DomainXMLError) as err:
        parse_domain_xml(billion_laughs)
    assert "DOCTYPE" in str(err.value)


def test_no_external_entities(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("top-secret")
    xxe = (
        f'<!DOCTYPE domain [<!ENTITY x SYSTEM "file://{secret}">]>'
        "<domain type='kvm'><name>&x;</name><uuid>" + UUID + "</uuid><memory>1024</memory></domain>"
    )
    with pytest.raises(DomainXMLError) as err:
        parse_domain_xml(xxe)
    assert "top-secret" not in str(err.value)


def test_imports_without_lxml(monkeypatch):
    """The ansible-test sanity import test loads the module without lxml."""
    monkeypatch.setitem(sys.modules, "lxml", None)
    monkeypatch.setitem(sys.modules, "lxml.etree", None)
    spec = importlib.util.spec_from_file_location("_domain_xml_without_lxml", Path(_domain_xml.__file__))
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    assert module.LXML_IMPORT_ERROR and "lxml" in module.LXML_IMPORT_ERROR
    assert module.memory_to_mib(1, "GiB") == 1024  # the unit arithmetic needs no lxml
    with pytest.raises(RuntimeError) as err:
        module.parse_domain_xml(_minimal())
    assert "lxml" in str(err.value)
    assert _domain_xml.LXML_IMPORT_ERROR is None


# ---- cross-check with libvirt ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def libvirt_test_conn():
    libvirt = pytest.importorskip("libvirt")
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    conn = libvirt.open("test:///default")
    yield conn
    conn.close()


def _define_and_read(conn, xml):
    dom = conn.defineXML(xml)
    try:
        _state, max_kib, current_kib, vcpus, _time = dom.info()
        return dom.maxMemory(), max_kib, current_kib, vcpus
    finally:
        dom.undefine()


@pytest.mark.parametrize(
    ("memory", "current"),
    [
        ("<memory>1048576</memory>", ""),
        ("<memory unit='KiB'>524289</memory>", "<currentMemory unit='KiB'>262145</currentMemory>"),
        ("<memory unit='MiB'>1536</memory>", "<currentMemory unit='MiB'>1024</currentMemory>"),
        ("<memory unit='GiB'>3</memory>", "<currentMemory unit='MB'>1000</currentMemory>"),
        ("<memory unit='bytes'>1073741825</memory>", "<currentMemory unit='b'>536870913</currentMemory>"),
        ("<memory unit='GB'>2</memory>", "<currentMemory unit='KB'>1500001</currentMemory>"),
        ("<memory unit='M'>777</memory>", "<currentMemory unit='k'>12345</currentMemory>"),
        ("<memory unit='TB'>1</memory>", ""),
        ("<memory unit='mb'>2049</memory>", "<currentMemory unit='G'>4</currentMemory>"),
    ],
)
def test_memory_mib_matches_libvirt(libvirt_test_conn, memory, current):
    uuid = str(uuidlib.uuid4())
    xml = (
        f"<domain type='test'><name>xcheck-{uuid[:8]}</name><uuid>{uuid}</uuid>{memory}{current}"
        "<vcpu current='1'>3</vcpu><os><type>hvm</type></os></domain>"
    )
    info = parse_domain_xml(xml)
    max_memory_kib, info_max_kib, current_kib, vcpus = _define_and_read(libvirt_test_conn, xml)
    assert info.memory_mib == max_memory_kib // 1024 == info_max_kib // 1024
    assert info.current_memory_mib == current_kib // 1024
    assert info.vcpus_current == vcpus
    assert info.uuid == uuid


def test_every_unit_matches_libvirt(libvirt_test_conn):
    """memory_to_kib equals libvirt's own conversion for every unit and awkward values."""
    units = [
        "",
        "b",
        "byte",
        "bytes",
        "KB",
        "k",
        "KiB",
        "MB",
        "M",
        "MiB",
        "GB",
        "G",
        "GiB",
        "TB",
        "T",
        "TiB",
        "PB",
        "P",
        "PiB",
        "EB",
        "E",
        "EiB",
        "kib",
        "Mb",
        "gib",
    ]
    values = [1, 999, 1023, 1025, 123457]
    limits = [
        ((2**53 - 1) * 1024, "b"),
        ((2**53 - 1) * 1024 + 1, "b"),
        (2**53 - 1, ""),
        (2**53, ""),
        (7, "EiB"),
        (8, "EiB"),
        (9223, "PB"),
        (9224, "PB"),
    ]
    mismatches = []
    for unit, value in itertools.chain(itertools.product(units, values), ((u, v) for v, u in limits)):
        try:
            ours = memory_to_kib(value, unit)
        except DomainXMLError:
            ours = "overflow"
        uuid = str(uuidlib.uuid4())
        unit_attr = f" unit='{unit}'" if unit else ""
        xml = (
            f"<domain type='test'><name>u-{uuid[:8]}</name><uuid>{uuid}</uuid>"
            f"<memory{unit_attr}>{value}</memory><os><type>hvm</type></os></domain>"
        )
        try:
            theirs = _define_and_read(libvirt_test_conn, xml)[0]
        except Exception as exc:  # libvirt.libvirtError: overflow
            theirs = "overflow" if "too large" in str(exc) else str(exc)
        if ours != theirs:
            mismatches.append((value, unit, ours, theirs))
    assert mismatches == []


# ---- normalise_domain_xml: every text lxml parses is normalised or refused with a message ----------

from hypothesis import given, settings  # noqa: E402  (this section's tools only)
from hypothesis import strategies as st  # noqa: E402

from pvc_cluster_common._domain_xml import MAX_XML_BYTES, normalise_domain_xml  # noqa: E402

_NAMES = st.sampled_from(["domain", "name", "x", "metadata", "a-b", "c.d"])
_URIS = st.sampled_from(["http://example.org/ns", "urn:pvc", "relative/uri", "rel", "x:y", "file:///a b", "", "."])
# characters of every kind, among them what XML cannot hold, lone surrogates, and markup
_TEXT = st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=20)
_ENCODINGS = st.sampled_from(["UTF-8", "utf8", "UTF-16", "ISO-8859-1", "no-such-encoding", "ascii"])


@st.composite
def documents(draw):
    """A document built as text (so that it may be anything a user could type), often well-formed."""

    def element(depth: int) -> str:
        tag = draw(_NAMES)
        prefix = draw(st.sampled_from(["", "p:"]))
        attributes = ""
        if prefix or draw(st.booleans()):
            attributes += f" xmlns:p='{draw(_URIS)}'"
        if draw(st.booleans()):
            attributes += f" xmlns='{draw(_URIS)}'"
        if draw(st.booleans()):
            attributes += f' b="{draw(_TEXT)}"'
        body = (
            draw(_TEXT)
            if depth == 0 or draw(st.booleans())
            else "".join(element(depth - 1) for _ in range(draw(st.integers(1, 2))))
        )
        return f"<{prefix}{tag}{attributes}>{body}</{prefix}{tag}>"

    declaration = f"<?xml version='1.0' encoding='{draw(_ENCODINGS)}'?>" if draw(st.booleans()) else ""
    return declaration + draw(st.sampled_from(["", " ", "\n<!-- c -->"])) + element(draw(st.integers(0, 2)))


@settings(max_examples=400, deadline=None)
@given(documents())
def test_normalising_built_documents_never_raises_anything_else(text):
    try:
        normalised = normalise_domain_xml(text)
    except DomainXMLError as exc:
        assert str(exc)
    else:
        assert normalise_domain_xml(normalised) == normalised


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_normalising_any_text_never_raises_anything_else(text):
    try:
        normalise_domain_xml(text)
    except DomainXMLError as exc:
        assert str(exc)


def test_normalising_refuses_what_it_cannot_keep_with_the_reason():
    cases = {
        "<?xml version='1.0' encoding='UTF-16'?><domain/>": "the XML declaration names the encoding 'UTF-16'",
        "<domain xmlns:x='relative/uri'><x:a/></domain>": "namespace URI 'relative/uri' is relative",
        "<domain>\ud800</domain>": "holds a character that is not Unicode text ('\\ud800' at position 8)",
        "<domain": "domain XML is not well-formed XML",
        "<domain>" + "x" * MAX_XML_BYTES + "</domain>": f"domain XML is {MAX_XML_BYTES + 17} bytes long (UTF-8)",
    }
    for text, message in cases.items():
        with pytest.raises(DomainXMLError) as failure:
            normalise_domain_xml(text)
        assert message in str(failure.value)
    # what it keeps: a UTF-8 declaration, absolute namespaces, comments and formatting dropped
    assert (
        normalise_domain_xml(
            "<?xml version='1.0' encoding='utf-8'?>\n<domain b='1'  a=\"2\"><!-- c --><x:m xmlns:x='urn:x'/></domain>"
        )
        == '<domain a="2" b="1">\n  <x:m xmlns:x="urn:x"/>\n</domain>\n'
    )


# ---- figures too large for libvirt's integers ------------------------------------------------------


@pytest.mark.parametrize("digits", [21, 4301, 100_000])
def test_memory_of_many_digits_is_refused_before_it_is_parsed(digits):
    # Python's int() refuses more than 4300 digits with a ValueError of its own; libvirt's strtoull
    # refuses anything above 2^64 - 1
    with pytest.raises(DomainXMLError) as err:
        parse_domain_xml(_minimal(memory=f"<memory unit='MiB'>{'9' * digits}</memory>"))
    message = str(err.value)
    assert message.startswith("<memory>: memory size ")
    assert f"({digits} characters) is too large" in message or digits == 21
    assert "at most 18446744073709551615" in message


def test_leading_zeros_do_not_count_as_digits():
    assert memory_to_kib("0" * 5000 + "1024", "MiB") == 1024 * 1024


@pytest.mark.parametrize(
    ("vcpu", "fragment"),
    [
        (
            "<vcpu>4294967296</vcpu>",
            "<vcpu> 4294967296 is too large: libvirt reads a vCPU count as an unsigned 32-bit integer, at most 4294967295",
        ),
        ("<vcpu>" + "9" * 5000 + "</vcpu>", "(5000 characters) is too large"),
        (
            "<vcpu current='" + "9" * 5000 + "'>2</vcpu>",
            "<vcpu current> 99999999999999999999...9999999999 (5000 characters) is too large",
        ),
        ("<vcpu current='0'>2</vcpu>", "must be an integer from 1 to the maximum vCPU count 2"),
        ("<vcpu>x</vcpu>", "<vcpu> must be a positive integer"),
    ],
)
def test_vcpu_counts_beyond_libvirt_are_refused(vcpu, fragment):
    with pytest.raises(DomainXMLError) as err:
        parse_domain_xml(_minimal(vcpu=vcpu))
    assert fragment in str(err.value)


def test_the_largest_vcpu_count_libvirt_reads_is_parsed():
    assert parse_domain_xml(_minimal(vcpu="<vcpu>4294967295</vcpu>")).vcpus == 4294967295
