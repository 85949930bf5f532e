"""The daemon's configuration: defaults, and one clear line per mistake."""

from __future__ import annotations

import pytest

from pvc_node_daemon.config import ConfigError, load_config, parse_config
from tests.support.identities import node_auth

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
