"""pytest fixtures for the lab. tests/conftest.py imports them, once for the whole test tree: a
session fixture imported by two conftests would be two fixtures, and the second would bring up a
second lab in the same namespaces and workdir. So tests/lab and tests/rollout share one lab.

* `lab` (session): a 3-host Lab, up for the whole session and taken down at its end, even when
  tests fail. Workdir: $PVC_LAB_WORKDIR or /tmp/pvc-cluster/pytest-lab (the QEMU capabilities cache
  beside it, /tmp/pvc-cluster/caps-cache, is shared with `make lab-up`). $PVC_LAB_PREFIX
  (development): the namespaces' prefix instead of `lab`, with a workdir of its own by default
  (/tmp/pvc-cluster/pytest-lab-PREFIX), so that the tests can run while another lab is up. Guests may use the bridge
  `lab.vm_bridge` ("br-vm"), present on every host. A machine that cannot run the lab (not root, no
  namespaces, missing packages) FAILS the tests that use it, with the reason: it never skips.
* `lab_guests` (session): what the lab's real guests need (guests.LabGuests: the guest image, the
  shared storage, a TickCollector receiving their ticks); a fixture using it calls its prepare()
  first (cheap once done; it also recovers from a lab taken down and up by a lifecycle test).
* `lab_guest` (function): a factory that starts a small transient guest (a real guest unless
  linux=False); every guest it started is destroyed at teardown, on whichever host it ended up.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from .guests import LabGuests, domain_xml
from .lab import Lab, LabError, LabHost
from .ticks import TickCollector

DEFAULT_WORKDIR = "/tmp/pvc-cluster/pytest-lab"
VM_BRIDGE = "br-vm"
_DEFAULT = object()


def lab_workdir_and_prefix() -> tuple[Path, str]:
    """Where the session's lab lives and its namespaces' prefix (see the module docstring)."""
    prefix = os.environ.get("PVC_LAB_PREFIX") or "lab"
    default = DEFAULT_WORKDIR if prefix == "lab" else f"{DEFAULT_WORKDIR}-{prefix}"
    return Path(os.environ.get("PVC_LAB_WORKDIR") or default), prefix


@pytest.fixture(scope="session")
def lab():
    try:
        Lab.preflight()
    except LabError as exc:
        pytest.fail(f"{exc}. The lab tests need a root Debian machine set up by `make setup`.", pytrace=False)
    workdir, prefix = lab_workdir_and_prefix()
    the_lab = Lab(workdir, hosts=3, prefix=prefix, vm_bridge=VM_BRIDGE)
    try:
        the_lab.up()
    except LabError as exc:
        pytest.fail(f"lab up failed: {exc}", pytrace=False)
    try:
        yield the_lab
    finally:
        the_lab.down()


@pytest.fixture(scope="session")
def lab_guests(lab):
    collector = TickCollector(lab)
    guests = LabGuests(lab, collector=collector)
    try:
        guests.prepare()
    except Exception as exc:
        collector.stop()
        pytest.fail(f"the lab's real guests cannot be prepared: {exc}", pytrace=False)
    try:
        yield guests
    finally:
        collector.stop()


@pytest.fixture
def lab_guest(lab, lab_guests):
    """start(host=1, name=None, memory_mib=128, bridge=lab.vm_bridge, linux=True, **settings) -> virDomain

    linux: a real guest (settings: LinuxGuest's, e.g. dirty_mib_s); False: a no-OS guest
    (settings: domain_xml's)."""
    import libvirt

    created: list[str] = []
    conns: dict[int, object] = {}
    lab_guests.prepare()

    def start(
        host: int | LabHost = 1,
        name: str | None = None,
        memory_mib: int = 128,
        bridge=_DEFAULT,
        linux: bool = True,
        **kw,
    ):
        h = host if isinstance(host, LabHost) else lab.host(host)
        name = name or f"guest-{uuid.uuid4().hex[:8]}"
        if bridge is _DEFAULT:
            bridge = lab.vm_bridge
        if h.index not in conns:
            conns[h.index] = h.connect()
        created.append(name)
        if linux:
            xml = lab_guests.xml(name, memory_mib=memory_mib, bridge=bridge, **kw)
        else:
            kw.setdefault("serial_path", lab_guests.console(name))
            xml = domain_xml(name, memory_mib=memory_mib, bridge=bridge, **kw)
        return conns[h.index].createXML(xml, 0)

    yield start

    for conn in conns.values():
        try:
            conn.close()
        except libvirt.libvirtError:
            pass
    if not created or not lab.state_file.exists():
        return
    # every guest it started, on whichever host it ended up; a host whose libvirtd a lifecycle
    # test killed gets it started again, and a guest libvirt does not destroy has its QEMU ended
    # (Lab.reset): what one failed test leaves must not fail the next ones
    lab.reset(names=created)
