"""A simulated BMC for tests and the lab: OpenIPMI's ``ipmi_sim`` with a chassis-control script.

``ipmi_sim`` answers IPMI over LAN (``ipmitool -I lanplus -C 3``) on one address and port, and runs
the chassis script for power status and control. The script keeps the power state in a file and,
on power off, runs the ``off`` command given (e.g. kill every process of a lab host); on power on,
the ``on`` command. Each BMC has its own state directory; nothing is shared between BMCs.
"""

from __future__ import annotations

import shlex
import socket
import subprocess
import time
from pathlib import Path

IPMI_SIM = "/usr/bin/ipmi_sim"
IPMITOOL = "/usr/bin/ipmitool"
USER = "admin"

LAN_CONF = """\
name "{name}"
set_working_mc 0x20
  startlan 1
    addr {address} {port}
    priv_limit admin
    allowed_auths_callback none md2 md5 straight
    allowed_auths_user none md2 md5 straight
    allowed_auths_operator none md2 md5 straight
    allowed_auths_admin none md2 md5 straight
    guid a123456789abcdefa123456789abcdef
  endlan
  chassis_control "{script} 0x20"
  user 2 true "{user}" "{password}" admin 10 none md2 md5 straight
"""

EMU_CMD = """\
mc_setbmc 0x20
mc_add 0x20 0 no-device-sdrs 0x23 9 8 0x9f 0x1291 0xf02 persist_sdr
sel_enable 0x20 1000 0x0a
mc_enable 0x20
"""

# Called as `chassis.sh 0x20 get power` (prints power:1|0) and `chassis.sh 0x20 set power 0|1`.
CHASSIS_SH = """\
#!/bin/sh
# Simulated chassis of {name}: the power state lives in {state}.
state={state}
echo "$(date +%s.%N) $*" >> {calls}
case "$2" in
  get) [ -f "$state" ] || echo 1 > "$state"; echo "power:$(cat "$state")" ;;
  set)
    if [ "$4" = 0 ]; then
      {off}
    else
      {on}
    fi
    echo "$4" > "$state" ;;
esac
"""


def free_udp_port(address: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((address, 0))
        return sock.getsockname()[1]


class SimulatedBMC:
    """One ipmi_sim. ``off``/``on``: shell commands the chassis runs (default: none)."""

    def __init__(
        self,
        name: str,
        workdir: Path,
        address: str = "127.0.0.1",
        port: int | None = None,
        password: str = "bmc-secret",
        off: str = ":",
        on: str = ":",
    ) -> None:
        self.name = name
        self.dir = Path(workdir) / f"bmc-{name}"
        self.address = address
        self.port = port or free_udp_port(address)
        self.password = password
        self.off = off
        self.on = on
        self.process: subprocess.Popen | None = None

    @property
    def state_file(self) -> Path:
        return self.dir / "power"

    @property
    def calls_file(self) -> Path:
        return self.dir / "calls"

    def write_files(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "state").mkdir(exist_ok=True)
        script = self.dir / "chassis.sh"
        script.write_text(
            CHASSIS_SH.format(
                name=self.name,
                state=shlex.quote(str(self.state_file)),
                calls=shlex.quote(str(self.calls_file)),
                off=self.off,
                on=self.on,
            )
        )
        script.chmod(0o755)
        (self.dir / "lan.conf").write_text(
            LAN_CONF.format(
                name=self.name, address=self.address, port=self.port, script=script, user=USER, password=self.password
            )
        )
        (self.dir / "emu.cmd").write_text(EMU_CMD)
        self.state_file.write_text("1\n")

    def command(self) -> list[str]:
        return [
            IPMI_SIM,
            "-c",
            str(self.dir / "lan.conf"),
            "-f",
            str(self.dir / "emu.cmd"),
            "-n",
            "-s",
            str(self.dir / "state"),
        ]

    def start(self, popen=subprocess.Popen, probe=None, timeout_s: float = 10.0) -> None:
        """Start ipmi_sim (``popen``: how, e.g. in a network namespace) and wait until it answers
        (``probe``: a call whose return code 0 says so; default: ask for the power status here)."""
        self.write_files()
        log = open(self.dir / "ipmi_sim.log", "ab")
        self.process = popen(self.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + timeout_s
        answered = (lambda: probe().returncode == 0) if probe else (lambda: self.power() is not None)
        while not answered():  # ipmi_sim has no readiness signal: ask until it answers
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"ipmi_sim of {self.name} did not answer on {self.address}:{self.port}: "
                    + (self.dir / "ipmi_sim.log").read_text(errors="replace")[-2000:]
                )
            time.sleep(0.1)

    def ipmitool(self, *command: str, timeout_s: float = 10.0) -> subprocess.CompletedProcess:
        argv = [
            IPMITOOL,
            "-I",
            "lanplus",
            "-C",
            "3",
            "-H",
            self.address,
            "-p",
            str(self.port),
            "-U",
            USER,
            "-E",
            *command,
        ]
        return subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env={"PATH": "/usr/bin:/bin", "IPMI_PASSWORD": self.password},
            check=False,
        )

    def power(self) -> str | None:
        result = self.ipmitool("chassis", "power", "status", timeout_s=5)
        if "Chassis Power is on" in result.stdout:
            return "on"
        if "Chassis Power is off" in result.stdout:
            return "off"
        return None

    def power_on(self) -> None:
        result = self.ipmitool("chassis", "power", "on")
        if result.returncode != 0:
            raise RuntimeError(f"power on through {self.name}'s BMC failed: {result.stderr}")

    def calls(self) -> list[str]:
        return self.calls_file.read_text().splitlines() if self.calls_file.exists() else []

    def device_config(self) -> dict:
        """This BMC as a node daemon's fence device (fencing.nodes.<node>)."""
        return {
            "method": "ipmi",
            "address": self.address,
            "port": self.port,
            "username": USER,
            "password": self.password,
            "interface": "lanplus",
            "cipher_suite": 3,
            "action": "off",
        }

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
