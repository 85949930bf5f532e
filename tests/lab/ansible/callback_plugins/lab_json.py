"""A stdout callback for the lab's tests: one JSON document at the end of the run with every task
result per host and the per-host stats (ansible-core has no json callback; ansible.posix's is not
installed here). Selected by tests/lab/hostviews.py with ANSIBLE_STDOUT_CALLBACK=lab_json."""

from __future__ import annotations

import json
import time

from ansible.plugins.callback import CallbackBase

DOCUMENTATION = """
name: lab_json
type: stdout
short_description: the run's results as one JSON document (pvc.cluster lab tests)
description: Task results per host and per-host stats, printed as JSON when the run ends.
"""

KEEP = ("changed", "failed", "unreachable", "skipped", "msg", "rc", "stdout", "stderr", "results", "exception")


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "stdout"
    CALLBACK_NAME = "lab_json"

    def __init__(self) -> None:
        super().__init__()
        self.plays: list[dict] = []

    def v2_playbook_on_play_start(self, play) -> None:
        self.plays.append({"play": {"name": play.get_name()}, "tasks": []})

    def _task(self, task) -> dict:
        play = self.plays[-1]
        if not play["tasks"] or play["tasks"][-1]["task"]["id"] != str(task._uuid):
            play["tasks"].append(
                {
                    "task": {"name": task.get_name(), "id": str(task._uuid)},
                    "hosts": {},
                    "started": time.monotonic(),
                    "duration_s": 0.0,
                }
            )
        return play["tasks"][-1]

    def v2_playbook_on_task_start(self, task, is_conditional) -> None:
        self._task(task)

    def v2_playbook_on_handler_task_start(self, task) -> None:
        self._task(task)

    def _record(self, result, **flags) -> None:
        entry = self._task(result._task)
        data = dict(result._result)
        data.update(flags)
        keep = {k: data[k] for k in KEEP if k in data}
        for key in ("stdout_lines", "ansible_facts", "invocation", "diff"):
            data.pop(key, None)
        keep["result"] = data
        entry["hosts"][result._host.get_name()] = json.loads(json.dumps(keep, default=str))
        entry["duration_s"] = round(time.monotonic() - entry["started"], 3)

    def v2_runner_on_ok(self, result) -> None:
        self._record(result)

    def v2_runner_on_failed(self, result, ignore_errors=False) -> None:
        self._record(result, failed=True, ignored=ignore_errors)

    def v2_runner_on_unreachable(self, result) -> None:
        self._record(result, unreachable=True)

    def v2_runner_on_skipped(self, result) -> None:
        self._record(result, skipped=True)

    def v2_playbook_on_stats(self, stats) -> None:
        summary = {host: stats.summarize(host) for host in sorted(stats.processed)}
        self._display.display(json.dumps({"plays": self.plays, "stats": summary}))
