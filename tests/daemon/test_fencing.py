"""Fence devices (node_daemon/fencing.py) against a real simulated BMC (ipmi_sim) and a fence agent
with the fence-agents interface; their configuration (node_daemon/config.py)."""

from __future__ import annotations

import shutil

import pytest

from pvc_node_daemon.config import ConfigError, parse_config
from pvc_node_daemon.fencing import FenceDevice, fence
from tests.support.bmc import SimulatedBMC, free_udp_port
from tests.support.identities import node_auth

needs_ipmi = pytest.mark.skipif(
    not (shutil.which("ipmi_sim") and shutil.which("ipmitool")),
    reason="openipmi and ipmitool are installed by scripts/setup-host.sh",
)

# A fence agent as fence-agents defines them: options as name=value lines on standard input;
# action=off powers off, action=status exits 0 (on) or 2 (off). This one keeps the power in the
# file its `plug` option names, and records what it read.
AGENT = """#!/bin/sh
power=""; action=""; stuck=""; fail=""
while IFS='=' read -r name value; do
  echo "$name=$value" >> "$(dirname "$0")/stdin.log"
  case "$name" in plug) power="$value";; action) action="$value";; stuck) stuck="$value";; fail) fail="$value";; esac
done
[ -n "$fail" ] && { echo "cannot reach the device" >&2; exit 1; }
case "$action" in
  off) [ -n "$stuck" ] || echo off > "$power"; exit 0;;
  reboot) echo on > "$power"; exit 0;;
  status) [ "$(cat "$power")" = off ] && exit 2; exit 0;;
esac
exit 1
"""


@pytest.fixture
def bmc(tmp_path):
    simulated = SimulatedBMC("n2", tmp_path, off=f"echo off-ran >> {tmp_path}/off.log")
    simulated.start()
    yield simulated
    simulated.stop()


@pytest.fixture
def agent(tmp_path):
    path = tmp_path / "fence_test"
    path.write_text(AGENT)
    path.chmod(0o755)
    (tmp_path / "power").write_text("on\n")
    return path


def ipmi_device(bmc, **changes):
    config = {**bmc.device_config(), **changes}
    return parse_config(
        {
            "node": "n1",
            "zookeeper": {"hosts": "127.0.0.1:2181", "auth": node_auth("n1")},
            "fencing": {"nodes": {"n2": config}},
        }
    ).fence_devices["n2"]


@needs_ipmi
def test_ipmi_powers_the_node_off_and_confirms_it_through_the_bmc(bmc, tmp_path):
    result = fence(ipmi_device(bmc), timeout_s=10)
    assert result.ok, result.detail
    assert "power off confirmed" in result.detail and result.method == "ipmi"
    assert bmc.power() == "off"
    assert (tmp_path / "off.log").read_text() == "off-ran\n"  # the chassis ran its power-off command
    assert any(call.endswith("set power 0") for call in bmc.calls())


@needs_ipmi
def test_ipmi_with_a_wrong_password_fails_and_says_so(bmc):
    result = fence(ipmi_device(bmc, password="wrong"), timeout_s=10)
    assert not result.ok and "chassis power off failed" in result.detail
    assert "wrong" not in result.detail
    assert bmc.power() == "on"


@needs_ipmi
def test_an_unreachable_bmc_fails_within_the_timeout(tmp_path):
    device = FenceDevice(
        node="n2", method="ipmi", address="127.0.0.1", port=free_udp_port(), username="admin", password="x"
    )
    result = fence(device, timeout_s=3)
    assert not result.ok
    assert result.finished - result.started < 3 * 2 + 1  # one bounded call, not a hang


@needs_ipmi
def test_ipmi_reset_is_confirmed_by_a_status_answer(bmc):
    result = fence(ipmi_device(bmc, action="reset"), timeout_s=10)
    assert result.ok and "reset" in result.detail


def test_an_agent_gets_its_options_on_stdin_and_the_power_off_is_confirmed_by_status(agent, tmp_path):
    device = FenceDevice(
        node="n2", method="agent", agent=str(agent), options=(("plug", str(tmp_path / "power")), ("password", "s3cret"))
    )
    result = fence(device, timeout_s=10)
    assert result.ok, result.detail
    assert (tmp_path / "power").read_text().strip() == "off"
    lines = (tmp_path / "stdin.log").read_text().splitlines()
    assert "password=s3cret" in lines and "action=off" in lines and "action=status" in lines
    assert "s3cret" not in result.detail


def test_an_agent_whose_power_stays_on_is_not_confirmed(agent, tmp_path):
    device = FenceDevice(
        node="n2", method="agent", agent=str(agent), options=(("plug", str(tmp_path / "power")), ("stuck", "1"))
    )
    result = fence(device, timeout_s=5, confirm_s=0.5)
    assert not result.ok and "still on" in result.detail


def test_an_agent_that_fails_is_a_failed_fence(agent, tmp_path):
    device = FenceDevice(
        node="n2", method="agent", agent=str(agent), options=(("plug", str(tmp_path / "power")), ("fail", "1"))
    )
    result = fence(device, timeout_s=5)
    assert not result.ok and "cannot reach the device" in result.detail


def test_a_missing_agent_is_a_failed_fence(tmp_path):
    result = fence(FenceDevice(node="n2", method="agent", agent=str(tmp_path / "absent")), timeout_s=5)
    assert not result.ok and "cannot run" in result.detail


# ---- configuration ----------------------------------------------------------------------------------


def config_with(nodes):
    return {
        "node": "n1",
        "zookeeper": {"hosts": "127.0.0.1:2181", "auth": node_auth("n1")},
        "fencing": {"timeout_s": 5, "nodes": nodes},
    }


def test_fence_devices_are_read_from_the_daemon_configuration():
    config = parse_config(
        config_with(
            {
                "n2": {"method": "ipmi", "address": "10.0.0.2", "username": "admin", "password": "pw"},
                "n3": {
                    "method": "agent",
                    "agent": "/usr/sbin/fence_ipmilan",
                    "options": {"ip": "10.0.0.3", "lanplus": 1},
                },
            }
        )
    )
    assert config.fence_timeout_s == 5.0
    n2, n3 = config.fence_devices["n2"], config.fence_devices["n3"]
    assert (n2.port, n2.interface, n2.cipher_suite, n2.action) == (623, "lanplus", 3, "off")
    assert n3.options == (("ip", "10.0.0.3"), ("lanplus", "1"))
    assert "pw" not in repr(n2) and "pw" not in repr(config)


@pytest.mark.parametrize(
    "nodes, message",
    [
        ({"n2": {"method": "ssh"}}, "fencing.nodes.n2.method"),
        ({"n2": {"method": "ipmi", "address": "a b", "username": "u", "password": "p"}}, "fencing.nodes.n2.address"),
        ({"n2": {"method": "ipmi", "address": "h", "username": "u"}}, "fencing.nodes.n2.password: required"),
        ({"n2": {"method": "agent", "agent": "fence_ipmilan"}}, "not an absolute path"),
        ({"n2": {"method": "agent", "agent": "/x", "options": {"action": "on"}}}, "not a valid option name"),
        ({"n2": {"method": "agent", "agent": "/x", "options": {"ip": "a\nb"}}}, "on one line"),
        ({"n2": {"method": "ipmi", "address": "h", "username": "u", "password": "p", "extra": 1}}, "unknown key"),
        ({"bad/name": {"method": "agent", "agent": "/x"}}, "not a valid node name"),
    ],
)
def test_bad_fence_devices_are_refused_with_the_key_and_what_is_accepted(nodes, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(config_with(nodes))
