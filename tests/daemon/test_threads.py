"""ReusableThreads (node_daemon/threads.py)."""

from __future__ import annotations

import threading

import pytest

from pvc_node_daemon.threads import ReusableThreads


def run_and_wait(pool, job=lambda: None, name=None):
    done = threading.Event()
    seen = {}

    def wrapped():
        seen["thread"] = threading.current_thread()
        seen["name"] = threading.current_thread().name
        job()
        done.set()

    pool.submit(wrapped, name=name)
    assert done.wait(10)
    return seen


def test_an_idle_thread_is_reused_and_named_after_its_job():
    pool = ReusableThreads("t", keep_idle=2)
    try:
        first = run_and_wait(pool, name="job-a")
        # the thread parks itself right after the job
        assert pool.wait_idle(1, 10)
        second = run_and_wait(pool, name="job-b")
        assert first["thread"] is second["thread"] and pool.started == 1
        assert (first["name"], second["name"]) == ("job-a", "job-b")
    finally:
        pool.close()


def test_a_busy_thread_is_not_waited_for():
    pool = ReusableThreads("t", keep_idle=2)
    release = threading.Event()
    try:
        blocked = threading.Event()
        pool.submit(lambda: (blocked.set(), release.wait(30)))
        assert blocked.wait(10)
        other = run_and_wait(pool)  # runs while the first job is still blocked
        assert other["thread"].name.startswith("t-") and pool.started == 2
    finally:
        release.set()
        pool.close()


def test_a_failing_job_costs_no_thread(caplog):
    pool = ReusableThreads("t", keep_idle=1)
    try:
        failed = threading.Event()

        def boom():
            failed.set()
            raise RuntimeError("boom")

        pool.submit(boom)
        assert failed.wait(10)
        assert pool.wait_idle(1, 10)
        assert pool.idle == 1
        run_and_wait(pool)
        assert pool.started == 1
        assert "boom" in caplog.text
    finally:
        pool.close()


def test_close_ends_parked_threads():
    pool = ReusableThreads("t", keep_idle=1)
    seen = run_and_wait(pool)
    assert pool.wait_idle(1, 10)
    pool.close()
    seen["thread"].join(10)
    assert not seen["thread"].is_alive()


def test_keep_idle_must_not_be_negative():
    with pytest.raises(ValueError, match="keep_idle"):
        ReusableThreads("t", keep_idle=-1)
