"""A few ZooKeeper keys kept current by data watches, with their versions.

For values a daemon decides on often and that change rarely (its own node's daemon and domain
states): reading them from here costs nothing, and a write that depends on them checks their
versions in its own transaction, so a copy one change behind makes that write fail instead of
acting on it (the caller then reads them fresh).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from pvc_cluster_common._store import Versioned

if TYPE_CHECKING:
    from pvc_cluster_common._store import ClusterStore

# {path: (text, version), or None when the key does not exist}
Values = dict[str, Versioned | None]


class WatchedKeys:
    def __init__(self, store: ClusterStore, paths: Iterable[str]) -> None:
        self.store = store
        self.paths = tuple(paths)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._values: Values = {}

    def start(self) -> None:
        """Set the watches (the store keeps them across reconnections and new sessions)."""
        for path in self.paths:
            self.store.watch_data(path, self._updater(path))

    def _updater(self, path: str) -> Callable[[Versioned | None], None]:
        def update(value: Versioned | None) -> None:
            with self._lock:
                self._values[path] = value
                self._changed.notify_all()

        return update

    def snapshot(self) -> Values | None:
        """{path: (text, version), or None when the key does not exist}; None until every watch
        has answered once."""
        with self._lock:
            return self._snapshot()

    def _snapshot(self) -> Values | None:
        return dict(self._values) if len(self._values) == len(self.paths) else None

    def wait_for(self, predicate: Callable[[Values | None], bool], timeout_s: float) -> bool:
        """Wait until ``predicate(snapshot)`` holds; False on timeout."""
        with self._changed:
            return self._changed.wait_for(lambda: predicate(self._snapshot()), timeout_s)
