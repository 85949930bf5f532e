"""Bounded decoders of stored values: typed results, or an Invalid naming the key and what is accepted."""

from __future__ import annotations

import json
import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pvc_cluster_common import _decode as D
from pvc_cluster_common._selector import NodeView

PATH = "/pvc/nodes/n1/memtotal"


# ---- Invalid ------------------------------------------------------------------------------------


def test_invalid_names_path_value_and_what_is_expected():
    with pytest.raises(D.Invalid) as caught:
        D.integer("lots", PATH)
    problem = caught.value
    assert (problem.path, problem.field, problem.value) == (PATH, "", "'lots'")
    assert "integer from 0 to" in problem.expected
    assert str(problem) == f"{PATH}: 'lots' is not valid; expected {problem.expected}"
    assert isinstance(problem, ValueError)


def test_invalid_in_field_nests_and_survives_pickling():
    problem = D.Invalid("/pvc/domains/u/migration", "a node name", "a/b").in_field("target").in_field("record")
    assert problem.field == "record.target"
    assert str(problem) == "/pvc/domains/u/migration (record.target): 'a/b' is not valid; expected a node name"
    assert pickle.loads(pickle.dumps(problem)) == problem


def test_missing_key_is_invalid_unless_a_default_is_given():
    with pytest.raises(D.Invalid, match="missing is not valid"):
        D.integer(None, PATH)
    assert D.integer(None, PATH, default=7) == 7
    assert D.text(None, PATH, default="") == ""
    assert D.json_object(None, PATH, default={}) == {}


def test_long_values_are_shown_as_an_excerpt():
    problem = D.Invalid(PATH, "x", "a" * 100_000)
    assert len(str(problem)) < 200 and "100000 characters" in str(problem)


def test_or_default_records_the_problem_and_reads_missing_quietly():
    problems = []
    assert D.or_default(D.integer, "1e999", PATH, 0, problems) == 0
    assert D.or_default(D.integer, None, PATH, 5, problems) == 5
    assert D.or_default(D.integer, "12", PATH, 0, problems) == 12
    assert [p.value for p in problems] == ["'1e999'"]


# ---- numbers ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "stored, expected", [("1024", 1024), (" 7 ", 7), ("1024.0", 1024), (b"9", 9), (12, 12), ("1e3", 1000), ("+5", 5)]
)
def test_integer_accepts(stored, expected):
    assert D.integer(stored, PATH) == expected


@pytest.mark.parametrize(
    "stored",
    [
        "1e999",
        "-1e999",
        "nan",
        "NaN",
        "inf",
        "Infinity",
        "1.5",
        "",
        " ",
        "lots",
        "1_000",
        "0x10",
        "-1",
        "9" * 5000,
        float("inf"),
        float("nan"),
        True,
        [1],
        "١٢",
    ],
)
def test_integer_refuses(stored):
    with pytest.raises(D.Invalid):
        D.integer(stored, PATH)


def test_integer_bounds():
    assert D.integer("5", PATH, minimum=5, maximum=5) == 5
    with pytest.raises(D.Invalid, match="from 1 to 10"):
        D.integer("11", PATH, minimum=1, maximum=10)
    with pytest.raises(D.Invalid):
        D.integer(str(D.MAX_MIB + 1), PATH, maximum=D.MAX_MIB)
    assert D.integer(str(D.MAX_INT), PATH) == D.MAX_INT


@pytest.mark.parametrize("stored, expected", [("1.25", 1.25), ("0", 0.0), ("1764190000.123", 1764190000.123), (3, 3.0)])
def test_number_accepts(stored, expected):
    assert D.number(stored, PATH) == expected


@pytest.mark.parametrize("stored", ["1e999", "nan", "inf", "-1", "", "x", "1,5"])
def test_number_refuses(stored):
    with pytest.raises(D.Invalid):
        D.number(stored, PATH)


@given(st.one_of(st.text(max_size=60), st.binary(max_size=60), st.floats(), st.integers()))
def test_numbers_are_finite_and_bounded_or_invalid(stored):
    for decode, bounds in ((D.integer, {"maximum": D.MAX_MIB}), (D.number, {"maximum": 1e9})):
        try:
            value = decode(stored, PATH, **bounds)
        except D.Invalid:
            continue
        assert 0 <= value <= bounds["maximum"]


# ---- text, choices ------------------------------------------------------------------------------


def test_text_caps_size_and_decodes_utf8_strictly():
    assert D.text("abc", PATH) == "abc"
    assert D.text("é".encode(), PATH) == "é"
    with pytest.raises(D.Invalid, match="UTF-8"):
        D.text(b"\xff\xfe", PATH)
    with pytest.raises(D.Invalid, match="at most 4 bytes"):
        D.text("ééé", PATH, max_bytes=4)
    with pytest.raises(D.Invalid, match="non-empty"):
        D.text("  ", PATH, allow_empty=False)
    with pytest.raises(D.Invalid, match="text"):
        D.text(12, PATH)


def test_choice_and_boolean():
    assert D.choice("run", PATH, ("run", "stop")) == "run"
    with pytest.raises(D.Invalid, match="one of run, stop"):
        D.choice("Run", PATH, ("run", "stop"))
    assert D.boolean("true", PATH) is True and D.boolean("false", PATH) is False
    with pytest.raises(D.Invalid):
        D.boolean("yes", PATH)


# ---- JSON ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("document", ["[" * 50_000, '{"a":' * 50_000, "[" * 9 + "]" * 9])
def test_json_nesting_is_refused_before_the_parser_sees_it(document):
    with pytest.raises(D.Invalid, match="nested deeper"):
        D.json_value(document, PATH)


def test_json_brackets_inside_strings_do_not_nest():
    document = json.dumps({"reason": "[" * 50_000 + '\\"{' * 10})
    assert D.json_object(document, PATH)["reason"].startswith("[[[")
    assert D.json_value("[" * 8 + "]" * 8, PATH) == [[[[[[[[]]]]]]]]


@pytest.mark.parametrize("document", ["42", "[1]", '"text"', "null", "true"])
def test_json_object_refuses_other_values(document):
    with pytest.raises(D.Invalid, match="a JSON object"):
        D.json_object(document, PATH)


@pytest.mark.parametrize(
    "document", ['{"a":', "", '{"a": NaN}', '{"a": Infinity}', '{"a": 1e999}', "{'a': 1}", '{"a": 1} x']
)
def test_json_refuses_malformed_and_non_finite(document):
    with pytest.raises(D.Invalid):
        D.json_value(document, PATH)


def test_json_size_cap():
    with pytest.raises(D.Invalid, match="at most 100 bytes"):
        D.json_list(json.dumps(["x" * 100]), PATH, max_bytes=100)


def test_json_list():
    assert D.json_list('["a"]', PATH) == ["a"]
    with pytest.raises(D.Invalid, match="a JSON list"):
        D.json_list("{}", PATH)


def test_json_escapes_with_backslashes_are_read_as_json_reads_them():
    # a backslash escapes the quote after it, two backslashes escape each other
    assert D.json_value(json.dumps(["\\", '"]', "\\\\["]), PATH) == ["\\", '"]', "\\\\["]


@settings(max_examples=300)
@given(st.one_of(st.text(alphabet='[]{}"\\,:0123456789ae-. ', max_size=200), st.binary(max_size=200)))
def test_json_decoders_raise_nothing_but_invalid(document):
    for decode in (D.json_value, D.json_object, D.json_list):
        try:
            decode(document, PATH)
        except D.Invalid:
            pass


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@given(json_values)
def test_json_round_trips_within_the_depth_cap(value):
    document = json.dumps(value)
    depth = D._depth(document, 1000)
    if depth <= D.MAX_DEPTH:
        assert D.json_value(document, PATH) == value
    else:
        with pytest.raises(D.Invalid):
            D.json_value(document, PATH)


# ---- names --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["node1", "hv-2.example", "N_3", "a" * 63])
def test_node_name_accepts(name):
    assert D.node_name(name, PATH) == name


@pytest.mark.parametrize("name", ["", "-n", "a/b", "a b", "a" * 64, "n\n", "../x", "x:y", "é"])
def test_node_name_refuses(name):
    with pytest.raises(D.Invalid, match="a node name"):
        D.node_name(name, PATH)


@pytest.mark.parametrize("name", ["web1", "mail server", "ü-vm", "a" * 255])
def test_vm_name_accepts(name):
    assert D.vm_name(name, PATH) == name


@pytest.mark.parametrize("name", ["", "  ", "a/b", "a\nb", "a\x00", "a" * 256])
def test_vm_name_refuses(name):
    with pytest.raises(D.Invalid, match="a VM name"):
        D.vm_name(name, PATH)


def test_uuid_is_canonical_only():
    assert D.uuid("6695eb01-f6a4-8304-79aa-97f2502e193f", PATH) == "6695eb01-f6a4-8304-79aa-97f2502e193f"
    for bad in (
        "6695EB01-F6A4-8304-79AA-97F2502E193F",
        "6695eb01f6a4830479aa97f2502e193f",
        "x",
        "../..",
        "6695eb01-f6a4-8304-79aa-97f2502e193f\n",
    ):
        with pytest.raises(D.Invalid, match="UUID"):
            D.uuid(bad, PATH)


@pytest.mark.parametrize(
    "value, expected",
    [
        ("10.77.0.11", "10.77.0.11"),
        ("::1", "::1"),
        ("fd00::0:1", "fd00::1"),
        ("node1", "node1"),
        ("hv1.example.org", "hv1.example.org"),
        ("hv1.example.org.", "hv1.example.org."),
    ],
)
def test_address_accepts_ip_addresses_and_host_names(value, expected):
    assert D.address(value, PATH) == expected


@pytest.mark.parametrize(
    "value",
    [
        "",
        "qemu+ext:///system?command=/tmp/x",
        "tcp://elsewhere",
        "a/b",
        "host:22",
        "[::1]",
        "user@host",
        "fe80::1%eth0",
        "a b",
        "-a",
        "a..b",
        "1.2.3",
        "999.1.1.1",
        "h?x",
        "a" * 64,
        "host\n",
    ],
)
def test_address_refuses_anything_that_could_change_a_uri(value):
    with pytest.raises(D.Invalid, match="an IP address or a host name"):
        D.address(value, PATH)


# ---- users of the decoders ----------------------------------------------------------------------


def test_node_view_reads_invalid_numbers_as_zero_and_names_them():
    view = NodeView.from_store(
        "n1",
        {
            "daemon_state": "run",
            "domain_state": "ready",
            "memtotal": "1e999",
            "memprov": "nan",
            "cpuload": "inf",
            "vcpualloc": "4",
        },
    )
    assert (view.memtotal, view.memprov, view.cpuload, view.vcpualloc) == (0, 0, 0.0, 4)
    assert sorted(problem.path for problem in view.invalid) == [
        "nodes/n1/cpuload",
        "nodes/n1/memprov",
        "nodes/n1/memtotal",
    ]
    assert view.headroom <= 0
