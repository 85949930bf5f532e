"""The daemon's configuration: defaults, and one clear line per mistake."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pvc_node_daemon.config import ConfigError, check_detection_window, load_config, min_dead_after, parse_config
from tests.support.identities import node_auth

REPO_ROOT = Path(__file__).resolve().parents[2]
MINIMAL = {"node": "node1", "zookeeper": {"hosts": "127.0.0.1:2181", "auth": node_auth("node1")}}


def with_(**sections):
    data = {"node": "node1", "zookeeper": {"hosts": "127.0.0.1:2181", "auth": node_auth("node1")}}
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return data


def test_minimal_config_gets_documented_defaults():
    config = parse_config(MINIMAL)
    assert config.node == "node1"
    assert config.zookeeper.hosts == "127.0.0.1:2181" and config.zookeeper.root == "/pvc"
    assert config.libvirt_uri == "qemu:///system"
    assert config.keepalive_interval_s == 5.0 and config.dead_after == 6
    assert config.shutdown_timeout_s == 180.0 and config.flush_parallel == 2
    assert config.default_selector == "mem" and config.memory_reserve_mib == 1024
    assert config.metrics_enabled is False and config.debug is False
    assert config.advertised_libvirt_uri == "qemu+tls://node1/system"  # TLS between nodes by default
    assert config.advertised_transport_uri == "tcp://node1"
    assert config.migration_tls is True  # VIR_MIGRATE_TLS


def test_migration_tls_is_a_boolean():
    assert parse_config(with_(migration={"tls": False})).migration_tls is False
    with pytest.raises(ConfigError, match=r"migration.tls: 'no' is not a boolean \(accepted: true or false\)"):
        parse_config(with_(migration={"tls": "no"}))


def test_a_secure_config_names_three_identities_and_an_insecure_one_must_say_so():
    config = parse_config(MINIMAL)
    options = config.zookeeper
    assert (options.auth_username, options.node_name, options.insecure) == ("nodes", "node1", False)
    assert options.node_password == "node1-test-password" and options.operator_digest.startswith("operator:")
    insecure = parse_config({"node": "node1", "zookeeper": {"hosts": "127.0.0.1:2181"}, "insecure": True})
    assert insecure.zookeeper.insecure is True and insecure.zookeeper.auth_username is None


def test_the_former_passwords_are_held_while_they_are_rotated():
    """docs/security.md, "Rotating credentials": the daemon holds the former identities beside the
    new ones and names both in the ACLs it creates."""
    assert parse_config(MINIMAL).zookeeper.previous_password is None
    auth = {**node_auth("node1"), "previous_password": "former", "previous_node_password": "former-own"}
    options = parse_config(with_(zookeeper={"auth": auth})).zookeeper
    assert (options.previous_password, options.previous_node_password) == ("former", "former-own")
    assert "former" not in repr(options)


def test_address_and_templates_shape_the_published_uris():
    config = parse_config(
        with_(migration={"address": "10.0.0.5", "libvirt_uri_template": "qemu+tls://{node}.example/system"})
    )
    assert config.advertised_libvirt_uri == "qemu+tls://node1.example/system"
    assert config.advertised_transport_uri == "tcp://10.0.0.5"


def test_a_peers_uris_come_from_our_templates_and_its_address():
    config = parse_config(with_(migration={"libvirt_uri_template": "qemu+tls://{address}/system"}))
    assert config.peer_libvirt_uri("node2", "10.0.0.2") == "qemu+tls://10.0.0.2/system"
    assert config.peer_libvirt_uri("node2", "fd00::2") == "qemu+tls://[fd00::2]/system"
    assert config.peer_transport_uri("node2", "hv2.example") == "tcp://hv2.example"
    assert config.published_address == "node1"


def test_live_timeout_grows_with_memory():
    config = parse_config(with_(migration={"live_timeout_base_s": 10, "live_timeout_per_gib_s": 5}))
    assert config.live_timeout_s(0) == 10 and config.live_timeout_s(4096) == 30


@pytest.mark.parametrize(
    "data, key, fragment",
    [
        ({}, "node", "required key is missing"),
        ({"node": "node1"}, "zookeeper.hosts", "required key is missing"),
        (with_(node="bad name!"), "node", "not a valid node name"),
        (with_(node=12), "node", "not a non-empty string"),
        (with_(zookeeper={"timeout_s": "soon"}), "zookeeper.timeout_s", "not a number"),
        (with_(zookeeper={"colour": "red"}), "zookeeper.colour", "unknown key"),
        (with_(zookeeper={"auth": {"password": "x"}}), "zookeeper", "username"),
        ({"node": "node1", "zookeeper": {"hosts": "h:1"}}, "zookeeper", "authentication is required"),
        (with_(zookeeper={"auth": {**node_auth("node1"), "node_password": None}}), "zookeeper", "node_password"),
        (
            with_(zookeeper={"auth": {**node_auth("node1"), "operator_digest": "operator:secret"}}),
            "zookeeper",
            "operator_digest must be",
        ),
        (
            with_(zookeeper={"auth": {**node_auth("node1"), "previous_password": node_auth("node1")["password"]}}),
            "zookeeper",
            "previous_password is the nodes' password itself",
        ),
        (
            with_(zookeeper={"auth": {**node_auth("node1"), "previous_node_password": "node1-test-password"}}),
            "zookeeper",
            "previous_node_password is node_password itself",
        ),
        (with_(insecure=True), "zookeeper", "credentials are refused"),
        (with_(insecure="yes"), "insecure", "true or false"),
        (with_(intervals={"keepalive_s": "fast"}), "intervals.keepalive_s", "not a number"),
        (with_(intervals={"keepalive_s": 0}), "intervals.keepalive_s", "too small"),
        (with_(intervals={"dead_after": 1.5}), "intervals.dead_after", "not an integer"),
        (
            with_(migration={"default_selector": "random"}),
            "migration.default_selector",
            "mem, memfree, load, vcpus, vms, fit",
        ),
        (with_(migration={"flush_parallel": 0}), "migration.flush_parallel", "too small"),
        (
            with_(migration={"libvirt_uri_template": "qemu+tcp://{host}/system"}),
            "migration.libvirt_uri_template",
            "{node}, {address}",
        ),
        (with_(metrics={"port": 70000}), "metrics.port", "1 to 65535"),
        (
            with_(migration={"address": "10.0.0.1/system?command=x"}),
            "migration.address",
            "an IP address or a host name",
        ),
        (
            with_(domain_policy={"storage_roots": "/srv"}),
            "domain_policy.storage_roots",
            "not a list of non-empty strings",
        ),
        (with_(domain_policy={"hostdev": True}), "domain_policy.hostdev", "unknown key"),
        (with_(log={"debug": "yes"}), "log.debug", "true or false"),
        (with_(extra=1), "extra", "unknown key"),
        ("just a string", "the document", "expected a mapping"),
    ],
)
def test_each_mistake_names_the_key_and_what_is_accepted(data, key, fragment):
    with pytest.raises(ConfigError) as caught:
        parse_config(data)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(key) and fragment in message


def test_unreadable_and_invalid_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read configuration file"):
        load_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("node: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_config(broken)


# ---- the detection window against ZooKeeper's failover ---------------------------------------


def window(keepalive_s, dead_after, zk_timeout_s):
    return with_(
        intervals={"keepalive_s": keepalive_s, "dead_after": dead_after}, zookeeper={"timeout_s": zk_timeout_s}
    )


@pytest.mark.parametrize(
    "keepalive_s, dead_after, zk_timeout_s, accepted",
    [
        (5, 6, 10, True),  # the defaults: 30 s against 6.67 + 5 s
        (1, 4, 10, False),  # the lab's old window: 4 s against 6.67 + 1 s (a healthy node fenced in CI)
        (1, 7, 10, False),  # 7 s: longer than the failover alone, not with one keepalive more
        (1, 8, 10, True),
        (1, 5, 6, False),  # the boundary: 5 s is exactly 4 + 1 s, not longer
        (1, 6, 6, True),
        (0.1, 68, 10, True),  # decimal keepalives counted exactly: 6.8 s against 6.67 + 0.1 s
        (0.1, 67, 10, False),  # 6.7 s, not longer than 6.7666 s
        (0.5, 15, 10, True),
        (0.5, 14, 10, False),
    ],
)
def test_a_detection_window_must_outlast_a_zookeeper_failover_and_one_keepalive(
    keepalive_s, dead_after, zk_timeout_s, accepted
):
    data = window(keepalive_s, dead_after, zk_timeout_s)
    if accepted:
        config = parse_config(data)
        assert config.keepalive_interval_s * config.dead_after == pytest.approx(keepalive_s * dead_after)
        assert min_dead_after(keepalive_s, zk_timeout_s) <= dead_after
        return
    with pytest.raises(ConfigError) as caught:
        parse_config(data)
    assert min_dead_after(keepalive_s, zk_timeout_s) > dead_after
    # the smallest dead_after the message names is accepted, and one less is not
    fix = min_dead_after(keepalive_s, zk_timeout_s)
    parse_config(window(keepalive_s, fix, zk_timeout_s))
    with pytest.raises(ConfigError):
        parse_config(window(keepalive_s, fix - 1, zk_timeout_s))
    assert "\n" not in str(caught.value)


def test_the_refusal_names_both_values_the_rule_and_the_fix():
    with pytest.raises(ConfigError) as caught:
        parse_config(window(1, 4, 10))
    message = str(caught.value)
    assert message.startswith("intervals: the detection window keepalive_s x dead_after = 1 s x 4 = 4 s")
    assert "zookeeper.timeout_s = 10 s" in message
    assert "2/3 of zookeeper.timeout_s (6.67 s" in message and "plus one keepalive interval (1 s) = 7.67 s" in message
    assert "raise intervals.dead_after to at least 8 or lower zookeeper.timeout_s below 4.5 s" in message
    # the suggested session timeout is accepted with the window as it is, and the boundary is not
    parse_config(window(1, 4, 4.4))
    with pytest.raises(ConfigError):
        parse_config(window(1, 4, 4.5))


def test_a_window_no_session_timeout_can_save_says_so():
    with pytest.raises(ConfigError) as caught:
        parse_config(window(0.1, 2, 10))
    message = str(caught.value)
    assert "at least 68" in message and "no zookeeper.timeout_s from its minimum, 1 s, is short enough" in message


def test_every_config_the_project_ships_or_generates_keeps_the_rule():
    """The daemon's and the role's defaults, the lab's daemons, the rollout's (and so the demo's)
    variables, and the test harness at the keepalives the tests and the benchmarks use."""
    from tests.daemon import harness
    from tests.lab.daemons import DEFAULT_CONFIG, LAB_ZK_TIMEOUT_S
    from tests.lab.hostviews import LAB_DAEMON_VARS

    role = yaml.safe_load((REPO_ROOT / "roles" / "node_daemon" / "defaults" / "main.yml").read_text())
    for variables in (role, {**role, **LAB_DAEMON_VARS}):
        check_detection_window(
            variables["node_daemon_keepalive_s"],
            variables["node_daemon_dead_after"],
            variables["node_daemon_zookeeper_timeout_s"],
        )
    lab = window(1, 1, LAB_ZK_TIMEOUT_S)
    lab["intervals"] = DEFAULT_CONFIG["intervals"]
    parse_config(lab)
    for keepalive_s in (0.5, 1, 2, 30):  # tests/daemon, the integration cluster, bench b and c
        data = window(1, 1, harness.ZK_TIMEOUT_S)
        data["intervals"] = harness.intervals(keepalive_s)
        parse_config(data)


ROLE_CASES = {  # inventory host -> (keepalive_s, dead_after, zookeeper timeout_s)
    "defaults": (5, 6, 10),
    "old_lab": (1, 4, 10),
    "boundary": (1, 5, 6),
    "lab": (1, 6, 6),
    "decimal_short": (0.1, 67, 10),
    "decimal_long": (0.1, 68, 10),
}


def test_the_node_daemon_role_refuses_the_same_windows_before_it_writes_anything(tmp_path):
    """The role's checks (roles/node_daemon/tasks/checks.yml, the first tasks of its main) give the
    daemon's verdict for each window, and name the values and the fix, on one host per case."""
    import json
    import os
    import re
    import subprocess
    import sys

    collections = tmp_path / "collections" / "ansible_collections" / "pvc"
    collections.mkdir(parents=True)
    (collections / "cluster").symlink_to(REPO_ROOT)
    hosts = {
        name: {
            "ansible_connection": "local",
            "ansible_python_interpreter": sys.executable,
            "node_daemon_zookeeper_hosts": "127.0.0.1:2181",
            "node_daemon_install_method": "none",
            "node_daemon_keepalive_s": keepalive_s,
            "node_daemon_dead_after": dead_after,
            "node_daemon_zookeeper_timeout_s": timeout_s,
        }
        for name, (keepalive_s, dead_after, timeout_s) in ROLE_CASES.items()
    }
    (tmp_path / "inventory.yml").write_text(yaml.safe_dump({"all": {"hosts": hosts}}))
    (tmp_path / "checks.yml").write_text(
        yaml.safe_dump(
            [
                {
                    "name": "The node_daemon role's checks",
                    "hosts": "all",
                    "gather_facts": False,
                    "tasks": [
                        {
                            "name": "Checks",
                            "ansible.builtin.include_role": {"name": "pvc.cluster.node_daemon", "tasks_from": "checks"},
                        }
                    ],
                }
            ]
        )
    )
    run = subprocess.run(
        [str(Path(sys.executable).parent / "ansible-playbook"), "-i", "inventory.yml", "checks.yml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={
            **os.environ,
            "ANSIBLE_COLLECTIONS_PATH": str(tmp_path / "collections"),
            "ANSIBLE_LOCAL_TEMP": str(tmp_path / "tmp"),
            "ANSIBLE_NOCOLOR": "1",
        },
    )
    # the default output: one "fatal: [host]: FAILED! => {json}" line per refused host, and the recap
    failed = {}
    for line in run.stdout.splitlines():
        match = re.match(r"fatal: \[(\w+)\]: FAILED! => (\{.*\})$", line)
        if match:
            failed[match.group(1)] = json.loads(match.group(2))
    recap = dict(re.findall(r"^(\w+)\s+: ok=\d+\s+changed=\d+\s+unreachable=0\s+failed=(\d)", run.stdout, re.M))
    assert set(recap) == set(ROLE_CASES), run.stdout + run.stderr
    for name, (keepalive_s, dead_after, timeout_s) in ROLE_CASES.items():
        try:
            check_detection_window(keepalive_s, dead_after, timeout_s)
        except ConfigError:
            assert recap[name] == "1" and name in failed, (name, run.stdout)
            assert "node_daemon_zookeeper_timeout_s" in failed[name]["assertion"], failed[name]
            message = " ".join(failed[name]["msg"].split())
            assert f"= {keepalive_s} s x {dead_after} =" in message and f"= {timeout_s} s" in message, message
            assert f"raise node_daemon_dead_after to at least {min_dead_after(keepalive_s, timeout_s)} " in message
        else:
            assert recap[name] == "0" and name not in failed, (name, run.stdout)
    assert run.returncode != 0  # the refused hosts failed
