"""Fence devices: power a dead node off through its BMC and confirm that it is off.

A fence device is configured per node in the daemon's own configuration file (``fencing.nodes``),
never read from ZooKeeper: a value written to ZooKeeper must never become a command line, an
address or a password used on a hypervisor. Two methods:

``ipmi``
    ``ipmitool -I lanplus -C <cipher suite> -H <address> -p <port> -U <user> -E chassis power off``,
    then ``chassis power status`` until it says ``off``. The password goes through the environment
    (``-E``: IPMI_PASSWORD), never the command line that ``ps`` shows. ``-C 3`` matters: without a
    cipher suite, lanplus first tries cipher-suite discovery, which some BMCs never answer (about
    10 s lost per call).
``agent``
    A fence agent with the standard fence-agents interface (Debian ``fence-agents``, e.g.
    ``/usr/sbin/fence_ipmilan``): its options as ``name=value`` lines on standard input, with
    ``action=off`` then ``action=status``; status exits 2 when the power is off, 0 when on.

``action: reset`` is for a device that can only reset: the reset must succeed and the status must
answer (on or off) afterwards; a reset kills every process of the node as surely as a power-off.

Every call is bounded (``fencing.timeout_s``); a device that fails, times out or never reports the
power off gives a failed FenceResult, never an exception: the caller then recovers nothing.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from dataclasses import dataclass, field

from .log import get_logger

log = get_logger(__name__)

METHODS = ("ipmi", "agent")
ACTIONS = ("off", "reset")
# the output of `ipmitool chassis power status`
_IPMI_POWER = re.compile(r"Chassis Power is (on|off)", re.IGNORECASE)
# fence-agents' exit codes for action=status
AGENT_STATUS_ON = 0
AGENT_STATUS_OFF = 2
# how often the power state is asked again while it is not yet off
CONFIRM_POLL_S = 0.2


@dataclass(frozen=True)
class FenceDevice:
    """How to fence one node (from the daemon's configuration; credentials never logged)."""

    node: str
    method: str
    action: str = "off"
    # ipmi
    address: str = ""
    port: int = 623
    username: str = ""
    password: str = field(default="", repr=False)
    interface: str = "lanplus"
    cipher_suite: int = 3
    ipmitool: str = "ipmitool"
    # agent
    agent: str = ""
    options: tuple[tuple[str, str], ...] = field(default=(), repr=False)

    def describe(self) -> str:
        """For logs and the fence record: the method and where, no credential."""
        if self.method == "ipmi":
            return f"ipmi {self.address}:{self.port} ({self.action})"
        return f"agent {os.path.basename(self.agent)} ({self.action})"


@dataclass(frozen=True)
class FenceResult:
    ok: bool  # the node's power is confirmed off (or its reset confirmed)
    detail: str  # what happened, for logs and the fence record
    method: str
    started: float
    finished: float


class _Failed(Exception):
    """A fence device step that failed; its message says which step and what the device answered."""


def _run(
    argv: list[str], timeout_s: float, stdin: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            argv, input=stdin, capture_output=True, text=True, timeout=timeout_s, env=env, check=False
        )
    except subprocess.TimeoutExpired:
        raise _Failed(f"{os.path.basename(argv[0])} did not answer within {timeout_s:g} s") from None
    except OSError as exc:
        raise _Failed(f"cannot run {argv[0]}: {exc.strerror}") from None


def _output(result: subprocess.CompletedProcess[str]) -> str:
    text = (result.stdout + " " + result.stderr).strip().replace("\n", " ")
    return text[:300]


class _Ipmi:
    def __init__(self, device: FenceDevice, timeout_s: float) -> None:
        self.device = device
        self.timeout_s = timeout_s

    def _call(self, *command: str) -> subprocess.CompletedProcess[str]:
        d = self.device
        argv = [
            d.ipmitool,
            "-I",
            d.interface,
            "-C",
            str(d.cipher_suite),
            "-H",
            d.address,
            "-p",
            str(d.port),
            "-U",
            d.username,
            "-E",
            *command,
        ]
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "IPMI_PASSWORD": d.password}
        return _run(argv, self.timeout_s, env=env)

    def act(self) -> None:
        result = self._call("chassis", "power", self.device.action)
        if result.returncode != 0:
            raise _Failed(f"chassis power {self.device.action} failed (exit {result.returncode}): {_output(result)}")

    def power(self) -> str:
        result = self._call("chassis", "power", "status")
        match = _IPMI_POWER.search(result.stdout)
        if result.returncode != 0 or not match:
            raise _Failed(f"chassis power status did not answer (exit {result.returncode}): {_output(result)}")
        return match.group(1).lower()


class _Agent:
    def __init__(self, device: FenceDevice, timeout_s: float) -> None:
        self.device = device
        self.timeout_s = timeout_s

    def _call(self, action: str) -> subprocess.CompletedProcess[str]:
        lines = [f"{name}={value}" for name, value in self.device.options] + [f"action={action}"]
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")}
        return _run([self.device.agent], self.timeout_s, stdin="\n".join(lines) + "\n", env=env)

    def act(self) -> None:
        action = "off" if self.device.action == "off" else "reboot"
        result = self._call(action)
        if result.returncode != 0:
            raise _Failed(f"action={action} failed (exit {result.returncode}): {_output(result)}")

    def power(self) -> str:
        result = self._call("status")
        if result.returncode == AGENT_STATUS_OFF:
            return "off"
        if result.returncode == AGENT_STATUS_ON:
            return "on"
        raise _Failed(f"action=status did not answer (exit {result.returncode}): {_output(result)}")


def fence(device: FenceDevice, timeout_s: float, confirm_s: float | None = None) -> FenceResult:
    """Power the node off (or reset it) and confirm it. Never raises.

    ``timeout_s`` bounds each call of the device; ``confirm_s`` (default ``timeout_s``) bounds the
    wait for the power status to say off after a successful power-off (a BMC may report the old
    state for a moment).
    """
    started = time.time()
    confirm_s = timeout_s if confirm_s is None else confirm_s
    driver = _Ipmi(device, timeout_s) if device.method == "ipmi" else _Agent(device, timeout_s)
    try:
        driver.act()
        if device.action == "reset":
            power = driver.power()  # must answer; on or off are both a finished reset
            detail = f"reset through {device.describe()}, power now {power}"
        else:
            deadline = time.monotonic() + confirm_s
            while True:
                power = driver.power()
                if power == "off":
                    break
                if time.monotonic() >= deadline:
                    raise _Failed(f"the power is still {power} {confirm_s:g} s after a successful power off")
                time.sleep(CONFIRM_POLL_S)  # a device's status has no event to wait on
            detail = f"power off confirmed through {device.describe()}"
        return FenceResult(True, detail, device.method, started, time.time())
    except _Failed as exc:
        return FenceResult(False, f"{device.describe()}: {exc}", device.method, started, time.time())
