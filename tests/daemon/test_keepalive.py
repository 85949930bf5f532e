"""The keepalive against a real ZooKeeper and libvirt's test driver."""

from __future__ import annotations

import json
import threading
import time
import uuid as uuidlib

import libvirt
import pytest

from pvc_cluster_common import _schema as S
from pvc_cluster_common._cluster import read_node_state
from pvc_cluster_common._domain_xml import parse_domain_xml
from pvc_node_daemon.config import parse_config
from pvc_node_daemon.context import DaemonContext
from pvc_node_daemon.domains import DomainTable
from pvc_node_daemon.hypervisor import Hypervisor, HypervisorError
from pvc_node_daemon.keepalive import Keepalive
from tests.support.identities import node_auth

from .harness import NODE_XML

pytestmark = pytest.mark.zk


def xml(name, memory, unit, vcpus):
    uuid = str(uuidlib.uuid4())
    unit_attr = f" unit='{unit}'" if unit else ""
    return uuid, (
        f"<domain type='test'><name>{name}</name><uuid>{uuid}</uuid><memory{unit_attr}>{memory}</memory>"
        f"<vcpu>{vcpus}</vcpu><os><type>hvm</type></os><devices/></domain>"
    )


def libvirt_ground_truth(domain_xml):
    """(MiB, vCPUs) as libvirt itself computes them for this XML."""
    conn = libvirt.open("test:///default")
    try:
        dom = conn.defineXML(domain_xml)
        try:
            return dom.maxMemory() // 1024, dom.vcpusFlags(libvirt.VIR_DOMAIN_VCPU_MAXIMUM)
        finally:
            dom.undefine()
    finally:
        conn.close()


@pytest.fixture
def host(tmp_path):
    path = tmp_path / "host.xml"
    path.write_text(NODE_XML.format(kib=16 * 1024 * 1024))
    with Hypervisor(f"test://{path}", call_timeout_s=5) as hv:
        yield hv


@pytest.fixture
def config(zk_server, zk_root):
    return parse_config(
        {
            "node": "n1",
            "zookeeper": {"hosts": zk_server.hosts, "root": zk_root, "auth": node_auth("n1")},
            "intervals": {"keepalive_s": 1, "dead_after": 8},  # 8 s: beyond the 10 s session's failover
            "libvirt": {"call_timeout_s": 5},
            "memory": {"reserve_mib": 512},
        }
    )


@pytest.fixture
def make_keepalive(store, host, config):
    made = []

    def make(table):
        keepalive = Keepalive(DaemonContext("n1", config, store, host, table))
        made.append(keepalive)
        return keepalive

    yield make
    for keepalive in made:
        keepalive.reader.stop()


def add(store, table, uuid, text, node, state):
    info = parse_domain_xml(text)
    table.update(uuid, name=info.name, node=node, state=state, memory_mib=info.memory_mib, vcpus=info.vcpus)
    store.commit(
        {
            store.schema.domain(uuid): info.name,
            store.schema.domain_key(uuid, S.DOMAIN_XML): text,
            store.schema.domain_key(uuid, S.DOMAIN_NODE): node,
            store.schema.domain_key(uuid, S.DOMAIN_STATE): state,
        }
    )


def test_memory_accounting_is_exact_against_libvirt(store, host, make_keepalive):
    table = DomainTable()
    running = xml("running-gib", 1, "GiB", 2)
    paused = xml("paused-kib", 524288, "KiB", 1)
    stopped = xml("stopped-mib", 768, "MiB", 4)
    disabled = xml("disabled-bytes", 1610612736, "bytes", 2)
    elsewhere = xml("elsewhere", 2, "GiB", 1)
    incoming = xml("incoming", 256, "MiB", 1)
    for (uuid, text), node, state in (
        (running, "n1", "start"),
        (paused, "n1", "start"),
        (stopped, "n1", "stop"),
        (disabled, "n1", "disable"),
        (elsewhere, "n2", "start"),
        (incoming, "n1", "start"),
    ):
        add(store, table, uuid, text, node, state)
    host.create(running[1])
    host.create(paused[1])
    host.connection.lookupByUUIDString(paused[0]).suspend()
    # an incoming migration holds a reservation here and is not running yet
    store.commit({store.schema.node_reservation("n1", incoming[0]): 256})

    keepalive = make_keepalive(table)
    assert keepalive.tick(wait_for_read_s=30)  # with vm-thread's figures of this very state

    truth = {
        name: libvirt_ground_truth(text)
        for name, (_, text) in {"running": running, "paused": paused, "stopped": stopped, "disabled": disabled}.items()
    }
    key = lambda k: int(store.find_text(store.schema.node_key("n1", k)))  # noqa: E731
    assert key(S.NODE_MEMALLOC) == truth["running"][0] + truth["paused"][0]
    assert key(S.NODE_MEMPROV) == sum(mib for mib, _ in truth.values())
    assert key(S.NODE_VCPUALLOC) == truth["running"][1] + truth["paused"][1]
    assert key(S.NODE_DOMAINCOUNT) == 2
    assert key(S.NODE_MEMRESERVE) == 512
    assert sorted(json.loads(store.find_text(store.schema.node_key("n1", S.NODE_RUNNINGDOMAINS)))) == sorted(
        [running[0], paused[0]]
    )
    total, used, free = (key(k) for k in (S.NODE_MEMTOTAL, S.NODE_MEMUSED, S.NODE_MEMFREE))
    assert total > 0 and used + free <= total
    # statistics only for the running VM
    assert json.loads(store.get(store.schema.domain_key(running[0], S.DOMAIN_STATS)).value)
    assert store.find_text(store.schema.domain_key(paused[0], S.DOMAIN_STATS)) is None


def test_paused_domain_is_never_asked_for_statistics(store, host, make_keepalive, monkeypatch):
    table = DomainTable()
    paused = xml("paused", 128, "MiB", 1)
    add(store, table, *paused, "n1", "start")
    host.create(paused[1])
    host.connection.lookupByUUIDString(paused[0]).suspend()
    asked = []
    real = libvirt.virDomain.memoryStats
    monkeypatch.setattr(libvirt.virDomain, "memoryStats", lambda dom: asked.append(dom.UUIDString()) or real(dom))
    assert make_keepalive(table).tick(wait_for_read_s=30)
    assert asked == []


def node_key(store, key):
    return store.find(store.schema.node_key("n1", key))


def test_a_hung_libvirt_never_delays_the_keepalive_and_its_figures_go_out_as_stale(
    store, host, make_keepalive, monkeypatch
):
    table = DomainTable()
    vm = xml("hangs", 128, "MiB", 1)
    add(store, table, *vm, "n1", "start")
    host.create(vm[1])
    keepalive = make_keepalive(table)
    assert keepalive.tick(wait_for_read_s=30)
    fresh = {k: node_key(store, k)[0] for k in (S.NODE_MEMTOTAL, S.NODE_MEMUSED, S.NODE_MEMFREE, S.NODE_MEMALLOC)}
    assert int(fresh[S.NODE_MEMTOTAL]) > 0 and int(fresh[S.NODE_MEMALLOC]) == 128
    assert node_key(store, S.NODE_FIGURES_STALE)[0] == "false"

    release = threading.Event()
    entered = threading.Event()

    def hang(*_args, **_kwargs):
        entered.set()
        release.wait(120)  # a libvirt call stuck until the test lets it go (libvirtd hung)
        raise HypervisorError("host_memory", None, None, "timed out")

    monkeypatch.setattr(host, "host_memory_mib", hang)
    monkeypatch.setattr(host, "running_figures", hang)
    try:
        keepalive.reader.request()
        assert entered.wait(30)  # vm-thread is stuck in libvirt now
        before = node_key(store, S.NODE_KEEPALIVE)
        keepalive.clock = lambda: time.time() + 100  # as if libvirtd had hung for 100 s
        assert keepalive.tick()  # returns at once: it never calls libvirt
        assert not release.is_set() and node_key(store, S.NODE_KEEPALIVE) != before
        # the last figures go out, marked stale with their age: never zeros
        assert {k: node_key(store, k)[0] for k in fresh} == fresh
        assert node_key(store, S.NODE_FIGURES_STALE)[0] == "true"
        assert float(node_key(store, S.NODE_FIGURES_AGE)[0]) >= 100
        assert int(node_key(store, S.NODE_MEMPROV)[0]) == 128  # memprov needs no libvirt
        stamp = node_key(store, S.NODE_KEEPALIVE)
        assert keepalive.tick()  # and again: nothing piles up
        assert node_key(store, S.NODE_KEEPALIVE)[1] > stamp[1]
    finally:
        release.set()


def test_unreadable_host_memory_keeps_the_last_figures_marked_by_their_age(store, host, make_keepalive, monkeypatch):
    # Zeros would tell every placement decision that this node has no room at all.
    keepalive = make_keepalive(DomainTable())
    assert keepalive.tick(wait_for_read_s=30)
    before = {k: node_key(store, k)[0] for k in (S.NODE_MEMTOTAL, S.NODE_MEMUSED, S.NODE_MEMFREE)}
    assert int(before[S.NODE_MEMTOTAL]) > 0
    read_at = keepalive.reader.latest().host_at

    def fails():
        raise HypervisorError("host_memory", None, None, "libvirt cannot tell")

    monkeypatch.setattr(host, "host_memory_mib", fails)
    stamp = node_key(store, S.NODE_KEEPALIVE)
    assert keepalive.tick(wait_for_read_s=30)
    assert keepalive.reader.latest().host_at == read_at  # the pass ran and kept the last host figures
    assert node_key(store, S.NODE_KEEPALIVE) != stamp  # the keepalive itself went out
    assert {k: node_key(store, k)[0] for k in before} == before  # the same figures, not zeros
    keepalive.clock = lambda: read_at + 100
    assert keepalive.tick()
    assert node_key(store, S.NODE_FIGURES_STALE)[0] == "true"
    assert 99 <= float(node_key(store, S.NODE_FIGURES_AGE)[0]) <= 101


def test_a_domain_shutting_down_still_counts_as_running_here(store, host, make_keepalive, monkeypatch):
    """libvirt's `shutdown` state (the guest is shutting down) is active like every other state
    of hypervisor.ACTIVE_STATES: its memory is still allocated and it is still running here."""
    table = DomainTable()
    stopping = xml("stopping", 384, "MiB", 2)
    add(store, table, *stopping, "n1", "stop")
    host.create(stopping[1])
    # The test driver shuts a domain off at once; libvirt reports this state while a guest runs
    # its shutdown, so the domain's state() says so here.
    real_state = libvirt.virDomain.state
    monkeypatch.setattr(
        libvirt.virDomain,
        "state",
        lambda dom, flags=0: (
            [libvirt.VIR_DOMAIN_SHUTDOWN, libvirt.VIR_DOMAIN_SHUTDOWN_USER]
            if dom.UUIDString() == stopping[0]
            else real_state(dom, flags)
        ),
    )
    assert make_keepalive(table).tick(wait_for_read_s=30)
    key = lambda k: int(store.find_text(store.schema.node_key("n1", k)))  # noqa: E731
    assert key(S.NODE_MEMALLOC) == 384
    assert key(S.NODE_VCPUALLOC) == 2
    assert json.loads(store.find_text(store.schema.node_key("n1", S.NODE_RUNNINGDOMAINS))) == [stopping[0]]


def test_a_growth_reservation_is_folded_only_once_the_table_counts_the_new_size(store, host, make_keepalive):
    """pvc.cluster.vm writes a larger XML with a reservation of the new size. A keepalive whose
    table still has the old XML (its watch has not answered yet) keeps the reservation: folding
    it would publish a memprov short by the growth. Once the table has the new size, it folds."""
    from pvc_node_daemon.reconciler import ACCOUNTING_KEYS

    table = DomainTable()
    uuid, text = xml("grower", 1, "GiB", 1)
    add(store, table, uuid, text, "n1", "stop")
    for key in ACCOUNTING_KEYS:
        table.put(uuid, key, key != S.DOMAIN_MIGRATION)
    reservation = store.schema.node_reservation("n1", uuid)
    # the growth's transaction: the 3 GiB XML and the reservation of 3 GiB together
    grown = text.replace("<memory unit='GiB'>1</memory>", "<memory unit='GiB'>3</memory>")
    store.commit({reservation: 3072, store.schema.domain_key(uuid, S.DOMAIN_XML): grown})
    keepalive = make_keepalive(table)
    memprov = lambda: int(store.find_text(store.schema.node_key("n1", S.NODE_MEMPROV)))  # noqa: E731
    assert keepalive.tick(wait_for_read_s=30)
    assert store.find_text(reservation) == "3072" and memprov() == 0  # covered by the reservation alone
    table.update(uuid, memory_mib=3072)  # the watch delivered the new XML
    assert keepalive.tick(wait_for_read_s=30)
    assert store.find_text(reservation) is None and memprov() == 3072


def test_a_growth_reservation_larger_than_the_xml_now_is_folded(store, host, make_keepalive):
    """A growth reserved 3 GiB, then the XML was made 2 GiB (pvc.cluster.vm writes no reservation
    for a smaller XML) before the node's keepalive folded it. The table counts 2 GiB and will never
    count 3: the reservation is folded once the stored XML asks no more than the count (it never
    was before, and held 1 GiB out of placement for good). A table still at the old 1 GiB keeps it."""
    from pvc_node_daemon.reconciler import ACCOUNTING_KEYS

    table = DomainTable()
    uuid, text = xml("grower", 1, "GiB", 1)
    add(store, table, uuid, text, "n1", "stop")
    for key in ACCOUNTING_KEYS:
        table.put(uuid, key, key != S.DOMAIN_MIGRATION)
    reservation = store.schema.node_reservation("n1", uuid)
    xml_path = store.schema.domain_key(uuid, S.DOMAIN_XML)
    store.commit({reservation: 3072, xml_path: text.replace(">1</memory>", ">3</memory>")})
    store.commit({xml_path: text.replace(">1</memory>", ">2</memory>")})
    keepalive = make_keepalive(table)
    memprov = lambda: int(store.find_text(store.schema.node_key("n1", S.NODE_MEMPROV)))  # noqa: E731
    assert keepalive.tick(wait_for_read_s=30)
    assert store.find_text(reservation) == "3072" and memprov() == 0  # the table lags at 1 GiB: kept
    table.update(uuid, memory_mib=2048)  # the watch delivered the 2 GiB XML
    assert keepalive.tick(wait_for_read_s=30)
    assert store.find_text(reservation) is None and memprov() == 2048


def test_the_keepalive_answers_a_dead_verdict_but_never_a_claimed_version(store, host, make_keepalive):
    """A peer's verdict about n1 is the peer's own record, naming the version of n1's daemon_state
    it judged (docs/high-availability.md). n1's keepalive answers a `dead` by writing `run` at that
    version, with the claim of it; a version a peer claimed to fence n1 it never answers, even from
    a state read before the claim (the race of a keepalive with a peer's `fencing`); a
    `fence-failed` it answers (nobody fences n1 any more)."""
    schema = store.schema
    keepalive = make_keepalive(DomainTable())
    registered = {schema.node_key("n1", key): value for key, value in S.NODE_DEFAULTS.items()}
    store.commit({**registered, schema.node_claims("n1"): "", schema.node_fences("n2"): ""})

    def verdict(result, version):
        record = {"by": "n2", "method": "none", "result": result, "started": round(time.time(), 3), "version": version}
        store.commit(
            {
                schema.node_fence_record("n2", "n1"): json.dumps(record),
                schema.node_claims("n1"): json.dumps({"by": "n2", "result": result, "version": version}),
            }
        )

    assert keepalive.tick(wait_for_read_s=30)
    state = read_node_state(store, "n1")
    assert (state.daemon_state, state.own_state) == ("run", "run")
    first = state.version
    # judged dead at this version: everyone reads n1 as dead, until its keepalive answers
    verdict("dead", first)
    assert read_node_state(store, "n1").daemon_state == "dead"
    assert keepalive.tick()
    state = read_node_state(store, "n1")
    assert (state.daemon_state, state.version, state.verdict) == ("run", first + 1, {})
    assert store.find_text(schema.node_claim("n1", first)) == "n1"  # the version it answered, claimed by itself
    # judged dead again; the keepalive reads that, then a peer claims the version and fences
    verdict("dead", first + 1)
    seen = read_node_state(store, "n1")
    assert seen.daemon_state == "dead" and not seen.claimed
    store.commit({schema.node_claim("n1", first + 1): "n2"}, create=[schema.node_claim("n1", first + 1)])
    verdict("fencing", first + 1)
    assert keepalive.run_again(seen) is False  # the claim it would create exists: nothing written
    assert keepalive.tick()  # the figures still go out; `run` does not
    state = read_node_state(store, "n1")
    assert (state.daemon_state, state.own_state, state.version) == ("fencing", "run", first + 1)
    assert state.claimed and state.verdict["by"] == "n2"
    # the fence failed: nobody fences n1 any more, and it lives
    verdict("fence-failed", first + 1)
    assert read_node_state(store, "n1").daemon_state == "fence-failed"
    assert keepalive.tick()
    state = read_node_state(store, "n1")
    assert (state.daemon_state, state.version) == ("run", first + 2)
    # fenced (by a verdict, or an operator's confirm_down): never answered by a keepalive
    verdict("dead", first + 2)
    store.commit({schema.node_claim("n1", first + 2): "n2"}, create=[schema.node_claim("n1", first + 2)])
    verdict("fenced", first + 2)
    assert keepalive.tick()
    state = read_node_state(store, "n1")
    assert (state.daemon_state, state.domain_state, state.version) == ("fenced", "flushed", first + 2)
