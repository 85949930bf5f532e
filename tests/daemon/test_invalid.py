"""Invalid values found in ZooKeeper are logged once per version of their key, and counted."""

from __future__ import annotations

import logging

from pvc_cluster_common._decode import Invalid
from pvc_node_daemon.invalid import InvalidValues
from pvc_node_daemon.metrics import Metrics

PATH = "/pvc/domains/6695eb01-f6a4-8304-79aa-97f2502e193f/migration"


def test_each_version_of_a_bad_key_is_reported_once_and_counted(caplog):
    metrics = Metrics("node1")
    invalid = InvalidValues(metrics)
    problem = Invalid(PATH, "a JSON object", "42")
    with caplog.at_level(logging.ERROR):
        assert invalid.report(problem, "migration", 3)
        assert not invalid.report(problem, "migration", 3)  # every later pass: quiet
        assert invalid.report(problem, "migration", 4)  # a new bad version: reported
        invalid.valid(PATH)  # fixed (or gone) ...
        assert invalid.report(problem, "migration", 4)  # ... and bad again: reported
        assert invalid.report(Invalid("/pvc/x", "y", "z"), "no such kind", 1)
    assert caplog.text.count(f"invalid value in ZooKeeper: {PATH}: '42' is not valid; expected a JSON object") == 3
    assert metrics.registry.get_sample_value("pvc_invalid_values_total", {"kind": "migration"}) == 3
    # label values are a fixed list: an unknown kind is counted as node_key
    assert metrics.registry.get_sample_value("pvc_invalid_values_total", {"kind": "node_key"}) == 1
