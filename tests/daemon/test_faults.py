"""Fault injection (node_daemon/faults.py): inert unless its variables name the point; a crash
point kills the process, a pause point holds its caller until the release file exists."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

from pvc_node_daemon import faults

CRASH_SCRIPT = "from pvc_node_daemon.faults import crash_point; crash_point('source:transferring'); print('alive')"


def run_crash_script(env: dict[str, str]) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k not in (faults.CRASH_ENV, faults.PAUSE_ENV)}
    return subprocess.run(
        [sys.executable, "-c", CRASH_SCRIPT], env={**environment, **env}, capture_output=True, text=True, timeout=60
    )


def test_a_crash_point_kills_the_process_only_when_named():
    assert faults.CRASH_ENV == "PVC_NODE_DAEMON_CRASH_AT"  # the lab tests set it by this name
    killed = run_crash_script({faults.CRASH_ENV: "source:transferring"})
    assert killed.returncode == -signal.SIGKILL and "alive" not in killed.stdout
    other = run_crash_script({faults.CRASH_ENV: "target:prepared"})
    assert other.returncode == 0 and "alive" in other.stdout
    unset = run_crash_script({})
    assert unset.returncode == 0 and "alive" in unset.stdout


def test_a_pause_point_holds_until_its_release_file_exists(tmp_path, monkeypatch):
    release = tmp_path / "release"
    monkeypatch.setenv(faults.PAUSE_ENV, "target:before-start")
    monkeypatch.setenv(faults.PAUSE_RELEASE_ENV, str(release))
    faults.pause_point("target:before-prepare")  # another point: returns at once
    passed = threading.Event()
    worker = threading.Thread(target=lambda: (faults.pause_point("target:before-start"), passed.set()), daemon=True)
    worker.start()
    assert not passed.wait(0.3)  # held (it may only pass once the file exists)
    release.touch()
    assert passed.wait(30)


def test_a_pause_point_without_a_release_file_named_is_inert(monkeypatch):
    monkeypatch.setenv(faults.PAUSE_ENV, "target:before-start")
    monkeypatch.delenv(faults.PAUSE_RELEASE_ENV, raising=False)
    faults.pause_point("target:before-start")  # returns: nothing could ever release it


class MovingJob:
    """A driver whose migration job starts moving memory at the third question."""

    def __init__(self) -> None:
        self.asked = 0
        self.moving = threading.Event()

    def migration_job_moving(self, uuid: str) -> bool:
        self.asked += 1
        if self.asked >= 3:
            self.moving.set()
            return True
        return False


def test_the_live_running_watcher_crashes_once_the_driver_reports_the_job_moving(monkeypatch):
    crashed = threading.Event()
    monkeypatch.setattr(faults, "crash_point", lambda name: crashed.set() if name == "source:live-running" else None)
    driver = MovingJob()
    faults.crash_while_migrating(driver, "u1")  # not named: no watcher
    assert driver.asked == 0
    monkeypatch.setenv(faults.CRASH_ENV, "source:live-running")
    faults.crash_while_migrating(driver, "u1")
    assert crashed.wait(30) and driver.asked >= 3
