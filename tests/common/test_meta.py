"""VM meta: normalisation of stored values (tolerant) and validation of user input (strict)."""

from __future__ import annotations

import dataclasses

import pytest

from pvc_cluster_common._meta import (
    CLUSTER_DEFAULT_SELECTOR,
    MIGRATION_METHODS,
    NODE_SELECTORS,
    MetaError,
    VMMeta,
    effective_selector,
    validate_meta_updates,
)
from pvc_cluster_common._schema import (
    META_KEYS,
    META_MIGRATION_AUTO_CONVERGE,
    META_MIGRATION_MAX_DOWNTIME_MS,
    META_MIGRATION_METHOD,
    META_NODE_AUTOSTART,
    META_NODE_LIMIT,
    META_NODE_SELECTOR,
)

DEFAULT_STORE = {
    META_MIGRATION_METHOD: "default",
    META_NODE_SELECTOR: "default",
    META_NODE_LIMIT: "[]",
    META_NODE_AUTOSTART: "false",
    META_MIGRATION_MAX_DOWNTIME_MS: "300",
    META_MIGRATION_AUTO_CONVERGE: "false",
}


def test_defaults():
    meta = VMMeta()
    assert (
        meta.migration_method,
        meta.node_selector,
        meta.node_limit,
        meta.node_autostart,
        meta.migration_max_downtime_ms,
    ) == ("default", "default", (), False, 300)
    assert meta.to_store() == DEFAULT_STORE
    assert set(meta.to_store()) == set(META_KEYS)
    assert meta.warnings == ()


def test_frozen_and_hashable():
    meta = VMMeta()
    with pytest.raises(dataclasses.FrozenInstanceError):
        meta.node_selector = "load"  # type: ignore[misc]
    assert hash(meta) == hash(VMMeta())


@pytest.mark.parametrize("raw", [{}, None, {key: None for key in META_KEYS}, {key: "" for key in META_KEYS}])
def test_from_store_missing_is_default(raw):
    meta = VMMeta.from_store(raw)
    assert meta == VMMeta()
    assert meta.warnings == ()


# (key, stored text, normalised value) -- every legacy and canonical spelling read from the store.
FROM_STORE = [
    (META_MIGRATION_METHOD, None, "default"),
    (META_MIGRATION_METHOD, "", "default"),
    (META_MIGRATION_METHOD, "none", "default"),
    (META_MIGRATION_METHOD, "None", "default"),
    (META_MIGRATION_METHOD, "default", "default"),
    (META_MIGRATION_METHOD, " Default ", "default"),
    (META_MIGRATION_METHOD, "live", "live"),
    (META_MIGRATION_METHOD, "LIVE", "live"),
    (META_MIGRATION_METHOD, "shutdown", "shutdown"),
    (META_NODE_SELECTOR, None, "default"),
    (META_NODE_SELECTOR, "", "default"),
    (META_NODE_SELECTOR, "none", "default"),
    (META_NODE_SELECTOR, "None", "default"),
    (META_NODE_SELECTOR, "default", "default"),
    (META_NODE_SELECTOR, "mem", "mem"),
    (META_NODE_SELECTOR, "memprov", "mem"),
    (META_NODE_SELECTOR, "memfree", "memfree"),
    (META_NODE_SELECTOR, "load", "load"),
    (META_NODE_SELECTOR, "vcpus", "vcpus"),
    (META_NODE_SELECTOR, "vms", "vms"),
    (META_NODE_LIMIT, None, ()),
    (META_NODE_LIMIT, "", ()),
    (META_NODE_LIMIT, "[]", ()),
    (META_NODE_LIMIT, "None", ()),
    (META_NODE_LIMIT, '["node1", "node2"]', ("node1", "node2")),
    (META_NODE_LIMIT, "node1,node2", ("node1", "node2")),
    (META_NODE_LIMIT, " node1 , node2 ,", ("node1", "node2")),
    (META_NODE_LIMIT, "node2,node1,node2", ("node2", "node1")),
    (META_NODE_LIMIT, "node1", ("node1",)),
    (META_NODE_AUTOSTART, None, False),
    (META_NODE_AUTOSTART, "", False),
    (META_NODE_AUTOSTART, "true", True),
    (META_NODE_AUTOSTART, "True", True),
    (META_NODE_AUTOSTART, "yes", True),
    (META_NODE_AUTOSTART, "1", True),
    (META_NODE_AUTOSTART, "on", True),
    (META_NODE_AUTOSTART, "false", False),
    (META_NODE_AUTOSTART, "False", False),
    (META_NODE_AUTOSTART, "no", False),
    (META_NODE_AUTOSTART, "0", False),
    (META_NODE_AUTOSTART, "None", False),
    (META_MIGRATION_MAX_DOWNTIME_MS, None, 300),
    (META_MIGRATION_MAX_DOWNTIME_MS, "", 300),
    (META_MIGRATION_MAX_DOWNTIME_MS, "300", 300),
    (META_MIGRATION_MAX_DOWNTIME_MS, " 1500 ", 1500),
    (META_MIGRATION_MAX_DOWNTIME_MS, "1", 1),
]


@pytest.mark.parametrize("key,stored,expected", FROM_STORE)
def test_from_store_normalises(key, stored, expected):
    meta = VMMeta.from_store({key: stored})
    assert getattr(meta, key) == expected
    assert meta.warnings == ()


# Garbage in the store: the default is used and a warning names the key and the value; no exception.
GARBAGE = [
    (META_MIGRATION_METHOD, "teleport"),
    (META_NODE_SELECTOR, "random"),
    (META_NODE_LIMIT, "[broken json"),
    (META_NODE_LIMIT, '{"node1": 1}'),
    (META_NODE_LIMIT, "[1, 2]"),
    (META_NODE_LIMIT, "node/1"),
    (META_NODE_AUTOSTART, "maybe"),
    (META_MIGRATION_MAX_DOWNTIME_MS, "fast"),
    (META_MIGRATION_MAX_DOWNTIME_MS, "0"),
    (META_MIGRATION_MAX_DOWNTIME_MS, "-5"),
    (META_MIGRATION_MAX_DOWNTIME_MS, "1.5"),
    # beyond what QEMU accepts: read as the default, never handed to libvirt
    (META_MIGRATION_MAX_DOWNTIME_MS, "2000001"),
    (META_MIGRATION_MAX_DOWNTIME_MS, "1" + "0" * 30),
    (META_MIGRATION_MAX_DOWNTIME_MS, "9" * 100000),
]


@pytest.mark.parametrize("key,stored", GARBAGE)
def test_from_store_garbage_is_default_with_warning(key, stored):
    # One valid value next to the garbage one: it must still be read.
    other_key, other_value = (
        (META_MIGRATION_METHOD, "live") if key == META_NODE_SELECTOR else (META_NODE_SELECTOR, "load")
    )
    meta = VMMeta.from_store({key: stored, other_key: other_value})
    assert getattr(meta, key) == getattr(VMMeta(), key)
    assert getattr(meta, other_key) == other_value
    assert len(meta.warnings) == 1
    assert key in meta.warnings[0] and repr(stored) in meta.warnings[0]


def test_from_store_ignores_unknown_keys_and_warnings_do_not_affect_equality():
    meta = VMMeta.from_store({"colour": "blue", META_MIGRATION_METHOD: "bogus"})
    assert meta == VMMeta()
    assert meta.warnings


def test_from_store_several_garbage_values():
    meta = VMMeta.from_store(
        {META_MIGRATION_METHOD: "x", META_NODE_AUTOSTART: "perhaps", META_MIGRATION_MAX_DOWNTIME_MS: "z"}
    )
    assert meta == VMMeta()
    assert len(meta.warnings) == 3


def test_round_trip():
    meta = VMMeta(
        migration_method="live",
        node_selector="vms",
        node_limit=("a", "b"),
        node_autostart=True,
        migration_max_downtime_ms=50,
        migration_auto_converge=True,
    )
    stored = meta.to_store()
    assert stored == {
        META_MIGRATION_METHOD: "live",
        META_NODE_SELECTOR: "vms",
        META_NODE_LIMIT: '["a", "b"]',
        META_NODE_AUTOSTART: "true",
        META_MIGRATION_MAX_DOWNTIME_MS: "50",
        META_MIGRATION_AUTO_CONVERGE: "true",
    }
    assert VMMeta.from_store(stored) == meta


def test_method_flags():
    assert VMMeta(migration_method="live").is_live_only
    assert not VMMeta(migration_method="live").is_shutdown_only
    assert VMMeta(migration_method="shutdown").is_shutdown_only
    assert not VMMeta().is_live_only and not VMMeta().is_shutdown_only


# ---- effective selector ----------------------------------------------------------------------

EFFECTIVE = [
    ("load", "vms", "load"),
    ("default", "vms", "vms"),
    (None, "vms", "vms"),
    ("none", "memfree", "memfree"),
    ("default", None, "mem"),
    ("default", "default", "mem"),
    ("default", "garbage", "mem"),
    ("garbage", "vcpus", "vcpus"),
    ("memprov", "vms", "mem"),
    ("default", "memprov", "mem"),
]


@pytest.mark.parametrize("meta_selector,cluster_default,expected", EFFECTIVE)
def test_effective_selector(meta_selector, cluster_default, expected):
    assert effective_selector(meta_selector, cluster_default) == expected


def test_effective_selector_method_and_constants():
    assert VMMeta(node_selector="default").effective_selector("load") == "load"
    assert VMMeta(node_selector="vms").effective_selector("load") == "vms"
    assert CLUSTER_DEFAULT_SELECTOR == "mem"
    assert MIGRATION_METHODS == ("default", "live", "shutdown")
    assert set(NODE_SELECTORS) == {"mem", "memfree", "load", "vcpus", "vms", "fit", "default"}


# ---- strict validation -------------------------------------------------------------------------

VALID_UPDATES = [
    ({META_MIGRATION_METHOD: "live"}, {META_MIGRATION_METHOD: "live"}),
    ({META_MIGRATION_METHOD: "none"}, {META_MIGRATION_METHOD: "default"}),
    ({META_MIGRATION_METHOD: "Shutdown"}, {META_MIGRATION_METHOD: "shutdown"}),
    ({META_NODE_SELECTOR: "load"}, {META_NODE_SELECTOR: "load"}),
    ({META_NODE_SELECTOR: "default"}, {META_NODE_SELECTOR: "default"}),
    ({META_NODE_LIMIT: ["node1", "node2"]}, {META_NODE_LIMIT: '["node1", "node2"]'}),
    ({META_NODE_LIMIT: ("node1",)}, {META_NODE_LIMIT: '["node1"]'}),
    ({META_NODE_LIMIT: "node1, node2"}, {META_NODE_LIMIT: '["node1", "node2"]'}),
    ({META_NODE_LIMIT: []}, {META_NODE_LIMIT: "[]"}),
    ({META_NODE_LIMIT: ""}, {META_NODE_LIMIT: "[]"}),
    ({META_NODE_AUTOSTART: True}, {META_NODE_AUTOSTART: "true"}),
    ({META_NODE_AUTOSTART: "no"}, {META_NODE_AUTOSTART: "false"}),
    ({META_NODE_AUTOSTART: 1}, {META_NODE_AUTOSTART: "true"}),
    ({META_MIGRATION_MAX_DOWNTIME_MS: 500}, {META_MIGRATION_MAX_DOWNTIME_MS: "500"}),
    ({META_MIGRATION_MAX_DOWNTIME_MS: "750"}, {META_MIGRATION_MAX_DOWNTIME_MS: "750"}),
    ({META_MIGRATION_MAX_DOWNTIME_MS: 200.0}, {META_MIGRATION_MAX_DOWNTIME_MS: "200"}),
    ({META_MIGRATION_MAX_DOWNTIME_MS: 1}, {META_MIGRATION_MAX_DOWNTIME_MS: "1"}),
    ({META_MIGRATION_MAX_DOWNTIME_MS: 2_000_000}, {META_MIGRATION_MAX_DOWNTIME_MS: "2000000"}),
    ({META_MIGRATION_MAX_DOWNTIME_MS: "+2000000"}, {META_MIGRATION_MAX_DOWNTIME_MS: "2000000"}),
    # None means "unchanged": it is left out (it must not reset the value to its default)
    ({META_MIGRATION_METHOD: None, META_NODE_SELECTOR: "vms"}, {META_NODE_SELECTOR: "vms"}),
    ({}, {}),
]


@pytest.mark.parametrize("updates,expected", VALID_UPDATES)
def test_validate_meta_updates_valid(updates, expected):
    assert validate_meta_updates(updates) == expected


DOWNTIME_BOUNDS = "an integer number of milliseconds from 1 to 2000000 (QEMU's limit, 2000 s)"

# (updates, text that must appear in the message: option, value, accepted values)
INVALID_UPDATES = [
    ({META_MIGRATION_METHOD: "teleport"}, [META_MIGRATION_METHOD, "'teleport'", "default, live, shutdown"]),
    ({META_MIGRATION_METHOD: 3}, [META_MIGRATION_METHOD, "3", "default, live, shutdown"]),
    (
        {META_NODE_SELECTOR: "fastest"},
        [META_NODE_SELECTOR, "'fastest'", "mem, memfree, load, vcpus, vms, fit, default"],
    ),
    ({META_NODE_LIMIT: 5}, [META_NODE_LIMIT, "5", "list of node names"]),
    ({META_NODE_LIMIT: ["node1", 2]}, [META_NODE_LIMIT, "['node1', 2]", "list of node names"]),
    ({META_NODE_LIMIT: ["node 1"]}, [META_NODE_LIMIT, "'node 1'", "no '/', ',' or spaces"]),
    ({META_NODE_LIMIT: ["a,b"]}, [META_NODE_LIMIT, "a,b", "no '/', ',' or spaces"]),
    ({META_NODE_LIMIT: "[oops"}, [META_NODE_LIMIT, "'[oops'", "list of node names"]),
    ({META_NODE_AUTOSTART: "maybe"}, [META_NODE_AUTOSTART, "'maybe'", "true or false"]),
    ({META_NODE_AUTOSTART: 2}, [META_NODE_AUTOSTART, "2", "true or false"]),
    ({META_MIGRATION_MAX_DOWNTIME_MS: 0}, [META_MIGRATION_MAX_DOWNTIME_MS, "0", DOWNTIME_BOUNDS]),
    ({META_MIGRATION_MAX_DOWNTIME_MS: -1}, [META_MIGRATION_MAX_DOWNTIME_MS, "-1", DOWNTIME_BOUNDS]),
    ({META_MIGRATION_MAX_DOWNTIME_MS: "soon"}, [META_MIGRATION_MAX_DOWNTIME_MS, "'soon'", DOWNTIME_BOUNDS]),
    ({META_MIGRATION_MAX_DOWNTIME_MS: True}, [META_MIGRATION_MAX_DOWNTIME_MS, "True", DOWNTIME_BOUNDS]),
    ({META_MIGRATION_MAX_DOWNTIME_MS: 1.5}, [META_MIGRATION_MAX_DOWNTIME_MS, "1.5", DOWNTIME_BOUNDS]),
    # above QEMU's 2000 s (the daemon failed at migration time with OverflowError or QEMU's refusal)
    ({META_MIGRATION_MAX_DOWNTIME_MS: 2_000_001}, [META_MIGRATION_MAX_DOWNTIME_MS, "2000001", DOWNTIME_BOUNDS]),
    ({META_MIGRATION_MAX_DOWNTIME_MS: 3_000_000}, [META_MIGRATION_MAX_DOWNTIME_MS, "3000000", DOWNTIME_BOUNDS]),
    ({META_MIGRATION_MAX_DOWNTIME_MS: 10**30}, [META_MIGRATION_MAX_DOWNTIME_MS, str(10**30), DOWNTIME_BOUNDS]),
    ({META_MIGRATION_MAX_DOWNTIME_MS: 1e30}, [META_MIGRATION_MAX_DOWNTIME_MS, "1e+30", DOWNTIME_BOUNDS]),
    (
        {META_MIGRATION_MAX_DOWNTIME_MS: "1" * 5000},
        [META_MIGRATION_MAX_DOWNTIME_MS, "(5000 characters)", DOWNTIME_BOUNDS],
    ),
    ({META_MIGRATION_MAX_DOWNTIME_MS: "1_000"}, [META_MIGRATION_MAX_DOWNTIME_MS, "'1_000'", DOWNTIME_BOUNDS]),
    # an empty name reads as nothing in the stored form: [""] would silently clear the limit
    ({META_NODE_LIMIT: [""]}, [META_NODE_LIMIT, "['']", "none of them empty ([] for any node)"]),
    ({META_NODE_LIMIT: ["node1", " "]}, [META_NODE_LIMIT, "['node1', ' ']", "none of them empty"]),
    ({"colour": "blue"}, ["meta key", "'colour'", "migration_method, node_selector"]),
]


@pytest.mark.parametrize("updates,fragments", INVALID_UPDATES)
def test_validate_meta_updates_invalid(updates, fragments):
    with pytest.raises(MetaError) as excinfo:
        validate_meta_updates(updates)
    message = str(excinfo.value)
    for fragment in fragments:
        assert fragment in message
    assert isinstance(excinfo.value, ValueError)
    assert excinfo.value.option in (next(iter(updates)), "meta key")


@pytest.mark.parametrize("stored, expected", [(None, False), ("true", True), ("yes", True), ("0", False), ("", False)])
def test_auto_converge_reads_as_a_boolean(stored, expected):
    assert VMMeta.from_store({META_MIGRATION_AUTO_CONVERGE: stored}).migration_auto_converge is expected


def test_auto_converge_refuses_what_is_not_a_boolean():
    with pytest.raises(MetaError, match="migration_auto_converge"):
        validate_meta_updates({META_MIGRATION_AUTO_CONVERGE: "sometimes"})
    assert validate_meta_updates({META_MIGRATION_AUTO_CONVERGE: True}) == {META_MIGRATION_AUTO_CONVERGE: "true"}
    meta = VMMeta.from_store({META_MIGRATION_AUTO_CONVERGE: "sometimes"})
    assert meta.migration_auto_converge is False and "migration_auto_converge" in meta.warnings[0]
