"""The daemon context (node_daemon/context.py): every service reaches the same parts through it."""

from __future__ import annotations

from types import SimpleNamespace

from pvc_cluster_common._decode import Invalid
from pvc_cluster_common._schema import Schema
from pvc_node_daemon.context import DaemonContext, Service


def test_services_made_from_one_context_share_its_parts():
    store = SimpleNamespace(schema=Schema("/pvc"))
    config = SimpleNamespace(keepalive_interval_s=1.0)
    ctx = DaemonContext("n1", config, store)
    first, second = Service(ctx), Service(ctx)
    assert first.domains is second.domains is ctx.domains
    assert first.invalid is second.invalid is ctx.invalid
    assert (first.node, first.config, first.store, first.schema) == ("n1", config, store, store.schema)
    assert first.hypervisor is None and first.metrics is None


def test_an_invalid_value_is_reported_once_whichever_service_meets_it():
    counted: list[str] = []
    ctx = DaemonContext(
        "n1", None, SimpleNamespace(schema=Schema("/pvc")), metrics=SimpleNamespace(invalid_value=counted.append)
    )
    problem = Invalid("/pvc/domains/u1/state", "not a VM state", "bogus")
    assert Service(ctx).invalid.report(problem, "state", 3)
    assert not Service(ctx).invalid.report(problem, "state", 3)  # the same version, met by another service
    assert counted == ["state"]
