"""Invalid values found in ZooKeeper: logged once per version of their key, and counted.

Anything can be written into any key. The decoders (``pvc_cluster_common._records``) turn a bad
value into an ``Invalid`` naming the key and what is accepted; the daemon then goes on without it
(the VM concerned is left alone, the figure reads as 0) and reports it here. The daemon reads the
same keys again and again (every watch event, every periodic pass), so a report is made once per
version of the key: a new bad value is reported again, the same one is not, and a key that
becomes valid again (or disappears) is forgotten.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from .log import get_logger

if TYPE_CHECKING:
    from pvc_cluster_common._decode import Invalid

    from .metrics import Metrics

log = get_logger(__name__)

# The kinds of keys reported, the only label values of the metric.
KINDS = (
    "xml",
    "migration",
    "state",
    "node",
    "lastnode",
    "meta",
    "node_key",
    "runningdomains",
    "reservation",
    "history",
    "address",
)


class InvalidValues:
    def __init__(self, metrics: Metrics | None = None) -> None:
        self.metrics = metrics
        self._lock = threading.Lock()
        self._reported: dict[str, object] = {}  # path -> version (or value) last reported

    def report(self, problem: Invalid, kind: str, version: object = None, consequence: str = "ignored") -> bool:
        """Report ``problem`` (an Invalid) about a key of ``kind`` at ``version`` (the znode
        version, or any token that changes with the value). True when it was new and logged."""
        token = version if version is not None else problem.value
        with self._lock:
            if self._reported.get(problem.path) == token:
                return False
            self._reported[problem.path] = token
        log.error("invalid value in ZooKeeper: %s; %s", problem, consequence)
        if self.metrics:
            self.metrics.invalid_value(kind if kind in KINDS else "node_key")
        return True

    def valid(self, path: str) -> None:
        """The key at ``path`` is valid again, or gone: a later bad value is reported afresh."""
        with self._lock:
            self._reported.pop(path, None)

    def reported(self) -> dict[str, object]:
        with self._lock:
            return dict(self._reported)
