"""The hypervisor driver against the libvirt test driver (in process, no libvirtd).

No test sleeps to synchronise: blocking is simulated with threading.Event, and no test asserts on
elapsed time.
"""

from __future__ import annotations

import queue
import signal
import subprocess
import sys
import threading
import time
import uuid as uuidlib

import libvirt
import pytest

from pvc_cluster_common._domain_xml import parse_domain_xml
from pvc_node_daemon.hypervisor import (
    HEALTH_DOWN,
    HEALTH_HUNG,
    HEALTH_OK,
    DomainNotFound,
    DomainRef,
    DomainStatus,
    Hypervisor,
    HypervisorError,
    HypervisorTimeout,
    HypervisorUnavailable,
    PeerUnreachable,
    _guarded,
    find_qemu_pids,
    read_meminfo_mib,
)

_REAL_OPEN = libvirt.open

MEMINFO = """MemTotal:       24576000 kB
MemFree:        10240000 kB
MemAvailable:   20000000 kB
Buffers:          102400 kB
Cached:          2048000 kB
SwapCached:            0 kB
HugePages_Total:       0
"""


def _libvirt_error(message: str) -> libvirt.libvirtError:
    return libvirt.libvirtError(message)


# ---- connection ---------------------------------------------------------------------------------


def test_open_is_idempotent_and_close_disconnects(node_uri):
    driver = Hypervisor(node_uri, call_timeout_s=10.0)
    assert not driver.connected
    assert driver.open() is driver
    first = driver.connection
    driver.open()
    assert driver.connection is first  # never a second connection (test:///file state is per connection)
    assert driver.is_alive()
    assert driver.list_domains() == []
    driver.close()
    driver.close()
    assert not driver.connected
    assert not driver.is_alive()
    with pytest.raises(HypervisorError) as err:
        driver.list_domains()
    assert err.value.op == "list_domains"
    assert "not connected" in str(err.value)


def test_open_unknown_node_file_is_a_hypervisor_error(tmp_path):
    driver = Hypervisor(f"test://{tmp_path}/missing.xml", call_timeout_s=10.0)
    with pytest.raises(HypervisorError) as err:
        driver.open()
    assert err.value.op == "open"
    assert err.value.code is not None
    assert not driver.connected


def test_invalid_call_timeout_rejected(node_uri):
    with pytest.raises(ValueError):
        Hypervisor(node_uri, call_timeout_s=0)


def test_default_test_uri_has_its_running_test_domain():
    with Hypervisor("test:///default", call_timeout_s=10.0) as driver:
        refs = {ref.name: ref for ref in driver.list_domains()}
        assert refs["test"].status.state == "running"
        assert driver.memory_stats(refs["test"].uuid)["actual"] > 0


# ---- define / undefine / start / create ----------------------------------------------------------


def test_define_then_undefine(hv, make_domain_xml):
    uuid, xml = make_domain_xml("vm1")
    assert hv.define(xml) == uuid
    assert hv.exists(uuid)
    assert hv.status(uuid) == DomainStatus("shutoff", libvirt.VIR_DOMAIN_SHUTOFF_UNKNOWN)
    assert hv.list_domains() == [DomainRef(uuid, "vm1", hv.status(uuid))]
    assert hv.list_domains(active_only=True) == []
    hv.undefine(uuid)
    assert not hv.exists(uuid)
    assert hv.status(uuid) is None
    assert hv.list_domains() == []


def test_define_accepts_uppercase_uuid_and_reports_lowercase(hv, make_domain_xml):
    uuid = str(uuidlib.uuid4())
    _, xml = make_domain_xml("vm1", uuid=uuid.upper())
    assert hv.define(xml) == uuid
    assert hv.exists(uuid.upper())


def test_define_invalid_xml_names_the_op(hv):
    with pytest.raises(HypervisorError) as err:
        hv.define("<domain type='test'><name>x</name></domain>")
    assert err.value.op == "define"
    assert err.value.domain is None
    assert err.value.code == libvirt.VIR_ERR_XML_ERROR
    assert str(err.value).startswith("define failed: ")


def test_start_a_defined_domain(hv, make_domain_xml):
    uuid, xml = make_domain_xml("vm1")
    hv.define(xml)
    hv.start(uuid)
    status = hv.status(uuid)
    assert status.state == "running" and status.running
    assert status.reason_name == "booted"
    assert str(status) == "running (booted)"
    assert [ref.uuid for ref in hv.list_domains(active_only=True)] == [uuid]
    with pytest.raises(HypervisorError) as err:
        hv.start(uuid)  # already running: libvirt says so, the driver does not hide it
    assert err.value.op == "start" and "already running" in err.value.message


def test_create_transient_domain_and_destroy_it(hv, make_domain_xml):
    uuid, xml = make_domain_xml("vm1")
    assert hv.create(xml) == uuid
    assert hv.status(uuid).state == "running"
    assert not hv.connection.lookupByUUIDString(uuid).isPersistent()
    assert hv.destroy(uuid) is True
    assert hv.status(uuid) is None  # a transient domain is gone once stopped
    assert hv.destroy(uuid) is False  # idempotent
    assert not hv.exists(uuid)


def test_destroy_persistent_domain_is_idempotent(hv, make_domain_xml):
    uuid, xml = make_domain_xml("vm1")
    hv.define(xml)
    assert hv.destroy(uuid) is False  # never started
    hv.start(uuid)
    assert hv.destroy(uuid) is True
    status = hv.status(uuid)
    assert (status.state, status.reason_name) == ("shutoff", "destroyed")
    assert hv.destroy(uuid) is False


def test_undefine_running_domain_makes_it_transient(hv, make_domain_xml):
    uuid, xml = make_domain_xml("vm1")
    hv.define(xml)
    hv.start(uuid)
    hv.undefine(uuid)
    assert hv.status(uuid).state == "running"
    assert hv.destroy(uuid) is True
    assert not hv.exists(uuid)


# ---- states --------------------------------------------------------------------------------------


def test_status_names_and_reasons(hv, make_domain_xml):
    uuid, xml = make_domain_xml("vm1")
    hv.define(xml)
    dom = hv.connection.lookupByUUIDString(uuid)
    assert hv.status(uuid).state == "shutoff"
    hv.start(uuid)
    assert hv.status(uuid).state == "running"
    dom.suspend()
    status = hv.status(uuid)
    assert (status.state, status.reason_name) == ("paused", "user")
    assert not status.running
    dom.resume()
    assert (hv.status(uuid).state, hv.status(uuid).reason_name) == ("running", "unpaused")


@pytest.mark.parametrize(
    ("code", "name"),
    [
        (libvirt.VIR_DOMAIN_NOSTATE, "nostate"),
        (libvirt.VIR_DOMAIN_RUNNING, "running"),
        (libvirt.VIR_DOMAIN_BLOCKED, "blocked"),
        (libvirt.VIR_DOMAIN_PAUSED, "paused"),
        (libvirt.VIR_DOMAIN_SHUTDOWN, "shutdown"),
        (libvirt.VIR_DOMAIN_SHUTOFF, "shutoff"),
        (libvirt.VIR_DOMAIN_CRASHED, "crashed"),
        (libvirt.VIR_DOMAIN_PMSUSPENDED, "pmsuspended"),
    ],
)
def test_state_names(code, name):
    assert DomainStatus.from_libvirt(code, 0).state == name


@pytest.mark.parametrize(
    ("state", "reason", "name"),
    [
        (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_MIGRATION, "migration"),
        (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_MIGRATED, "migrated"),
        (libvirt.VIR_DOMAIN_SHUTDOWN, libvirt.VIR_DOMAIN_SHUTDOWN_USER, "user"),
        (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_CRASHED, "crashed"),
        (libvirt.VIR_DOMAIN_CRASHED, libvirt.VIR_DOMAIN_CRASHED_PANICKED, "panicked"),
        (libvirt.VIR_DOMAIN_RUNNING, 999, "reason 999"),
    ],
)
def test_reason_names(state, reason, name):
    assert DomainStatus.from_libvirt(state, reason).reason_name == name


def test_unknown_state_code_is_nostate():
    assert DomainStatus.from_libvirt(99, 0).state == "nostate"


# ---- shutdown ------------------------------------------------------------------------------------


@pytest.mark.parametrize("events", [True, False], ids=["events", "polling"])
def test_clean_shutdown(node_uri, make_domain_xml, events):
    with Hypervisor(node_uri, call_timeout_s=10.0, events=events) as hv:
        uuid, xml = make_domain_xml("vm1")
        hv.define(xml)
        hv.start(uuid)
        assert hv.shutdown(uuid, timeout_s=30.0) is True
        status = hv.status(uuid)
        assert (status.state, status.reason_name) == ("shutoff", "shutdown")
        assert hv.shutdown(uuid, timeout_s=30.0) is True  # already off


def test_shutdown_of_transient_and_unknown_domains(hv, make_domain_xml):
    uuid, xml = make_domain_xml("vm1")
    hv.create(xml)
    assert hv.shutdown(uuid, timeout_s=30.0) is True
    assert hv.status(uuid) is None
    assert hv.shutdown(str(uuidlib.uuid4()), timeout_s=30.0) is True


def test_shutdown_times_out_without_forcing(hv, make_domain_xml, monkeypatch):
    uuid, xml = make_domain_xml("vm1")
    hv.create(xml)
    requested = threading.Event()
    # A guest that ignores the shutdown request.
    monkeypatch.setattr(libvirt.virDomain, "shutdown", lambda self: requested.set() or 0)
    assert hv.shutdown(uuid, timeout_s=0.3) is False
    assert requested.is_set()
    assert hv.status(uuid).state == "running"  # not forced


@pytest.mark.parametrize("events", [True, False], ids=["events", "polling"])
def test_shutdown_returns_when_the_domain_stops_later(node_uri, make_domain_xml, monkeypatch, events):
    with Hypervisor(node_uri, call_timeout_s=10.0, events=events, poll_interval_s=0.05) as hv:
        uuid, xml = make_domain_xml("vm1")
        hv.define(xml)
        hv.start(uuid)
        requested = threading.Event()
        monkeypatch.setattr(libvirt.virDomain, "shutdown", lambda self: requested.set() or 0)

        def guest_powers_off_later():
            requested.wait(30)
            hv.connection.lookupByUUIDString(uuid).destroy()

        thread = threading.Thread(target=guest_powers_off_later)
        thread.start()
        try:
            assert hv.shutdown(uuid, timeout_s=60.0) is True
        finally:
            thread.join(30)
        assert hv.status(uuid).state == "shutoff"


def test_lifecycle_listener_receives_events(hv, make_domain_xml):
    seen: queue.Queue = queue.Queue()
    hv.add_lifecycle_listener(lambda uuid, event, detail: seen.put((uuid, event)))
    uuid, xml = make_domain_xml("vm1")
    hv.create(xml)
    assert seen.get(timeout=10) == (uuid, "started")
    hv.destroy(uuid)
    assert seen.get(timeout=10) == (uuid, "stopped")


# ---- figures -------------------------------------------------------------------------------------


def test_memory_and_vcpus(hv, make_domain_xml):
    uuid, xml = make_domain_xml("vm1", memory="1", unit="GiB", vcpus=4, vcpus_current=2)
    hv.define(xml)
    assert hv.memory_mib(uuid) == (1024, 1024)
    assert hv.vcpus(uuid) == 2  # the current count
    uuid2, xml2 = make_domain_xml("vm2", memory="524288", unit=None, current="262144", vcpus=2)
    hv.create(xml2)
    assert hv.memory_mib(uuid2) == (256, 512)  # (balloon, maximum)
    assert hv.vcpus(uuid2) == 2


def test_running_figures_in_one_listing(hv, make_domain_xml):
    defined, _ = make_domain_xml("off", memory="2", unit="GiB")
    hv.define(_)
    running, xml = make_domain_xml("on", memory="524288", unit=None, current="262144", vcpus=4, vcpus_current=3)
    hv.create(xml)
    paused, xml2 = make_domain_xml("held", memory="768", unit="MiB", vcpus=1)
    hv.create(xml2)
    hv.connection.lookupByUUIDString(paused).suspend()
    figures = hv.running_figures()
    assert set(figures) == {running, paused}  # only active domains
    status, maximum, vcpus = figures[running]
    assert (
        (status.state, maximum, vcpus)
        == ("running", 512, 3)
        == ("running", hv.memory_mib(running)[1], hv.vcpus(running))
    )
    assert (figures[paused][0].state, figures[paused][1]) == ("paused", 768)


def test_xml_round_trip(hv, make_domain_xml):
    uuid, xml = make_domain_xml("vm1", memory="3", unit="GB", bridges=("br-vm0", "br-vm1"))
    hv.define(xml)
    live = hv.xml(uuid)
    info = parse_domain_xml(live)
    assert (info.uuid, info.name) == (uuid, "vm1")
    assert info.memory_mib == parse_domain_xml(xml).memory_mib == hv.memory_mib(uuid)[1]
    assert info.bridges == ("br-vm0", "br-vm1")
    assert parse_domain_xml(hv.xml(uuid, migratable=True)).uuid == uuid


def test_memory_stats_for_running_domain(hv, make_domain_xml, monkeypatch):
    uuid, xml = make_domain_xml("vm1")
    hv.create(xml)
    calls = []
    original = libvirt.virDomain.memoryStats

    def recording(self):
        calls.append(self.UUIDString())
        return original(self)

    monkeypatch.setattr(libvirt.virDomain, "memoryStats", recording)
    assert isinstance(hv.memory_stats(uuid), dict)
    assert calls == [uuid]


@pytest.fixture
def forbid_memory_stats(monkeypatch):
    """memoryStats() must not be called: it records the call and would block (as on a paused QEMU)."""
    calls = []

    def forbidden(self):
        calls.append(self.UUIDString())
        raise AssertionError("memoryStats() called on a domain that is not running")

    monkeypatch.setattr(libvirt.virDomain, "memoryStats", forbidden)
    return calls


def test_memory_stats_skips_paused_domain_without_calling_libvirt(hv, make_domain_xml, forbid_memory_stats):
    uuid, xml = make_domain_xml("vm1")
    hv.create(xml)
    hv.connection.lookupByUUIDString(uuid).suspend()
    assert hv.memory_stats(uuid) is None
    assert forbid_memory_stats == []


def test_memory_stats_skips_incoming_migration_without_calling_libvirt(
    hv, make_domain_xml, forbid_memory_stats, monkeypatch
):
    # The destination of a live migration is active but paused (reason "migration").
    uuid, xml = make_domain_xml("vm1")
    hv.create(xml)
    monkeypatch.setattr(
        libvirt.virDomain,
        "state",
        lambda self, flags=0: [libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_MIGRATION],
    )
    assert hv.status(uuid).reason_name == "migration"
    assert hv.memory_stats(uuid) is None
    assert forbid_memory_stats == []


def test_memory_stats_skips_a_domain_with_a_background_job_without_calling_libvirt(
    hv, make_domain_xml, forbid_memory_stats, monkeypatch
):
    # The source of a live migration: running, with the migration as its background job.
    uuid, xml = make_domain_xml("vm1")
    hv.create(xml)
    monkeypatch.setattr(libvirt.virDomain, "controlInfo", lambda self, flags=0: [libvirt.VIR_DOMAIN_CONTROL_JOB, 0, 0])
    assert hv.status(uuid).state == "running"
    assert hv.memory_stats(uuid) is None
    assert forbid_memory_stats == []


def _wait_until(predicate, timeout_s: float = 30.0) -> bool:
    """Poll ``predicate`` (a driver's own bookkeeping, which announces nothing) until it holds or
    the deadline passes; whether it held."""
    deadline = time.monotonic() + timeout_s
    pause = threading.Event()  # never set: a bounded wait between two looks
    while not predicate():
        if time.monotonic() > deadline:
            return False
        pause.wait(0.01)
    return True


def test_memory_stats_skips_a_domain_this_driver_migrates_away(hv, make_domain_xml, monkeypatch):
    # libvirt runs a migration as an asynchronous job, which controlInfo() does not report (it
    # says "ok"): the driver's own migrate() call in flight is what tells.
    uuid, xml = make_domain_xml("vm1")
    hv.create(xml)
    started, release = threading.Event(), threading.Event()
    stats_calls = []
    original = libvirt.virDomain.memoryStats

    def migration(self, dconnuri, params, flags=0):
        started.set()
        release.wait(60)
        return 0

    def recording(self):
        stats_calls.append(self.UUIDString())
        return original(self)

    monkeypatch.setattr(libvirt.virDomain, "migrateToURI3", migration)
    monkeypatch.setattr(libvirt.virDomain, "memoryStats", recording)
    monkeypatch.setattr(libvirt.virDomain, "controlInfo", lambda self, flags=0: [libvirt.VIR_DOMAIN_CONTROL_OK, 0, 0])
    errors = []

    def migrate():
        try:
            hv.migrate(uuid, "qemu+tcp://10.77.0.2/system", timeout_s=60)
        except Exception as exc:  # reported by the assertion below
            errors.append(exc)

    mover = threading.Thread(target=migrate)
    mover.start()
    try:
        assert started.wait(30)
        assert hv.migrating_out(uuid) and hv.migrating_out(uuid.upper())
        assert hv.memory_stats(uuid) is None
        assert stats_calls == []
    finally:
        release.set()
        mover.join(60)
    assert errors == [] and not mover.is_alive()
    assert not hv.migrating_out(uuid)
    assert isinstance(hv.memory_stats(uuid), dict)
    assert stats_calls == [uuid]


def test_an_abandoned_migrate_call_is_migrating_until_libvirt_returns(hv, make_domain_xml, monkeypatch):
    uuid, xml = make_domain_xml("vm1")
    hv.create(xml)
    release = threading.Event()
    monkeypatch.setattr(
        libvirt.virDomain, "migrateToURI3", lambda self, dconnuri, params, flags=0: release.wait(60) and 0
    )
    hv.abort_wait_s = 0.2
    try:
        with pytest.raises(HypervisorTimeout):
            hv.migrate(uuid, "qemu+tcp://10.77.0.2/system", timeout_s=0.2)  # abortJob: unsupported here
        # the call is still in libvirt: the domain may still be leaving
        assert hv.migrating_out(uuid)
    finally:
        release.set()
    assert _wait_until(lambda: not hv.migrating_out(uuid))


def test_a_failed_migration_is_not_migrating_any_more(hv, make_domain_xml):
    uuid, xml = make_domain_xml("vm1")
    hv.create(xml)
    with pytest.raises(HypervisorError):
        hv.migrate(uuid, "test:///default")  # the test driver cannot migrate
    assert not hv.migrating_out(uuid)


def test_memory_stats_skips_shut_off_and_unknown_domains(hv, make_domain_xml, forbid_memory_stats):
    uuid, xml = make_domain_xml("vm1")
    hv.define(xml)
    assert hv.memory_stats(uuid) is None
    assert hv.memory_stats(str(uuidlib.uuid4())) is None
    assert forbid_memory_stats == []


def test_memory_stats_none_when_domain_stops_between_state_and_stats(hv, make_domain_xml, monkeypatch):
    uuid, xml = make_domain_xml("vm1")
    hv.define(xml)
    hv.start(uuid)
    original = libvirt.virDomain.memoryStats

    def stops_first(self):
        self.destroy()
        return original(self)  # "domain is not running"

    monkeypatch.setattr(libvirt.virDomain, "memoryStats", stops_first)
    assert hv.memory_stats(uuid) is None


def test_host_cpus(hv):
    assert hv.host_cpus() == 4


def test_test_driver_host_memory_is_its_node_xml(hv, make_domain_xml):
    # the test driver has no virNodeGetMemoryStats: its "host" is the <node> of its XML (8 GiB)
    with pytest.raises(libvirt.libvirtError):
        hv.connection.getMemoryStats(libvirt.VIR_NODE_MEMORY_STATS_ALL_CELLS, 0)
    assert hv.host_memory_mib() == (8192, 0, 8192)
    _, xml = make_domain_xml("big", memory="1536", unit="MiB")
    hv.create(xml)
    assert hv.host_memory_mib() == (8192, 1536, 8192 - 1536)


def test_meminfo_parsing(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(MEMINFO)
    total, used, free = read_meminfo_mib(str(meminfo))
    assert total == 24576000 // 1024
    assert free == 10240000 // 1024
    assert used == (24576000 - 10240000 - 102400 - 2048000) // 1024


def test_meminfo_unreadable(tmp_path):
    with pytest.raises(OSError):
        read_meminfo_mib(str(tmp_path / "absent"))


def test_test_driver_host_memory_skips_a_domain_gone_since_the_listing(hv, make_domain_xml, monkeypatch):
    small = make_domain_xml("small", memory="256")
    gone = make_domain_xml("gone", memory="512")
    hv.create(small[1])
    hv.create(gone[1])
    real = libvirt.virDomain.maxMemory

    def max_memory(dom):
        if dom.UUIDString() == gone[0]:  # as if it stopped between the listing and this call
            err = _libvirt_error("Domain not found")
            err.err = (libvirt.VIR_ERR_NO_DOMAIN, 0, "Domain not found", 0, "", "", "", -1, -1)
            raise err
        return real(dom)

    monkeypatch.setattr(libvirt.virDomain, "maxMemory", max_memory)
    assert hv.host_memory_mib() == (8192, 256, 8192 - 256)


def test_host_memory_from_libvirt_when_supported(hv, monkeypatch):
    stats = {"total": 25165824, "free": 4194304, "buffers": 1048576, "cached": 2097152}
    monkeypatch.setattr(libvirt.virConnect, "getMemoryStats", lambda self, cell, flags=0: stats)
    assert hv.host_memory_mib() == (24576, 24576 - 4096 - 1024 - 2048, 4096)


def test_real_proc_meminfo_is_readable():
    total, used, free = read_meminfo_mib()
    assert total > 0 and 0 <= used <= total and 0 <= free <= total


# ---- errors and timeouts -------------------------------------------------------------------------


def test_unknown_domain_is_domain_not_found(hv):
    unknown = str(uuidlib.uuid4())
    assert not hv.exists(unknown)
    assert hv.status(unknown) is None
    with pytest.raises(DomainNotFound) as err:
        hv.memory_mib(unknown)
    assert (err.value.op, err.value.domain, err.value.code) == ("memory_mib", unknown, libvirt.VIR_ERR_NO_DOMAIN)
    assert str(err.value).startswith(f"memory_mib on domain {unknown} failed: ")
    assert "libvirt error 42" in str(err.value)
    for call in (hv.vcpus, hv.xml, hv.start, hv.undefine):
        with pytest.raises(DomainNotFound):
            call(unknown)


def test_malformed_uuid_is_a_hypervisor_error(hv):
    with pytest.raises(HypervisorError) as err:
        hv.status("not-a-uuid")
    assert err.value.code == libvirt.VIR_ERR_INVALID_ARG
    assert not isinstance(err.value, DomainNotFound)


def test_hung_call_raises_timeout_and_is_abandoned(hv, make_domain_xml, monkeypatch):
    uuid, xml = make_domain_xml("vm1")
    hv.create(xml)
    release, entered, finished = threading.Event(), threading.Event(), threading.Event()
    original = libvirt.virDomain.info

    def hanging_info(self):
        entered.set()
        release.wait(60)
        try:
            return original(self)
        finally:
            finished.set()

    monkeypatch.setattr(libvirt.virDomain, "info", hanging_info)
    hv.call_timeout_s = 0.2
    try:
        with pytest.raises(HypervisorTimeout) as err:
            hv.memory_mib(uuid)
        assert isinstance(err.value, HypervisorError)
        assert (err.value.op, err.value.domain) == ("memory_mib", uuid)
        assert "abandoned" in str(err.value)
        assert entered.is_set() and not finished.is_set()
        assert hv.abandoned_calls == 1
        hv.call_timeout_s = 10.0
        # the connection is still usable by other calls while the abandoned one is stuck
        assert hv.status(uuid).state == "running"
    finally:
        release.set()
    assert finished.wait(30)
    assert hv.memory_mib(uuid) == (512, 512)


def test_hung_memory_stats_times_out(hv, make_domain_xml, monkeypatch):
    uuid, xml = make_domain_xml("vm1")
    hv.create(xml)
    release = threading.Event()
    monkeypatch.setattr(libvirt.virDomain, "memoryStats", lambda self: release.wait(60) and {})
    try:
        with pytest.raises(HypervisorTimeout):
            hv.memory_stats(uuid, timeout_s=0.2)
    finally:
        release.set()


def test_threads_share_one_connection(hv, make_domain_xml):
    uuids = []
    for i in range(4):
        uuid, xml = make_domain_xml(f"vm{i}")
        hv.create(xml)
        uuids.append(uuid)
    errors, barrier = [], threading.Barrier(8)

    def worker():
        try:
            barrier.wait(30)
            for _ in range(20):
                assert len(hv.list_domains(active_only=True)) == 4
                for uuid in uuids:
                    assert hv.memory_mib(uuid) == (512, 512)
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []


# ---- migration -----------------------------------------------------------------------------------


def test_migrate_on_test_driver_is_a_hypervisor_error(hv, make_domain_xml):
    uuid, xml = make_domain_xml("vm1")
    hv.create(xml)
    with pytest.raises(HypervisorError) as err:
        hv.migrate(uuid, "test:///default", migration_uri="tcp://10.77.0.2")
    assert err.value.op == "migrate" and err.value.domain == uuid
    assert err.value.code == libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED
    assert str(err.value).startswith(f"migrate on domain {uuid} failed: ")
    assert not isinstance(err.value, HypervisorTimeout)


def test_managed_migrate_on_test_driver_is_a_hypervisor_error(hv, make_domain_xml):
    uuid, xml = make_domain_xml("vm1")
    hv.create(xml)
    with pytest.raises(HypervisorError) as err:
        hv.migrate(uuid, "test:///default", peer_to_peer=False)
    assert err.value.op == "migrate"
    assert hv.status(uuid).state == "running"


def test_migrate_max_downtime_unsupported_names_the_setting(hv, make_domain_xml):
    uuid, xml = make_domain_xml("vm1")
    hv.create(xml)
    with pytest.raises(HypervisorError) as err:
        hv.migrate(uuid, "test:///default", max_downtime_ms=300)
    assert err.value.op == "migrate"
    assert err.value.code == libvirt.VIR_ERR_NO_SUPPORT
    assert "maximum downtime" in str(err.value)


def test_migrate_unknown_domain(hv):
    with pytest.raises(DomainNotFound) as err:
        hv.migrate(str(uuidlib.uuid4()), "test:///default")
    assert err.value.op == "migrate"


@pytest.fixture
def record_migration(monkeypatch):
    calls = []
    monkeypatch.setattr(
        libvirt.virDomain,
        "migrateSetMaxDowntime",
        lambda self, downtime, flags=0: calls.append(("downtime", downtime)) or 0,
    )
    monkeypatch.setattr(
        libvirt.virDomain,
        "migrateToURI3",
        lambda self, dconnuri, params, flags=0: calls.append(("p2p", dconnuri, params, flags)) or 0,
    )
    return calls


@pytest.mark.parametrize("persistent", [True, False], ids=["persistent", "transient"])
def test_migrate_params_and_flags(hv, make_domain_xml, record_migration, persistent):
    uuid, xml = make_domain_xml("vm1")
    if persistent:
        hv.define(xml)
        hv.start(uuid)
    else:
        hv.create(xml)
    hv.migrate(uuid, "qemu+tcp://10.77.0.2/system", migration_uri="tcp://10.77.0.2", max_downtime_ms=250)
    flags = libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER
    if persistent:
        flags |= libvirt.VIR_MIGRATE_PERSIST_DEST | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
    assert record_migration == [
        ("downtime", 250),  # set before the job starts
        ("p2p", "qemu+tcp://10.77.0.2/system", {libvirt.VIR_MIGRATE_PARAM_URI: "tcp://10.77.0.2"}, flags),
    ]


def test_migrate_with_auto_converge_asks_libvirt_for_it(hv, make_domain_xml, record_migration):
    uuid, xml = make_domain_xml("vm1")
    hv.create(xml)
    hv.migrate(uuid, "qemu+tcp://10.77.0.2/system", auto_converge=True)
    hv.migrate(uuid, "qemu+tcp://10.77.0.2/system")
    flags = [call[3] for call in record_migration if call[0] == "p2p"]
    assert [bool(f & libvirt.VIR_MIGRATE_AUTO_CONVERGE) for f in flags] == [True, False]
    assert all(f & libvirt.VIR_MIGRATE_LIVE for f in flags)


def test_migrate_with_tls_asks_libvirt_for_it(hv, make_domain_xml, record_migration):
    uuid, xml = make_domain_xml("vm1")
    hv.create(xml)
    hv.migrate(uuid, "qemu+tls://10.77.0.2/system", migration_uri="tcp://10.77.0.2", tls=True)
    hv.migrate(uuid, "qemu+tls://10.77.0.2/system", migration_uri="tcp://10.77.0.2")
    flags = [call[3] for call in record_migration if call[0] == "p2p"]
    assert [bool(f & libvirt.VIR_MIGRATE_TLS) for f in flags] == [True, False]  # only when asked
    assert all(f & libvirt.VIR_MIGRATE_LIVE and f & libvirt.VIR_MIGRATE_PEER2PEER for f in flags)


def test_migrate_offline_style_flags(hv, make_domain_xml, record_migration):
    uuid, xml = make_domain_xml("vm1")
    hv.create(xml)
    hv.migrate(uuid, "qemu+unix:///system?socket=/tmp/b/libvirt-sock", live=False)
    assert record_migration == [
        ("p2p", "qemu+unix:///system?socket=/tmp/b/libvirt-sock", {}, libvirt.VIR_MIGRATE_PEER2PEER)
    ]


def test_migrate_rejects_non_positive_downtime(hv, make_domain_xml, record_migration):
    uuid, xml = make_domain_xml("vm1")
    hv.create(xml)
    with pytest.raises(ValueError):
        hv.migrate(uuid, "test:///default", max_downtime_ms=0)
    assert record_migration == []


def running_after_its_start_event(hv, make_domain_xml, name="vm1", seen: queue.Queue | None = None):
    """A running domain whose `started` event has been delivered (a setup made after that
    is current until the domain's next event), and the queue of later events (``seen``: one
    made by an earlier call, which receives every domain's events)."""
    if seen is None:
        seen = queue.Queue()
        hv.add_lifecycle_listener(lambda uuid, event, detail: seen.put((uuid, event)))
    uuid, xml = make_domain_xml(name)
    hv.create(xml)
    assert seen.get(timeout=10) == (uuid, "started")
    return uuid, seen


@pytest.fixture
def count_lookups(monkeypatch):
    lookups = []
    real = libvirt.virConnect.lookupByUUIDString
    monkeypatch.setattr(
        libvirt.virConnect, "lookupByUUIDString", lambda self, uuid: lookups.append(uuid) or real(self, uuid)
    )
    return lookups


def test_migrate_takes_a_current_setup_without_calling_libvirt_again(
    hv, make_domain_xml, record_migration, count_lookups
):
    uuid, _ = running_after_its_start_event(hv, make_domain_xml)
    setup = hv.prepare_migration(uuid, 250)
    assert (setup.uuid, setup.max_downtime_ms, setup.persistent) == (uuid, 250, False)
    assert record_migration == [("downtime", 250)] and count_lookups == [uuid]
    hv.migrate(uuid, "qemu+tcp://10.77.0.2/system", max_downtime_ms=250, setup=setup)
    assert count_lookups == [uuid]  # not looked up again, and the downtime not set again
    assert record_migration == [
        ("downtime", 250),
        ("p2p", "qemu+tcp://10.77.0.2/system", {}, libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER),
    ]


def test_a_setup_is_made_again_after_a_lifecycle_event_of_its_domain(hv, make_domain_xml, record_migration):
    uuid, seen = running_after_its_start_event(hv, make_domain_xml)
    other, _ = running_after_its_start_event(hv, make_domain_xml, "vm2", seen)
    setup = hv.prepare_migration(uuid, 250)
    hv.connection.lookupByUUIDString(other).suspend()  # another domain's event changes nothing
    assert seen.get(timeout=10) == (other, "suspended")
    assert hv.setup_is_current(setup, uuid, 250)
    hv.connection.lookupByUUIDString(uuid).suspend()
    hv.connection.lookupByUUIDString(uuid).resume()
    assert [seen.get(timeout=10) for _ in range(2)] == [(uuid, "suspended"), (uuid, "resumed")]
    assert not hv.setup_is_current(setup, uuid, 250)
    hv.migrate(uuid, "qemu+tcp://10.77.0.2/system", max_downtime_ms=250, setup=setup)
    assert [call[0] for call in record_migration] == ["downtime", "downtime", "p2p"]  # applied again


def test_a_setup_for_another_downtime_or_domain_is_not_current(hv, make_domain_xml, record_migration):
    uuid, seen = running_after_its_start_event(hv, make_domain_xml)
    other, _ = running_after_its_start_event(hv, make_domain_xml, "vm2", seen)
    setup = hv.prepare_migration(uuid, 250)
    assert hv.setup_is_current(setup, uuid, 250)
    assert not hv.setup_is_current(setup, uuid, 500)
    assert not hv.setup_is_current(setup, other, 250)
    hv.migrate(uuid, "qemu+tcp://10.77.0.2/system", max_downtime_ms=500, setup=setup)
    assert [call[:2] for call in record_migration] == [
        ("downtime", 250),
        ("downtime", 500),
        ("p2p", "qemu+tcp://10.77.0.2/system"),
    ]


def test_without_lifecycle_events_no_setup_is_current(node_uri, make_domain_xml, record_migration):
    # a stop and start could not be noticed
    with Hypervisor(node_uri, call_timeout_s=10.0, events=False) as hv:
        uuid, xml = make_domain_xml("vm1")
        hv.create(xml)
        setup = hv.prepare_migration(uuid, 250)
        assert not hv.setup_is_current(setup, uuid, 250)


def test_a_setup_from_a_closed_connection_is_not_current(node_uri, make_domain_xml, record_migration):
    with Hypervisor(node_uri, call_timeout_s=10.0) as hv:
        uuid, _ = running_after_its_start_event(hv, make_domain_xml)
        setup = hv.prepare_migration(uuid, 250)
        hv.close()
        hv.open()
        assert not hv.setup_is_current(setup, uuid, 250)


def test_prepare_migration_errors_are_migrate_errors(hv, make_domain_xml):
    with pytest.raises(DomainNotFound) as err:
        hv.prepare_migration(str(uuidlib.uuid4()), 250)
    assert err.value.op == "migrate"
    uuid, xml = make_domain_xml("vm1")
    hv.create(xml)
    with pytest.raises(HypervisorError) as err:  # the test driver has no maximum downtime
        hv.prepare_migration(uuid, 300)
    assert err.value.op == "migrate" and err.value.code == libvirt.VIR_ERR_NO_SUPPORT
    assert "cannot set the maximum downtime to 300 ms" in str(err.value)
    with pytest.raises(ValueError):
        hv.prepare_migration(uuid, 0)
    assert hv.prepare_migration(uuid).persistent is False  # without a downtime: nothing to set


def test_managed_migrate_uses_a_destination_connection(hv, make_domain_xml, monkeypatch):
    uuid, xml = make_domain_xml("vm1")
    hv.create(xml)
    seen = []

    def fake_migrate3(self, dconn, params, flags=0):
        seen.append((dconn.getURI(), params, flags))
        return self

    monkeypatch.setattr(libvirt.virDomain, "migrate3", fake_migrate3)
    hv.migrate(uuid, "test:///default", migration_uri="tcp://10.77.0.2", peer_to_peer=False)
    assert seen == [("test:///default", {libvirt.VIR_MIGRATE_PARAM_URI: "tcp://10.77.0.2"}, libvirt.VIR_MIGRATE_LIVE)]


def test_migrate_timeout_aborts_the_job(hv, make_domain_xml, monkeypatch):
    uuid, xml = make_domain_xml("vm1")
    hv.create(xml)
    started, aborted = threading.Event(), threading.Event()

    def slow_migration(self, dconnuri, params, flags=0):
        started.set()
        if not aborted.wait(60):
            return 0
        raise _libvirt_error("operation aborted: migration out job: canceled by client")

    monkeypatch.setattr(libvirt.virDomain, "migrateToURI3", slow_migration)
    monkeypatch.setattr(libvirt.virDomain, "abortJob", lambda self, flags=0: aborted.set() or 0)
    with pytest.raises(HypervisorTimeout) as err:
        hv.migrate(uuid, "qemu+tcp://10.77.0.2/system", timeout_s=0.2)
    assert started.is_set() and aborted.is_set()
    assert err.value.op == "migrate" and err.value.domain == uuid
    assert "the job was aborted" in str(err.value)
    assert "canceled by client" in str(err.value)


def test_migrate_that_completes_while_being_aborted_succeeds(hv, make_domain_xml, monkeypatch):
    uuid, xml = make_domain_xml("vm1")
    hv.create(xml)
    abort_requested = threading.Event()
    monkeypatch.setattr(
        libvirt.virDomain, "migrateToURI3", lambda self, dconnuri, params, flags=0: abort_requested.wait(60) and 0
    )
    monkeypatch.setattr(libvirt.virDomain, "abortJob", lambda self, flags=0: abort_requested.set() or 0)
    hv.migrate(uuid, "qemu+tcp://10.77.0.2/system", timeout_s=0.2)  # no exception
    assert abort_requested.is_set()


def test_migrate_timeout_when_abort_is_unsupported(hv, make_domain_xml, monkeypatch):
    uuid, xml = make_domain_xml("vm1")
    hv.create(xml)
    release = threading.Event()
    monkeypatch.setattr(
        libvirt.virDomain, "migrateToURI3", lambda self, dconnuri, params, flags=0: release.wait(60) and 0
    )
    hv.abort_wait_s = 0.2  # how long the driver waits for the migrate call after the abort
    try:
        with pytest.raises(HypervisorTimeout) as err:
            hv.migrate(uuid, "qemu+tcp://10.77.0.2/system", timeout_s=0.2)  # abortJob: unsupported here
        assert "aborting the job failed" in str(err.value)
        assert "abandoned" in str(err.value)
        assert hv.abandoned_calls == 1
    finally:
        release.set()


# ---- a supervised connection: lost, hung, replaced ---------------------------------------------


class HealthLog:
    """What a supervised driver told its listeners, with waits bounded by a deadline."""

    def __init__(self, hv: Hypervisor) -> None:
        self.changes: list[tuple[str, str]] = []
        self.reconnects = 0
        self._cond = threading.Condition()
        hv.add_health_listener(self._health)
        hv.add_reconnect_listener(self._reconnected)

    def _health(self, health: str, reason: str) -> None:
        with self._cond:
            self.changes.append((health, reason))
            self._cond.notify_all()

    def _reconnected(self) -> None:
        with self._cond:
            self.reconnects += 1
            self._cond.notify_all()

    def wait_health(self, health: str, timeout_s: float = 30.0) -> str:
        with self._cond:
            assert self._cond.wait_for(lambda: any(h == health for h, _ in self.changes), timeout_s), self.changes
            return next(reason for h, reason in self.changes if h == health)

    def wait_reconnects(self, count: int, timeout_s: float = 30.0) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: self.reconnects >= count, timeout_s), self.changes


@pytest.fixture
def supervised(node_uri):
    with Hypervisor(
        node_uri, call_timeout_s=10.0, reconnect=True, reconnect_delay_s=0.01, reconnect_max_delay_s=0.05
    ) as driver:
        yield driver


def test_a_call_on_a_dead_connection_is_unavailable_and_the_driver_reconnects(supervised, make_domain_xml, monkeypatch):
    hv = supervised
    health = HealthLog(hv)
    dead = hv.connection
    first = hv.generation
    # libvirt fails the call and says the connection is no longer alive (libvirtd went away)
    monkeypatch.setattr(libvirt.virConnect, "isAlive", lambda self: 0 if self is dead else 1)
    monkeypatch.setattr(
        libvirt.virConnect,
        "listAllDomains",
        lambda self, flags=0: (_ for _ in ()).throw(_libvirt_error("client socket is closed")),
    )
    with pytest.raises(HypervisorUnavailable) as err:
        hv.list_domains()
    assert isinstance(err.value, HypervisorError) and err.value.op == "list_domains"
    assert "lost" in str(err.value)
    monkeypatch.undo()
    health.wait_reconnects(1)
    assert hv.generation == first + 1 and hv.connection is not dead
    assert hv.health == HEALTH_OK and hv.reconnects == 1
    assert health.wait_health(HEALTH_DOWN).startswith("the connection failed")
    assert health.changes[-1][0] == HEALTH_OK
    # the new connection has the lifecycle events registered again
    events: queue.Queue = queue.Queue()
    hv.add_lifecycle_listener(lambda uuid, event, _detail: events.put((uuid, event)))
    uuid, xml = make_domain_xml("after")
    hv.create(xml)
    assert events.get(timeout=30) == (uuid, "started")
    assert hv.status(uuid).running


def test_while_libvirtd_is_gone_calls_fail_at_once_and_the_close_callback_starts_a_reconnect(
    supervised, make_domain_xml, monkeypatch
):
    hv = supervised
    health = HealthLog(hv)
    uuid, xml = make_domain_xml("vm1")
    hv.create(xml)
    refused = threading.Event()

    def no_libvirtd(uri):
        refused.set()
        raise _libvirt_error("Failed to connect socket: Connection refused")

    monkeypatch.setattr(libvirt, "open", no_libvirtd)
    lookups = []
    original_lookup = libvirt.virConnect.lookupByUUIDString
    monkeypatch.setattr(
        libvirt.virConnect, "lookupByUUIDString", lambda self, u: lookups.append(u) or original_lookup(self, u)
    )
    # what libvirt's event loop calls when libvirtd closes the socket
    hv._on_close(hv.connection, libvirt.VIR_CONNECT_CLOSE_REASON_EOF, None)
    assert refused.wait(30)
    assert hv.health == HEALTH_DOWN and not hv.connected
    for call in (lambda: hv.status(uuid), hv.list_domains, lambda: hv.create(xml), lambda: hv.destroy(uuid)):
        with pytest.raises(HypervisorUnavailable) as err:
            call()
        assert "not connected" in str(err.value)
    assert lookups == []  # nothing reached libvirt
    assert not hv.is_alive()
    assert "libvirtd went away" in health.wait_health(HEALTH_DOWN)
    monkeypatch.setattr(libvirt, "open", _REAL_OPEN)  # libvirtd is back
    health.wait_reconnects(1)
    assert hv.health == HEALTH_OK
    assert hv.list_domains() == []  # a test:/// file host starts empty on a new connection


def test_a_close_callback_of_a_replaced_connection_changes_nothing(supervised):
    hv = supervised
    health = HealthLog(hv)
    old = hv.connection
    hv._on_close(old, libvirt.VIR_CONNECT_CLOSE_REASON_KEEPALIVE, None)
    health.wait_reconnects(1)
    assert "keepalive" in health.wait_health(HEALTH_DOWN)
    generation, current = hv.generation, hv.connection
    hv._on_close(old, libvirt.VIR_CONNECT_CLOSE_REASON_CLIENT, None)  # the old one, closed late
    assert hv.generation == generation and hv.connection is current and hv.health == HEALTH_OK
    assert health.reconnects == 1


def test_a_hung_libvirtd_is_found_by_a_probe_and_the_connection_replaced(supervised, make_domain_xml, monkeypatch):
    hv = supervised
    health = HealthLog(hv)
    uuid, xml = make_domain_xml("vm1")
    hv.create(xml)
    stopped = threading.Event()  # set: libvirtd answers again (SIGCONT)
    opens = threading.Event()

    def hang(*_args, **_kwargs):
        stopped.wait(60)
        raise _libvirt_error("libvirtd resumed too late")

    def open_while_stopped(uri):
        opens.set()
        stopped.wait(60)
        return _REAL_OPEN(uri)

    monkeypatch.setattr(libvirt.virDomain, "info", hang)
    monkeypatch.setattr(libvirt.virConnect, "getLibVersion", hang)
    monkeypatch.setattr(libvirt, "open", open_while_stopped)
    hv.call_timeout_s = 0.3
    try:
        with pytest.raises(HypervisorTimeout):
            hv.memory_mib(uuid)
        assert "probe" in health.wait_health(HEALTH_HUNG)
        assert opens.wait(30)  # replacing it, while libvirtd still does not answer
        with pytest.raises(HypervisorUnavailable):
            hv.status(uuid)
    finally:
        stopped.set()
    monkeypatch.undo()
    health.wait_reconnects(1)
    assert hv.health == HEALTH_OK


def test_close_ends_the_supervision(node_uri, monkeypatch):
    hv = Hypervisor(node_uri, call_timeout_s=10.0, reconnect=True, reconnect_delay_s=0.01, reconnect_max_delay_s=0.05)
    hv.open()
    attempts = threading.Semaphore(0)

    def refused(uri):
        attempts.release()
        raise _libvirt_error("Connection refused")

    monkeypatch.setattr(libvirt, "open", refused)
    hv._on_close(hv.connection, libvirt.VIR_CONNECT_CLOSE_REASON_EOF, None)
    assert attempts.acquire(timeout=30) and attempts.acquire(timeout=30)  # retrying
    hv.close()
    assert hv.health == HEALTH_DOWN and not hv.connected
    supervisors = [t for t in threading.enumerate() if t.name == "libvirt-reconnect"]
    for thread in supervisors:
        thread.join(30)
    assert not any(t.is_alive() for t in supervisors)


def test_reconnect_delays_must_make_sense(node_uri):
    with pytest.raises(ValueError):
        Hypervisor(node_uri, reconnect=True, reconnect_delay_s=0)
    with pytest.raises(ValueError):
        Hypervisor(node_uri, reconnect=True, reconnect_delay_s=2, reconnect_max_delay_s=1)


def test_a_call_on_a_connection_closed_under_it_is_unavailable(supervised, monkeypatch):
    """A connection lost and retired (closed) while a call was about to use it: libvirt says
    "invalid connection pointer", and the caller learns that the connection is gone."""
    hv = supervised
    health = HealthLog(hv)
    conn, generation = hv._connection("list_domains", None)
    refused = threading.Event()
    monkeypatch.setattr(libvirt, "open", lambda uri: refused.set() or (_ for _ in ()).throw(_libvirt_error("refused")))
    conn.close()  # what retiring a lost connection does
    with pytest.raises(HypervisorUnavailable):
        hv._run("list_domains", None, _guarded(conn, lambda: conn.listAllDomains(0)), None, generation=generation)
    assert refused.wait(30) and not hv.connected
    monkeypatch.setattr(libvirt, "open", _REAL_OPEN)
    health.wait_reconnects(1)


# ---- other nodes --------------------------------------------------------------------------------


def test_a_peer_on_an_in_process_driver_cannot_be_asked(hv, node_uri):
    # a connection from here to a test: URI would open a private, empty "host", never the peer's
    with pytest.raises(PeerUnreachable):
        hv.peer_status(node_uri, str(uuidlib.uuid4()))


def test_a_peer_libvirt_that_refuses_is_a_hypervisor_error(hv):
    # port 1 on loopback: the connection is refused at once, nothing leaves the host
    with pytest.raises(HypervisorError) as caught:
        hv.peer_status("qemu+tcp://127.0.0.1:1/system", str(uuidlib.uuid4()), call_timeout_s=5.0)
    assert not isinstance(caught.value, PeerUnreachable)


def test_no_migration_job_moves_on_an_idle_or_unknown_domain(hv, make_domain_xml):
    uuid, xml = make_domain_xml()
    hv.create(xml)
    assert hv.migration_job_moving(uuid) is False
    assert hv.migration_job_moving(str(uuidlib.uuid4())) is False
    hv.close()
    assert hv.migration_job_moving(uuid) is False  # no connection: not asked


# ---- a stale incoming copy (stop_stale_copy) ----------------------------------------------------


def _fake_proc(root, own_ns, processes):
    """A /proc with ``processes``: pid -> (exe, argv, net namespace file)."""
    (root / "self" / "ns").mkdir(parents=True)
    (root / "self" / "ns" / "net").symlink_to(own_ns)
    for pid, (exe, argv, ns) in processes.items():
        d = root / str(pid)
        (d / "ns").mkdir(parents=True)
        (d / "exe").symlink_to(exe)
        (d / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
        (d / "ns" / "net").symlink_to(ns)
    return str(root)


def _qemu_argv(uuid: str, domain_id: int, name: str = "vm1") -> list[str]:
    return [
        "/usr/bin/qemu-system-x86_64",
        "-name",
        f"guest={name},debug-threads=on",
        "-object",
        f'{{"qom-type":"secret","id":"masterKey0","format":"raw","file":"/var/lib/libvirt/qemu/domain-{domain_id}-{name}/master-key.aes"}}',
        "-uuid",
        uuid,
        "-incoming",
        "defer",
    ]


def test_find_qemu_pids_names_only_that_domains_qemu_in_this_network_namespace(tmp_path):
    uuid, other = str(uuidlib.uuid4()), str(uuidlib.uuid4())
    here, there = tmp_path / "net-here", tmp_path / "net-there"
    here.write_text("")
    there.write_text("")
    root = _fake_proc(
        tmp_path / "proc",
        here,
        {
            101: ("/usr/bin/qemu-system-x86_64", _qemu_argv(uuid.upper(), 3), here),  # the one
            102: ("/usr/bin/qemu-system-x86_64", _qemu_argv(uuid, 3), there),  # another host's
            103: ("/usr/bin/qemu-system-x86_64", _qemu_argv(other, 3), here),  # another VM
            104: ("/usr/bin/python3", _qemu_argv(uuid, 3), here),  # not a QEMU
            105: ("/usr/bin/qemu-system-x86_64", _qemu_argv(uuid, 13), here),  # another domain ID
            106: ("/usr/libexec/qemu-kvm (deleted)", _qemu_argv(uuid, 3), here),
        },
    )
    (tmp_path / "proc" / "sys").mkdir()
    assert find_qemu_pids(uuid, 3, root) == [101, 106]
    assert find_qemu_pids(uuid, 4, root) == []
    assert find_qemu_pids(other, 3, root) == [103]


@pytest.fixture
def stand_in_qemu():
    """A process of the test's own standing in for a stale copy's QEMU (ended at teardown)."""
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.wait(30)


def _stale_copy(
    hv,
    make_domain_xml,
    monkeypatch,
    tmp_path,
    qemu,
    reason=libvirt.VIR_DOMAIN_PAUSED_MIGRATION,
    state=libvirt.VIR_DOMAIN_PAUSED,
    extra=(),
):
    """A domain libvirt reports paused (``reason``) with ID 3, whose destroy is not answered until
    ``qemu`` (the stand-in of its QEMU process, listed in a /proc of the test's) has ended."""
    uuid, xml = make_domain_xml("vm1")
    hv.create(xml)
    here = tmp_path / "net-here"
    here.write_text("")
    processes = {qemu.pid: ("/usr/bin/qemu-system-x86_64", _qemu_argv(uuid, 3), here)}
    processes.update({pid: ("/usr/bin/qemu-system-x86_64", _qemu_argv(uuid, 3), here) for pid in extra})
    hv.proc_root = _fake_proc(tmp_path / "proc", here, processes)
    monkeypatch.setattr(libvirt.virDomain, "state", lambda self, flags=0: [state, reason])
    monkeypatch.setattr(libvirt.virDomain, "ID", lambda self: 3)
    original = libvirt.virDomain.destroy
    destroys = []

    def destroy_once_its_qemu_ended(self):
        destroys.append(1)
        qemu.wait(60)  # as libvirt: the domain goes once its QEMU process has gone
        return original(self)

    monkeypatch.setattr(libvirt.virDomain, "destroy", destroy_once_its_qemu_ended)
    hv.call_timeout_s = 0.5
    return uuid, destroys


def test_stop_stale_copy_ends_the_qemu_of_a_paused_incoming_copy_that_libvirt_does_not_stop(
    hv, make_domain_xml, monkeypatch, tmp_path, stand_in_qemu
):
    uuid, destroys = _stale_copy(hv, make_domain_xml, monkeypatch, tmp_path, stand_in_qemu)
    assert hv.stop_stale_copy(uuid) == "killed"
    assert stand_in_qemu.wait(30) == -signal.SIGKILL
    assert destroys == [1]
    hv.call_timeout_s = 10.0
    assert hv.status(uuid) is None


@pytest.mark.parametrize(
    "state, reason",
    [
        (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_BOOTED),  # a copy that runs
        (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_USER),  # paused, but not incoming
    ],
)
def test_stop_stale_copy_ends_no_process_of_a_copy_that_is_not_an_incoming_one(
    hv, make_domain_xml, monkeypatch, tmp_path, stand_in_qemu, state, reason
):
    uuid, _ = _stale_copy(hv, make_domain_xml, monkeypatch, tmp_path, stand_in_qemu, reason=reason, state=state)
    with pytest.raises(HypervisorTimeout):
        hv.stop_stale_copy(uuid)
    assert stand_in_qemu.poll() is None


def test_stop_stale_copy_ends_no_process_when_two_match(hv, make_domain_xml, monkeypatch, tmp_path, stand_in_qemu):
    second = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        uuid, _ = _stale_copy(hv, make_domain_xml, monkeypatch, tmp_path, stand_in_qemu, extra=(second.pid,))
        with pytest.raises(HypervisorTimeout):
            hv.stop_stale_copy(uuid)
        assert stand_in_qemu.poll() is None and second.poll() is None
    finally:
        second.kill()
        second.wait(30)


def test_stop_stale_copy_of_a_copy_libvirt_stops_or_does_not_have(hv, make_domain_xml):
    uuid, xml = make_domain_xml("vm1")
    hv.create(xml)
    assert hv.stop_stale_copy(uuid) == "destroyed"
    assert hv.stop_stale_copy(uuid) == "gone"
