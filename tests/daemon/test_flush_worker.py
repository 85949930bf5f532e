"""NodeStateWorker's request handling (node_daemon/flush.py) with its surroundings faked:
what it does when requests compete, without daemons or ZooKeeper."""

from __future__ import annotations

import logging
import threading
from types import SimpleNamespace

from pvc_cluster_common._schema import Schema
from pvc_cluster_common._store import Attempts, ConflictError, UnreachableError, Versioned
from pvc_node_daemon import flush
from pvc_node_daemon.config import parse_config
from pvc_node_daemon.context import DaemonContext
from pvc_node_daemon.domains import DomainTable
from pvc_node_daemon.flush import NodeStateWorker
from tests.support.identities import node_auth


def worker(hypervisor=None, keepalive_s: float = 5.0, **stores) -> NodeStateWorker:
    config = parse_config(
        {
            "node": "n1",
            "zookeeper": {"hosts": "127.0.0.1:1", "auth": node_auth("n1")},
            "migration": {"flush_parallel": 4},
            "intervals": {"keepalive_s": keepalive_s},
        }
    )
    store = SimpleNamespace(schema=Schema("/pvc"), **stores)
    return NodeStateWorker(
        DaemonContext("n1", config, store, hypervisor, domains=DomainTable()),
        reconciler=SimpleNamespace(hypervisor=hypervisor),
    )


def test_requests_to_one_target_are_submitted_one_at_a_time(monkeypatch):
    inside: dict[str, threading.Event] = {}
    release = threading.Event()
    overlapping = []
    active: dict[str, int] = {}
    lock = threading.Lock()

    def fake_submit(store, plan, vm, requester, target_unflushing_ok=False):
        with lock:
            active[plan.target] = active.get(plan.target, 0) + 1
            if active[plan.target] > 1:
                overlapping.append(plan.target)
        inside[vm.name].set()
        release.wait(30)
        with lock:
            active[plan.target] -= 1
        return {"id": vm.name}

    monkeypatch.setattr(flush, "submit_request", fake_submit)
    w = worker()
    calls = {
        name: (SimpleNamespace(target=target), SimpleNamespace(name=name))
        for name, target in (("a", "n2"), ("b", "n2"), ("c", "n3"))
    }
    for name in calls:
        inside[name] = threading.Event()
    threads = {name: threading.Thread(target=w._submit, args=(*calls[name], "migrate", Attempts(10))) for name in calls}
    threads["a"].start()
    assert inside["a"].wait(10)
    threads["b"].start()
    threads["c"].start()
    assert inside["c"].wait(10)  # another target: not held up
    assert not inside["b"].is_set()  # the same target: waits for "a"
    release.set()
    for thread in threads.values():
        thread.join(10)
    assert inside["b"].is_set() and overlapping == []


def test_every_conflict_of_one_request_counts_against_one_budget(monkeypatch):
    # Before, migrate_and_wait (5 plans) around _submit (10 submissions) made up to 50 requests of
    # one VM; now every conflict, a resubmission for the target's reservations or a new plan,
    # comes out of one Attempts budget.
    submitted = []
    reservations = Schema("/pvc").node_reservations("n2")

    def conflicting(store, plan, vm, requester, target_unflushing_ok=False):
        submitted.append(vm.uuid)
        # alternately the target's reservations (submitted again at once) and the VM (planned again)
        raise ConflictError("changed", reservations if len(submitted) % 2 else "/pvc/domains/u1/node")

    vm = SimpleNamespace(uuid="u1", name="vm1", memory_mib=256)
    monkeypatch.setattr(flush, "submit_request", conflicting)
    monkeypatch.setattr(flush, "read_vm", lambda store, uuid: vm)
    monkeypatch.setattr(flush, "read_node_views", lambda store: {})
    monkeypatch.setattr(flush, "plan_request", lambda *a, **kw: SimpleNamespace(target="n2", changed=True, message=""))
    w = worker()
    assert w.migrate_and_wait("u1", "migrate", "n2", attempts=7) == "conflict"
    assert len(submitted) == 7


def test_a_vm_that_could_not_be_read_is_not_taken_for_gone():
    # a VM whose keys do not exist is "gone" (home or moot: a ready stops trying it); one that
    # ZooKeeper did not answer about (UnreachableError) is "unreadable", tried again.
    def unreachable(paths):
        raise UnreachableError("read /pvc/domains/u1: not connected to ZooKeeper")

    for get_many, outcome in ((lambda paths: dict.fromkeys(paths), "gone"), (unreachable, "unreadable")):
        w = worker(get_many=get_many)
        assert w.migrate_and_wait("u1", "unmigrate", None) == outcome
    assert "unreadable" not in flush.HOME_OR_MOOT


def test_ready_tries_a_vm_that_did_not_come_home_again(monkeypatch, caplog):
    home = SimpleNamespace(uuid="u1", name="vm1", node="n2", lastnode="n1", meta=SimpleNamespace(node_autostart=False))
    w = worker(get_many=lambda paths: {path: Versioned("n1", 0) for path in paths})
    w.domains.put("u1", "node", True, node="n2")
    monkeypatch.setattr(w, "read_vms", lambda uuids: [home] if "u1" in list(uuids) else [])
    outcomes = iter(["conflict", "finished"])
    asked = []
    monkeypatch.setattr(
        w, "migrate_and_wait", lambda uuid, kind, *args, **kw: asked.append((uuid, kind)) or next(outcomes)
    )
    states = []
    monkeypatch.setattr(w, "_set_domain_state", lambda expected, new: states.append((expected, new)))
    w.ready(threading.Event())
    assert asked == [("u1", "unmigrate"), ("u1", "unmigrate")]
    assert states == [("unflush", "ready")]
    assert "not back yet (vm1: conflict)" in caplog.text and "did not come home" not in caplog.text


def test_ready_reports_the_vms_that_never_came_home(monkeypatch, caplog):
    home = SimpleNamespace(uuid="u1", name="vm1", node="n2", lastnode="n1", meta=SimpleNamespace(node_autostart=False))
    w = worker(get_many=lambda paths: {path: Versioned("n1", 0) for path in paths})
    w.domains.put("u1", "node", True, node="n2")
    monkeypatch.setattr(w, "read_vms", lambda uuids: [home] if "u1" in list(uuids) else [])
    monkeypatch.setattr(w, "migrate_and_wait", lambda *args, **kw: "refused: no room")
    monkeypatch.setattr(w, "_set_domain_state", lambda expected, new: None)
    w.ready(threading.Event())
    assert "did not come home: vm1 (refused: no room)" in caplog.text


# ---- the end of a flush: libvirt's copy of the last VM moved ----------------------------------------


def flush_waiting_on_libvirt(hv, make_domain_xml, request):
    """A worker (keepalive interval one hour) whose flush has nothing left to move but finds a
    cluster VM (assigned to n2 in its table) still running in libvirt here, as the source's copy
    of the last VM moved is for a moment after the migration has ended; its flush thread, the
    VM's uuid and what it committed."""
    uuid, xml = make_domain_xml("vm1")
    hv.create(xml)
    committed: list[dict] = []
    w = worker(
        hv,
        keepalive_s=3600,
        watch_data=lambda path, callback: None,
        get_many=lambda paths: dict.fromkeys(paths),
        find=lambda path: Versioned("flush", 3),
        commit=lambda values, expect_versions=None: committed.append(values),
    )
    w.domains.put(uuid, "node", True, node="n2")
    w.start()  # listens to libvirt's lifecycle events
    cancel = threading.Event()
    failed: list[BaseException] = []

    def run() -> None:
        try:
            w.flush(cancel)
        except BaseException as exc:  # Cancelled, or a failure the test reports
            failed.append(exc)

    waiting = threading.Event()
    said = logging.Handler()
    said.emit = lambda record: waiting.set() if "libvirt still runs" in record.getMessage() else None  # type: ignore[method-assign]
    logging.getLogger(flush.log.name).addHandler(said)
    request.addfinalizer(lambda: logging.getLogger(flush.log.name).removeHandler(said))
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    # a state, with a deadline: the flush has found the VM running here and waits
    assert waiting.wait(60), f"the flush did not wait: {failed} {committed}"
    return SimpleNamespace(worker=w, thread=thread, uuid=uuid, committed=committed, cancel=cancel, failed=failed)


def test_a_flush_is_flushed_on_libvirts_stop_event_not_a_keepalive_interval_later(hv, make_domain_xml, request):
    f = flush_waiting_on_libvirt(hv, make_domain_xml, request)
    assert f.thread.is_alive() and f.committed == []  # not flushed while libvirt runs the VM here
    hv.destroy(f.uuid)  # libvirt ends the source's copy: a lifecycle event
    f.thread.join(60)  # far below the keepalive interval (one hour) it waited before
    assert not f.thread.is_alive() and f.failed == []
    assert f.committed == [{"/pvc/nodes/n1/domain_state": "flushed"}]


def test_a_flush_waiting_on_libvirt_stops_at_once_when_cancelled(hv, make_domain_xml, request):
    f = flush_waiting_on_libvirt(hv, make_domain_xml, request)
    assert f.thread.is_alive()
    f.cancel.set()
    f.worker._wake()  # as _switch and stop do after setting the cancel
    f.thread.join(60)
    assert not f.thread.is_alive() and f.committed == []
    assert [type(exc) for exc in f.failed] == [flush.Cancelled]
