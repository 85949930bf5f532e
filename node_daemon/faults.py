"""Fault injection for the crash-safety tests: the named points production code passes through.

Inert unless the environment sets one of the variables below (the lab tests set them for one
daemon; tests/lab/daemons.py clears them for every other). Production code calls
:func:`crash_point` and :func:`pause_point` with a point's name where a test may stop it, and
:func:`crash_while_migrating` just before a live migration starts; nothing else of the daemon
knows how a fault is injected.

``PVC_NODE_DAEMON_CRASH_AT=<point>``: the daemon SIGKILLs itself at the named point. Points:

* ``source:transferring``  ``source:live-running``  ``source:live-done``  ``source:shutdown-done``
* ``target:prepared``  ``target:before-done``  ``target:started``
* ``ha:fenced`` (the actor, once a dead node's fence is confirmed)  ``ha:recovered-one`` (after
  one VM's recovery)

(``source:live-running`` fires from a watcher thread once libvirt reports the live migration
job moving memory, i.e. while the transfer is in progress inside libvirtd.)

``PVC_NODE_DAEMON_PAUSE_AT=<point>`` with ``PVC_NODE_DAEMON_PAUSE_RELEASE=<file>``: the VM's
worker blocks at the point until ``<file>`` exists (bounded by ``PAUSE_MAX_S``), so that a test
can change the cluster between two steps deterministically. Points, by the step the migration
record is held at:

* ``requested``: ``target:before-prepare`` (before the readiness check)
* ``prepared``: ``source:before-transfer`` (before the source re-reads ``node``)
* ``transferring``: ``source:before-shutdown`` (a shutdown migration's source, before it shuts
  the VM down)
* ``transferred``: ``target:before-claim`` (a shutdown migration's target, before it claims the
  start), ``target:before-start`` (the same, its claim written, just before it starts the VM),
  ``target:before-done`` (a live migration's target, the VM resumed there, before it writes
  ``done``: the source writes ``transferred`` meanwhile, or has already)
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Protocol

from .log import get_logger

log = get_logger(__name__)

CRASH_ENV = "PVC_NODE_DAEMON_CRASH_AT"
PAUSE_ENV = "PVC_NODE_DAEMON_PAUSE_AT"
PAUSE_RELEASE_ENV = "PVC_NODE_DAEMON_PAUSE_RELEASE"
PAUSE_MAX_S = 300.0
# How long the live-running watcher looks for the migration job before it gives up.
LIVE_WATCH_MAX_S = 120.0


class JobWatchable(Protocol):
    """What :func:`crash_while_migrating` asks of the hypervisor driver."""

    def migration_job_moving(self, uuid: str) -> bool: ...


def crash_point(name: str) -> None:
    """SIGKILL this process when ``PVC_NODE_DAEMON_CRASH_AT`` names this point."""
    if os.environ.get(CRASH_ENV) == name:
        log.warning("crash point %s reached: SIGKILL (test fault injection)", name)
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)


def pause_point(name: str) -> None:
    """Block here until the release file exists, when ``PVC_NODE_DAEMON_PAUSE_AT`` names this
    point (see the module docstring)."""
    release = os.environ.get(PAUSE_RELEASE_ENV)
    if os.environ.get(PAUSE_ENV) != name or not release:
        return
    log.warning("pause point %s reached: waiting for %s (test fault injection)", name, release)
    deadline = time.monotonic() + PAUSE_MAX_S
    while not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.05)  # test-only hook: polls a file the test creates
    log.warning("pause point %s released", name)


def crash_while_migrating(hypervisor: JobWatchable, uuid: str) -> None:
    """For ``source:live-running``: SIGKILL this daemon as soon as the driver reports the
    migration job of ``uuid`` moving memory, while migrate() still runs (from a watcher thread)."""
    if os.environ.get(CRASH_ENV) != "source:live-running":
        return

    def watch() -> None:
        deadline = time.monotonic() + LIVE_WATCH_MAX_S
        while time.monotonic() < deadline:
            if hypervisor.migration_job_moving(uuid):
                crash_point("source:live-running")
            time.sleep(0.005)  # test-only hook: libvirt has no event for "memory is moving"; poll its job info

    threading.Thread(target=watch, name="crash-watch", daemon=True).start()
