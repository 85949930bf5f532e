"""Threads kept for reuse.

The daemon runs each libvirt call in a thread of its own (so that a call stuck in libvirt can
be abandoned after its timeout) and each VM's reconcile pass in a thread of its own (so that one
VM's slow shutdown never delays another VM). Starting a thread costs 0.1-0.5 ms on a busy
2-core host, and a migration step makes several such calls: ``ReusableThreads`` hands each job
to an idle thread when there is one and starts a new thread only when all are busy. A thread that
is blocked (an abandoned libvirt call) simply stays busy; it rejoins the idle ones when its job
returns. At most ``keep_idle`` idle threads wait for work; others end.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

from .log import get_logger

log = get_logger(__name__)

# Handed to a parked thread to make it end.
_END = object()


class ReusableThreads:
    """Run jobs in daemon threads, reusing idle ones.

    ``name`` prefixes every thread's name; each job also names its thread while it runs (log
    lines carry the thread name), and the thread takes back the plain prefix when it is parked.
    """

    def __init__(self, name: str, keep_idle: int = 4) -> None:
        if keep_idle < 0:
            raise ValueError(f"keep_idle must be >= 0, not {keep_idle}")
        self.name = name
        self.keep_idle = keep_idle
        self._lock = threading.Lock()
        self._parked = threading.Condition(self._lock)
        self._idle: list[queue.SimpleQueue[Any]] = []  # one inbox per parked thread
        self._started = 0

    def submit(self, job: Callable[[], None], name: str | None = None) -> None:
        """Run job() in a thread: an idle one if any, else a new one. Never blocks on the job."""
        with self._lock:
            inbox = self._idle.pop() if self._idle else None
            if inbox is None:
                self._started += 1
                number = self._started
        if inbox is not None:
            inbox.put((job, name))
            return
        inbox = queue.SimpleQueue()
        inbox.put((job, name))
        threading.Thread(target=self._serve, args=(inbox,), name=f"{self.name}-{number}", daemon=True).start()

    @property
    def started(self) -> int:
        """How many threads this pool has started so far (reuse keeps it low)."""
        return self._started

    @property
    def idle(self) -> int:
        with self._lock:
            return len(self._idle)

    def wait_idle(self, count: int, timeout_s: float) -> bool:
        """Wait until at least ``count`` threads are parked; False on timeout."""
        with self._parked:
            return self._parked.wait_for(lambda: len(self._idle) >= count, timeout_s)

    def close(self) -> None:
        """End the parked threads (busy ones end after their job)."""
        with self._lock:
            parked, self._idle, self.keep_idle = self._idle, [], 0
        for inbox in parked:
            inbox.put(_END)

    def _serve(self, inbox: queue.SimpleQueue[Any]) -> None:
        me = threading.current_thread()
        base = me.name
        while True:
            item = inbox.get()
            if item is _END:
                return
            job, name = item
            me.name = name or base
            try:
                job()
            except Exception:  # a job's failure must not cost the pool its thread
                log.exception("job in thread %s failed", me.name)
            me.name = base
            with self._lock:
                if len(self._idle) >= self.keep_idle:
                    return
                self._idle.append(inbox)
                self._parked.notify_all()
