"""The domain XML policy (_domain_policy): what a cluster VM's XML may contain."""

from __future__ import annotations

import pytest

from pvc_cluster_common._domain_policy import DomainPolicy, PolicyError, check_domain, refusal
from pvc_cluster_common._domain_xml import DomainXMLError

UUID = "6695eb01-f6a4-8304-79aa-97f2502e193f"
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
POLICY = DomainPolicy()


def domain(devices: str = "", extra: str = "", os: str = "", emulator: str = "/usr/bin/qemu-system-x86_64") -> str:
    return (
        f"<domain type='kvm' xmlns:qemu='{QEMU_NS}'><name>web1</name><uuid>{UUID}</uuid>"
        f"<memory unit='MiB'>512</memory><os><type>hvm</type>{os}</os>{extra}"
        f"<devices><emulator>{emulator}</emulator>{devices}</devices></domain>"
    )


CLUSTER_VM = domain(
    "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
    "<source file='/var/lib/libvirt/images/web1.qcow2'/><target dev='vda' bus='virtio'/></disk>"
    "<disk type='network' device='disk'><source protocol='rbd' name='vms/web1-data'><host name='ceph1'/></source>"
    "<target dev='vdb' bus='virtio'/></disk>"
    "<interface type='bridge'><source bridge='vmbr0'/><model type='virtio'/></interface>"
    "<interface type='network'><source network='default'/></interface>"
    "<serial type='pty'><target port='0'/></serial><console type='pty'/>"
    "<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>"
    "<graphics type='vnc' port='-1'/><video><model type='virtio'/></video><input type='tablet' bus='usb'/>"
    "<controller type='usb' model='qemu-xhci'/><memballoon model='virtio'/>"
    "<rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>",
    extra=f"<metadata><qemu:commandline xmlns:qemu='{QEMU_NS}'/></metadata>",
    os="<loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE.fd</loader>"
    "<nvram>/var/lib/libvirt/qemu/nvram/web1_VARS.fd</nvram>",
)


def test_a_cluster_vm_is_accepted():
    info = check_domain(CLUSTER_VM, POLICY, UUID, "web1")
    assert (info.uuid, info.name, info.memory_mib) == (UUID, "web1", 512)
    assert refusal(CLUSTER_VM, POLICY, UUID, "web1") == ""


# Each element docs/security.md refuses, by rule; the message names the element and the rule.
@pytest.mark.parametrize(
    "xml, rule, element",
    [
        (
            domain(extra="<qemu:commandline><qemu:arg value='-runas'/></qemu:commandline>"),
            "namespace",
            "<qemu:commandline>",
        ),
        (domain(extra="<qemu:override/>"), "namespace", "<qemu:override>"),
        (domain(extra="<seclabel type='none'/>"), "seclabel", "<seclabel type='none'>"),
        (
            domain(
                "<disk type='file'><source file='/var/lib/libvirt/images/a.img'><seclabel relabel='no'/></source>"
                "<target dev='vda'/></disk>"
            ),
            "seclabel",
            "<seclabel relabel='no'>",
        ),
        (
            domain(
                "<hostdev mode='subsystem' type='pci'><source><address domain='0' bus='1' slot='0' function='0'/>"
                "</source></hostdev>"
            ),
            "devices",
            "<hostdev",
        ),
        (
            domain("<filesystem type='mount'><source dir='/'/><target dir='root'/></filesystem>"),
            "devices",
            "<filesystem",
        ),
        (domain("<shmem name='x'/>"), "devices", "<shmem"),
        (domain(os="<kernel>/boot/vmlinuz</kernel>"), "host-path", "<kernel>"),
        (domain(os="<initrd>/tmp/initrd</initrd>"), "host-path", "<initrd>"),
        (domain(os="<loader>/tmp/evil.fd</loader>"), "host-path", "<loader>"),
        (domain(os="<nvram>/etc/shadow</nvram>"), "host-path", "<nvram>"),
        (
            domain(os="<nvram template='/etc/shadow'>/var/lib/libvirt/qemu/nvram/x</nvram>"),
            "host-path",
            "<nvram template",
        ),
        (
            domain("<disk type='block'><source dev='/dev/sda'/><target dev='vda'/></disk>"),
            "host-path",
            "<source dev='/dev/sda'>",
        ),
        (
            domain(
                "<disk type='file'><source file='/var/lib/libvirt/images/../../../etc/shadow'/><target dev='vda'/></disk>"
            ),
            "host-path",
            "<source file=",
        ),
        (
            domain("<disk type='file'><source file='/var/lib/libvirt/imagesX/a.img'/><target dev='vda'/></disk>"),
            "host-path",
            "<source file=",
        ),
        (domain("<disk type='file'><source file='web1.img'/><target dev='vda'/></disk>"), "host-path", "<source file="),
        (domain("<serial type='file'><source path='/etc/cron.d/evil'/></serial>"), "host-path", "<source path="),
        (domain("<rng model='virtio'><backend model='random'>/etc/shadow</backend></rng>"), "host-path", "<backend"),
        (
            domain(extra="<sysinfo type='fwcfg'><entry name='opt/x' file='/etc/shadow'/></sysinfo>"),
            "host-path",
            "<entry",
        ),
        (
            domain("<interface type='ethernet'><target dev='tap0'/></interface>"),
            "interface",
            "<interface type='ethernet'>",
        ),
        (
            domain(
                "<interface type='bridge'><source bridge='br0'/><script path='/var/lib/libvirt/images/x'/></interface>"
            ),
            "interface",
            "<script",
        ),
        (domain("<interface type='direct'><source dev='eth0' mode='bridge'/></interface>"), "interface", "'direct'"),
        (domain(emulator="/tmp/qemu"), "emulator", "<emulator>/tmp/qemu</emulator>"),
        (
            domain(
                "<disk type='network'><source protocol='nbd' name='x'><host name='elsewhere'/></source>"
                "<target dev='vda'/></disk>"
            ),
            "disk-protocol",
            "<source protocol='nbd'",
        ),
    ],
)
def test_refused_elements_name_the_element_and_the_rule(xml, rule, element):
    with pytest.raises(PolicyError) as caught:
        check_domain(xml, POLICY, UUID, "web1")
    assert caught.value.rule == rule and element in str(caught.value)
    assert str(caught.value).endswith(f"(rule {rule} of the domain XML policy)")


def test_the_identity_must_be_the_vms_own():
    with pytest.raises(PolicyError, match=r"<uuid> 6695eb01.* is not the VM's own \(7795eb01"):
        check_domain(CLUSTER_VM, POLICY, "7795eb01-f6a4-8304-79aa-97f2502e193f", "web1")
    with pytest.raises(PolicyError, match="<name> 'web1' is not the VM's name in the cluster \\('mail'\\)"):
        check_domain(CLUSTER_VM, POLICY, UUID, "mail")


def test_an_invalid_document_is_a_domain_xml_error():
    with pytest.raises(DomainXMLError):
        check_domain("", POLICY)
    assert "empty" in refusal("", POLICY)


def test_an_operator_widens_the_policy_with_data():
    lab = DomainPolicy.from_options(
        {
            "storage_roots": ["/tmp/pvc-lab"],
            "interface_types": ["bridge", "network", "ethernet"],
            "devices": list(POLICY.devices) + ["filesystem"],
            "namespaces": [QEMU_NS],
            "seclabel": True,
            "disk_protocols": ["rbd", "nbd"],
        }
    )
    assert lab.storage_roots == ("/tmp/pvc-lab",) and lab.emulators == POLICY.emulators
    for xml in (
        domain(os="<kernel>/tmp/pvc-lab/vmlinuz</kernel>"),
        domain("<interface type='ethernet'/>"),
        domain("<filesystem type='mount'><source dir='/tmp/pvc-lab/share'/><target dir='s'/></filesystem>"),
        domain(extra="<qemu:commandline/>"),
        domain(extra="<seclabel type='none'/>"),
    ):
        assert refusal(xml, lab) == ""
    # roots replace the defaults
    assert "not under a storage root (/tmp/pvc-lab)" in refusal(CLUSTER_VM, lab)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"storage_roots": "/srv"}, "domain_policy.storage_roots: '/srv' is not a list of non-empty strings"),
        ({"storage_roots": ["srv"]}, "is not an absolute path without '..'"),
        ({"emulators": ["/usr/../tmp/qemu"]}, "is not an absolute path without '..'"),
        ({"seclabel": "yes"}, "domain_policy.seclabel: 'yes' is not true or false"),
        ({"hostdev": True}, "domain_policy.hostdev: unknown key"),
    ],
)
def test_bad_policy_options_say_what_is_accepted(options, message):
    with pytest.raises(PolicyError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        DomainPolicy.from_options(options)
