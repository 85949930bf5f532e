"""The lab's record of what it started (WORKDIR/lab.json, tests/lab/lab.py), without a running
lab: processes that load the same lab record into the same file, and none of their records is
lost."""

from __future__ import annotations

import json
import multiprocessing
import os

import pytest

from .lab import STATE_VERSION, Lab, LabError

RECORDS_PER_WRITER = 40


def _up_state(lab: Lab) -> dict:
    """lab.json as `up` leaves it, before any process is recorded."""
    return {
        "version": STATE_VERSION,
        "workdir": str(lab.workdir),
        "prefix": lab.prefix,
        "caps_cache": str(lab.caps_cache),
        "vm_bridge": lab.vm_bridge,
        "hosts": [{"name": h.name, "netns": h.netns, "address": h.address, "dir": str(h.dir)} for h in lab.hosts],
        "namespaces": [],
        "netns_inodes": {},
        "processes": [],
        "started": 0,
        "ready": True,
    }


def _record_many(workdir: str, role: str, start: multiprocessing.Event) -> None:
    lab = Lab.load(workdir)  # as another process (a rollout hook, `python -m tests.lab`) does
    start.wait(30)
    for _ in range(RECORDS_PER_WRITER):
        lab._record(os.getpid(), role, lab.hosts[0])


def test_processes_recording_at_once_lose_no_record(tmp_path):
    lab = Lab(tmp_path / "lab", hosts=2, prefix="st")
    lab.workdir.mkdir(parents=True)
    lab.state_file.write_text(json.dumps(_up_state(lab)))
    context = multiprocessing.get_context("fork")
    start = context.Event()
    writers = [context.Process(target=_record_many, args=(str(lab.workdir), f"writer{k}", start)) for k in range(2)]
    for writer in writers:
        writer.start()
    start.set()
    for writer in writers:
        writer.join(60)
        assert writer.exitcode == 0
    roles = [record["role"] for record in json.loads(lab.state_file.read_text())["processes"]]
    assert sorted(set(roles)) == ["writer0", "writer1"]
    assert roles.count("writer0") == roles.count("writer1") == RECORDS_PER_WRITER


def test_recording_into_a_lab_that_is_not_up_is_refused(tmp_path):
    lab = Lab(tmp_path / "lab", hosts=1, prefix="st")
    lab.workdir.mkdir(parents=True)
    with pytest.raises(LabError, match="not up"):
        lab._record(os.getpid(), "zookeeper", lab.hosts[0])
    assert not lab.state_file.exists()
