"""A compact stdout callback for the demo: one line per task with each host's outcome, debug
messages and failures in full, and a recap (selected with ANSIBLE_STDOUT_CALLBACK=lab_progress)."""

from __future__ import annotations

import sys
import time

from ansible.plugins.callback import CallbackBase

DOCUMENTATION = """
name: lab_progress
type: stdout
short_description: one line per task (pvc.cluster demo)
description: Each task's outcome per host on one line; debug messages and failures in full.
"""

COLOURS = {
    "ok": "\033[32m",
    "changed": "\033[33m",
    "failed": "\033[31m",
    "skipped": "\033[36m",
    "unreachable": "\033[31m",
}
RESET = "\033[0m"


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "stdout"
    CALLBACK_NAME = "lab_progress"

    def __init__(self) -> None:
        super().__init__()
        self.t0 = time.monotonic()
        self.task = None
        self.outcomes: dict[str, str] = {}
        self.messages: list[str] = []

    def _colour(self, outcome: str) -> str:
        if not sys.stdout.isatty():
            return outcome
        return f"{COLOURS.get(outcome, '')}{outcome}{RESET}"

    def _flush(self) -> None:
        if self.task is None:
            return
        if self.outcomes and set(self.outcomes.values()) != {"skipped"}:
            hosts = ", ".join(f"{host} {self._colour(outcome)}" for host, outcome in self.outcomes.items())
            self._display.display(f"  {time.monotonic() - self.t0:6.1f}s  {self.task}: {hosts}")
        for message in self.messages:
            self._display.display(message)
        self.task, self.outcomes, self.messages = None, {}, []

    def v2_playbook_on_play_start(self, play) -> None:
        self._flush()
        self._display.display(f"  play: {play.get_name()}")

    def v2_playbook_on_task_start(self, task, is_conditional) -> None:
        self._flush()
        self.task = task.get_name()

    def v2_playbook_on_handler_task_start(self, task) -> None:
        self._flush()
        self.task = f"(handler) {task.get_name()}"

    def _host(self, result) -> str:
        delegated = result._result.get("_ansible_delegated_vars", {}).get("ansible_host")
        name = result._host.get_name()
        return f"{name}->{delegated}" if delegated and delegated != name else name

    def v2_runner_on_ok(self, result) -> None:
        self.outcomes[self._host(result)] = "changed" if result._result.get("changed") else "ok"
        if result._task.action in ("debug", "ansible.builtin.debug") and "msg" in result._result:
            self.messages.append(f"           {result._result['msg']}")

    def v2_runner_on_failed(self, result, ignore_errors=False) -> None:
        self.outcomes[self._host(result)] = "failed" + (" (ignored)" if ignore_errors else "")
        res = result._result
        detail = res.get("msg") or res.get("stderr") or res.get("stdout") or res
        self.messages.append(f"           {result._host.get_name()} FAILED: {detail}")

    def v2_runner_on_unreachable(self, result) -> None:
        self.outcomes[self._host(result)] = "unreachable"
        self.messages.append(f"           {result._host.get_name()} UNREACHABLE: {result._result.get('msg')}")

    def v2_runner_on_skipped(self, result) -> None:
        self.outcomes.setdefault(self._host(result), "skipped")

    def v2_runner_item_on_ok(self, result) -> None:
        if result._result.get("changed"):
            self.outcomes[self._host(result)] = "changed"

    def v2_runner_retry(self, result) -> None:
        """Retries (the rollout's wait for the daemons) show as the task's one line when it ends."""

    def v2_playbook_on_stats(self, stats) -> None:
        self._flush()
        parts = []
        for host in sorted(stats.processed):
            s = stats.summarize(host)
            parts.append(f"{host} ok={s['ok']} changed={s['changed']} failed={s['failures'] + s['unreachable']}")
        self._display.display(f"  {time.monotonic() - self.t0:6.1f}s  recap: " + "; ".join(parts))
