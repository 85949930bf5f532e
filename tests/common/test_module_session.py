"""The modules' session (``_module.cluster_session``) against a real ZooKeeper: the cluster is
checked before anything is read or written, and a failure after a write says what was written."""

from __future__ import annotations

import threading

import pytest

from pvc_cluster_common._module import ModuleFailure, check_before_connecting, cluster_session, exit_from_session
from pvc_cluster_common._store import SESSION_CONNECTED, ConflictError, StoreError, UnreachableError
from tests.unit.plugins.zk_params import zk_params


class Failed(Exception):
    """What fail_json was called with."""

    def __init__(self, result: dict) -> None:
        super().__init__(result.get("msg"))
        self.result = result


class FakeModule:
    """The part of AnsibleModule that cluster_session uses."""

    def __init__(self, **params) -> None:
        self.params = zk_params(**params)

    def fail_json(self, **result):
        raise Failed(result)

    def exit_json(self, **result):
        raise Exited(result)


class Exited(Exception):
    """What exit_json was called with."""

    def __init__(self, result: dict) -> None:
        super().__init__(result)
        self.result = result


class Connected:
    """Waits (bounded) for the store's next SESSION_CONNECTED."""

    def __init__(self, store) -> None:
        self._event = threading.Event()
        store.add_session_listener(lambda state: state == SESSION_CONNECTED and self._event.set())

    def wait(self) -> None:
        assert self._event.wait(60), "the store never connected again"


def run(module, body):
    with pytest.raises(Failed) as failure, cluster_session(module) as session:
        body(session)
    return failure.value.result


@pytest.fixture
def module(store, zk_server):
    return FakeModule(zk_hosts=zk_server.hosts, zk_root=store.schema.root)


def test_a_root_without_a_cluster_fails_before_the_body_runs(zk_server, zk_root, make_store):
    ran = []
    result = run(FakeModule(zk_hosts=zk_server.hosts, zk_root=zk_root), ran.append)
    assert result["msg"] == (
        f"there is no pvc.cluster at {zk_server.hosts}{zk_root}: {zk_root} does not exist; check zk_root "
        "(the node daemons create a cluster's keys when they first start)"
    )
    assert ran == []
    assert make_store().exists(zk_root) is False


def test_a_failure_before_any_write_says_nothing_was_written(module):
    def body(session):
        raise ConflictError("commit: /x changed concurrently")

    result = run(module, body)
    assert (
        result["msg"]
        == "the cluster changed while this task ran; nothing was written; run it again (commit: /x changed concurrently)"
    )
    assert "changed" not in result


@pytest.mark.parametrize(
    "error, message",
    [
        (
            StoreError("read /y: no answer"),
            "read /y: no answer; this task had already written the definition of VM web1 (committed in ZooKeeper)",
        ),
        (
            ConflictError("commit: /y changed concurrently"),
            "the cluster changed while this task ran; this task had already "
            "written the definition of VM web1 (committed in ZooKeeper); nothing more "
            "was written; run it again (commit: /y changed concurrently)",
        ),
    ],
)
def test_a_failure_after_a_write_says_what_was_written(module, store, error, message):
    key = store.schema.domain_key("6695eb01-f6a4-8304-79aa-97f2502e193f", "state")

    def body(session):
        session.commit({key: "stop"}, what="the definition of VM web1")
        raise error

    result = run(module, body)
    assert result["msg"] == message
    assert result["changed"] is True
    assert store.find_text(key) == "stop"


def test_a_module_failure_after_a_write_reports_a_change(module, store):
    def body(session):
        session.commit({store.schema.default_selector(): "mem"}, what="the default selector")
        raise ModuleFailure("VM web1: not running on node1 after 5 s; the request stays recorded")

    result = run(module, body)
    assert result == {
        "msg": "VM web1: not running on node1 after 5 s; the request stays recorded; this task had already "
        "written the default selector (committed in ZooKeeper)",
        "changed": True,
    }


def test_a_read_that_fails_fails_the_task_with_its_message(zk_private_server, make_store):
    # A read that cannot be made raises UnreachableError (it never answers None, as for a
    # missing key): the task fails at that read, with the store's message, and writes nothing.
    operator = make_store(hosts=zk_private_server.hosts)
    operator.ensure_schema()
    key = operator.schema.default_selector()
    module = FakeModule(zk_hosts=zk_private_server.hosts, zk_root=operator.schema.root, zk_timeout=1.0)

    def body(session):
        zk_private_server.stop()
        for read in (
            lambda: session.store.get_many([key]),
            lambda: session.store.list_children(key, missing_ok=True),
            lambda: session.store.exists(key),
        ):
            with pytest.raises(UnreachableError, match=f"{key}: "):
                read()
        if session.store.find_text(key) is None:  # raises: the task fails here
            session.commit({key: "mem"})

    result = run(module, body)
    assert result["msg"].startswith(f"read {key}: not connected to ZooKeeper at {zk_private_server.hosts}")
    assert result["changed"] is False
    zk_private_server.start()
    assert operator.exists(key) is False  # nothing was written


def test_a_modules_checks_run_before_it_connects_and_a_failed_one_fails_the_task():
    module = FakeModule(zk_hosts="127.0.0.1:1")  # nothing listens there: only the check may fail

    def bad(params):
        raise ModuleFailure(f"bad name {params['zk_root']}")

    assert check_before_connecting(module, lambda params: "parsed", lambda params: "other") == "parsed"
    with pytest.raises(Failed) as failure:
        check_before_connecting(module, lambda params: "parsed", bad)
    assert failure.value.result == {"msg": "bad name /pvc"}


def test_a_module_runs_in_a_session_and_exits_with_what_it_returned(module, store):
    def run(module, session, parsed):
        return {"changed": False, "root": session.schema.root, "parsed": parsed}

    with pytest.raises(Exited) as exited:
        exit_from_session(module, run, "parsed")
    assert exited.value.result == {"changed": False, "root": store.schema.root, "parsed": "parsed"}
