"""What every service of the node daemon shares: one context instead of the same six arguments.

``NodeDaemon`` builds one :class:`DaemonContext` and hands it to each service (keepalive,
reconciler, migration agent, flush/ready worker, HA); a test builds one with the parts it needs
(``hypervisor`` may be None for a service that never asks libvirt).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .domains import DomainTable
from .invalid import InvalidValues
from .log import get_logger

if TYPE_CHECKING:
    from pvc_cluster_common._schema import Schema

    from .hypervisor import Hypervisor
    from .metrics import Metrics

log = get_logger(__name__)


class Outage:
    """What a service's passes say while ZooKeeper cannot answer them (an UnreachableError
    caught at the top of a pass): once when the first pass fails, once when one succeeds again,
    DEBUG in between. Nothing is decided from a read that failed: the pass ends there and the
    next one reads again."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._down = False
        self._mutex = threading.Lock()

    @property
    def down(self) -> bool:
        return self._down

    def failed(self, exc: Exception) -> None:
        with self._mutex:
            first, self._down = not self._down, True
        if first:
            log.warning("%s: ZooKeeper cannot be read (%s); nothing decided, tried again next pass", self.what, exc)
        else:
            log.debug("%s: still no answer from ZooKeeper: %s", self.what, exc)

    def passed(self) -> None:
        with self._mutex:
            was, self._down = self._down, False
        if was:
            log.info("%s: ZooKeeper answers again", self.what)


@dataclass
class DaemonContext:
    """This node's name, its configuration (config.Config), its ZooKeeper store (the
    ClusterStore), its hypervisor driver, the watch-fed VM table, the metrics (None when
    disabled) and, made from them, the reporter of invalid values read from ZooKeeper (one per
    daemon, so that a value is reported once whichever service meets it)."""

    node: str
    config: Any
    store: Any
    hypervisor: Hypervisor | None = None
    domains: DomainTable = field(default_factory=DomainTable)
    metrics: Metrics | None = None
    invalid: InvalidValues = field(init=False)

    def __post_init__(self) -> None:
        self.invalid = InvalidValues(self.metrics)

    @property
    def schema(self) -> Schema:
        schema: Schema = self.store.schema
        return schema


class Service:
    """A service of the daemon: it reaches what it shares with the others through its context
    (``self.ctx``), by the names the services have always used."""

    def __init__(self, ctx: DaemonContext) -> None:
        self.ctx = ctx

    @property
    def node(self) -> str:
        return self.ctx.node

    @property
    def config(self) -> Any:
        return self.ctx.config

    @property
    def store(self) -> Any:
        return self.ctx.store

    @property
    def schema(self) -> Schema:
        return self.ctx.schema

    @property
    def hypervisor(self) -> Any:
        return self.ctx.hypervisor

    @property
    def domains(self) -> DomainTable:
        return self.ctx.domains

    @property
    def metrics(self) -> Metrics | None:
        return self.ctx.metrics

    @property
    def invalid(self) -> InvalidValues:
        return self.ctx.invalid
