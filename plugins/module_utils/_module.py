# -*- coding: utf-8 -*-
# Copyright: pvc.cluster developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
#
# PRIVATE: this module is internal to the pvc.cluster collection.
# It may change without notice; do not import it from other collections.
"""The AnsibleModule glue every pvc.cluster module shares.

* ``ZK_ARGUMENT_SPEC``: the ZooKeeper connection options (documented once in
  ``doc_fragments/_zk.py``), merged into each module's own spec by :func:`build_module`, which also
  reports a missing kazoo/lxml with ``missing_required_lib``.
* :func:`cluster_session`: a started :class:`ClusterStore` for the with-block, checked to hold a
  pvc.cluster whose security fits the credentials given (``ClusterStore.verify_cluster``) before
  the module reads or writes anything, always stopped on the way out; ``StoreError`` (unreachable, conflict) and :class:`ModuleFailure` become
  ``fail_json`` with the message and no traceback. Every read of the store returns what it read or
  raises (None stands only for a key that does not exist), so the task fails at a read that could
  not be made instead of acting on, or reporting, data it could not read.
* :class:`Differences`: the one place ``changed`` and the ``diff`` come from.

Module logic raises :class:`ModuleFailure` (or the shared errors); only the session turns them into
``fail_json``.
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

from ansible.module_utils.basic import AnsibleModule, env_fallback, missing_required_lib

from . import _schema as S
from ._domain_xml import LXML_IMPORT_ERROR
from ._meta import CONCRETE_SELECTORS, MIGRATION_METHODS, MetaError, VMMeta, validate_meta_updates
from ._report import meta_dict
from ._store import KAZOO_IMPORT_ERROR, ClusterStore, ConflictError, ConnectionOptions, StoreError, quiet_client_logging

DEFAULT_ROOT = "/pvc"
DEFAULT_TIMEOUT_S = 10.0

ZK_ARGUMENT_SPEC = {
    "zk_hosts": {"type": "str", "fallback": (env_fallback, ["PVC_ZK_HOSTS"])},
    "zk_root": {"type": "str", "default": DEFAULT_ROOT, "fallback": (env_fallback, ["PVC_ZK_ROOT"])},
    "zk_timeout": {"type": "float", "default": DEFAULT_TIMEOUT_S, "fallback": (env_fallback, ["PVC_ZK_TIMEOUT"])},
    "zk_username": {"type": "str", "no_log": False, "fallback": (env_fallback, ["PVC_ZK_USERNAME"])},
    "zk_password": {"type": "str", "no_log": True, "fallback": (env_fallback, ["PVC_ZK_PASSWORD"])},
    "zk_tls": {"type": "bool", "default": False, "fallback": (env_fallback, ["PVC_ZK_TLS"])},
    "zk_tls_ca": {"type": "path", "fallback": (env_fallback, ["PVC_ZK_TLS_CA"])},
    "zk_tls_cert": {"type": "path", "fallback": (env_fallback, ["PVC_ZK_TLS_CERT"])},
    "zk_tls_key": {"type": "path", "no_log": False, "fallback": (env_fallback, ["PVC_ZK_TLS_KEY"])},
    "zk_tls_verify": {"type": "bool", "default": True, "fallback": (env_fallback, ["PVC_ZK_TLS_VERIFY"])},
}
ZK_REQUIRED_TOGETHER = [["zk_username", "zk_password"], ["zk_tls_cert", "zk_tls_key"]]

# The VM meta options (pvc.cluster.vm, pvc.cluster.vm_meta; doc_fragments/_vm_meta.py). None = unchanged.
META_ARGUMENT_SPEC = {
    S.META_MIGRATION_METHOD: {"type": "str", "choices": list(MIGRATION_METHODS)},
    S.META_NODE_SELECTOR: {"type": "str", "choices": ["default"] + list(CONCRETE_SELECTORS)},
    S.META_NODE_LIMIT: {"type": "list", "elements": "str"},
    S.META_NODE_AUTOSTART: {"type": "bool"},
    S.META_MIGRATION_MAX_DOWNTIME_MS: {"type": "int"},
    S.META_MIGRATION_AUTO_CONVERGE: {"type": "bool"},
}

# Bounds of every module's wait_timeout (seconds). A week is longer than any maintenance step
# (the largest flush moves its VMs in hours) and far below what Python's timers accept
# (threading.TIMEOUT_MAX); a larger figure used to fail only after the request was written.
MIN_WAIT_TIMEOUT_S = 1
MAX_WAIT_TIMEOUT_S = 7 * 24 * 3600

WHERE_HOSTS = (
    "set zk_hosts on the task, through module_defaults (group/pvc.cluster.all), "
    "or in the environment variable PVC_ZK_HOSTS"
)


class ModuleFailure(Exception):
    """Raised by module logic: ``msg`` plus extra result keys for ``fail_json``."""

    def __init__(self, msg: str, **result) -> None:
        super().__init__(msg)
        self.msg = msg
        self.result = result


def check_wait_timeout(params: dict) -> None:
    """Raise ModuleFailure unless wait_timeout (when given) is within its documented bounds."""
    value = params.get("wait_timeout")
    if value is not None and not MIN_WAIT_TIMEOUT_S <= value <= MAX_WAIT_TIMEOUT_S:
        raise ModuleFailure(
            f"wait_timeout must be a number of seconds from {MIN_WAIT_TIMEOUT_S} to {MAX_WAIT_TIMEOUT_S} "
            f"(7 days), not {value}"
        )


def check_names(params: dict, options) -> None:
    """Raise ModuleFailure when one of ``options`` is given but empty (or only blanks): an empty
    name never means "every one" or "let the cluster choose"; leave the option out for that."""
    for option in options:
        value = params.get(option)
        if value is not None and not str(value).strip():
            raise ModuleFailure(f"{option} must not be empty")


def argument_spec(module_spec: dict) -> dict:
    """The module's own options plus the ZooKeeper options (a new dict; the inputs are not changed)."""
    spec = copy.deepcopy(ZK_ARGUMENT_SPEC)
    clash = set(spec) & set(module_spec)
    if clash:
        raise ValueError(f"module options clash with the ZooKeeper options: {sorted(clash)}")
    spec.update(copy.deepcopy(module_spec))
    return spec


def build_module(module_spec: dict, needs_lxml: bool = True, **kwargs) -> AnsibleModule:
    """The AnsibleModule with the common options merged in; fails when kazoo or lxml is missing."""
    required_together = list(ZK_REQUIRED_TOGETHER) + list(kwargs.pop("required_together", []))
    module = AnsibleModule(
        argument_spec=argument_spec(module_spec),
        required_together=required_together,
        supports_check_mode=True,
        **kwargs,
    )
    if KAZOO_IMPORT_ERROR is not None:
        module.fail_json(msg=missing_required_lib("kazoo"), exception=KAZOO_IMPORT_ERROR)
    if needs_lxml and LXML_IMPORT_ERROR is not None:
        module.fail_json(msg=missing_required_lib("lxml"), exception=LXML_IMPORT_ERROR)
    return module


def check_before_connecting(module: AnsibleModule, *checks: Callable[[dict], Any]) -> Any:
    """A module's main, first: each ``check(params)`` in turn, before anything connects (a
    ModuleFailure fails the task at once). Returns what the first check returned."""
    try:
        found = [check(module.params) for check in checks]
    except ModuleFailure as exc:
        module.fail_json(msg=exc.msg)
    return found[0] if found else None


def exit_from_session(module: AnsibleModule, run: Callable[..., dict], *args: Any) -> None:
    """A module's main, then: ``run(module, session, *args)`` in a cluster session
    (``cluster_session``: its failures fail the task), and the task exits with what it returned."""
    with cluster_session(module) as session:
        result = run(module, session, *args)
    module.exit_json(**result)


_OPTION_NAMES = {
    "hosts": "zk_hosts",
    "root": "zk_root",
    "timeout_s": "zk_timeout",
    "auth_username": "zk_username",
    "auth_password": "zk_password",
    "tls": "zk_tls",
    "tls_ca": "zk_tls_ca",
    "tls_cert": "zk_tls_cert",
    "tls_key": "zk_tls_key",
    "tls_verify": "zk_tls_verify",
}
# a field name as a word of its own (not inside a path or a quoted value)
_OPTION_NAME_RE = re.compile(
    r"(?<![\w/.'\"-])(" + "|".join(sorted(_OPTION_NAMES, key=len, reverse=True)) + r")(?![\w/.'\"-])"
)


def option_names(message: str) -> str:
    """A message of the store with its field names (tls_ca, timeout_s...) replaced by the
    option names users set (zk_tls_ca, zk_timeout...)."""
    return _OPTION_NAME_RE.sub(lambda m: _OPTION_NAMES[m.group(1)], message)


def connection_options(params: dict) -> ConnectionOptions:
    """ConnectionOptions from the module parameters. Raises ValueError naming every problem."""
    hosts = params.get("zk_hosts")
    if not hosts or not str(hosts).strip():
        raise ValueError(f"no ZooKeeper servers given: {WHERE_HOSTS}")
    tls_files = [name for name in ("zk_tls_ca", "zk_tls_cert", "zk_tls_key") if params.get(name)]
    if tls_files and not params.get("zk_tls"):
        # the store ignores them then; a forgotten zk_tls would silently connect without TLS
        raise ValueError(
            f"{', '.join(tls_files)} {'is' if len(tls_files) == 1 else 'are'} set but zk_tls is false: "
            "set zk_tls to true to connect with TLS, or leave the TLS files out"
        )
    timeout_s = params.get("zk_timeout")
    # an empty zk_root is refused by the store's path rules: it never means the default silently
    root = params.get("zk_root")
    options = ConnectionOptions(
        hosts=str(hosts).strip(),
        root=DEFAULT_ROOT if root is None else root,
        timeout_s=timeout_s if timeout_s is not None else DEFAULT_TIMEOUT_S,
        auth_username=params.get("zk_username") or None,
        auth_password=params.get("zk_password") or None,
        tls=bool(params.get("zk_tls")),
        tls_ca=params.get("zk_tls_ca") or None,
        tls_cert=params.get("zk_tls_cert") or None,
        tls_key=params.get("zk_tls_key") or None,
        tls_verify=params.get("zk_tls_verify") is not False,
    )
    try:
        options.validate()
    except ValueError as exc:
        # the store names its fields (tls_ca, timeout_s...): name the module options instead
        raise ValueError(option_names(str(exc))) from None
    return options


def meta_updates(params: dict, node_names=None) -> dict[str, str]:
    """The meta changes the task asks for, as stored text (omitted options left out).

    Raises ModuleFailure for an invalid value, or a node_limit naming nodes that are not in
    ``node_names`` (when given).
    """
    try:
        updates = validate_meta_updates({key: params.get(key) for key in META_ARGUMENT_SPEC})
    except MetaError as exc:
        raise ModuleFailure(str(exc)) from None
    if node_names is not None and S.META_NODE_LIMIT in params and params.get(S.META_NODE_LIMIT):
        unknown = [name for name in params[S.META_NODE_LIMIT] if name.strip() and name.strip() not in node_names]
        if unknown:
            raise ModuleFailure(
                f"node_limit names {', '.join(unknown)}, which {'is' if len(unknown) == 1 else 'are'} not "
                f"a node of this cluster (nodes: {', '.join(sorted(node_names)) or 'none registered'})"
            )
    return updates


class MetaPlan:
    """The meta a task sets: per given key the normalised value before and after, and the keys to write."""

    def __init__(self, current: VMMeta, updates: dict[str, str]) -> None:
        invalid = {
            key for key in S.META_KEYS if any(warning.startswith(f"meta {key}:") for warning in current.warnings)
        }
        parsed = VMMeta.from_store(updates)
        new = replace(current, warnings=(), **{key: getattr(parsed, key) for key in updates})
        self.before = meta_dict(current)
        self.after = meta_dict(new)
        self.differences = Differences()
        self.writes: dict[str, str] = {}
        for key, text in updates.items():
            # a stored value that cannot be parsed is replaced even by the value it was read as
            shown = self.before[key] if key not in invalid else f"(invalid stored value, read as {self.before[key]!r})"
            self.differences.add(key, shown, self.after[key])
            if self.before[key] != self.after[key] or key in invalid:
                self.writes[key] = text


class Session:
    """A started store for one module run."""

    def __init__(self, module: AnsibleModule, store: ClusterStore) -> None:
        self.module = module
        self.store = store
        self.schema = store.schema
        # what this run has written, in words: a failure after a write must say what was done
        self.written: list[str] = []

    def commit(
        self, values: dict, expect_versions: dict | None = None, delete=(), create=(), what: str = "its change"
    ) -> dict:
        """``store.commit``, recorded;
        ``what`` names the change for a failure later in the run."""
        versions = self.store.commit(values, expect_versions, delete, create)
        self.wrote(what)
        return versions

    def wrote(self, what: str) -> None:
        """Record a write made without :meth:`commit` (e.g. a migration request)."""
        self.written.append(what)

    def after_writes(self) -> str:
        """The note a failure after this run's writes ends with ('' when it wrote nothing)."""
        if not self.written:
            return ""
        return f"; this task had already written {' and '.join(self.written)} (committed in ZooKeeper)"


_session_counter = 0


@contextmanager
def cluster_session(module: AnsibleModule):
    """Yield a :class:`Session`; convert failures to ``fail_json``; always stop the store."""
    global _session_counter
    try:
        options = connection_options(module.params)
    except ValueError as exc:
        module.fail_json(msg=str(exc))
    _session_counter += 1
    log = logging.getLogger(f"ansible_collections.pvc.cluster.session{_session_counter}")
    log.propagate = False
    log.setLevel(logging.DEBUG)
    log.addHandler(logging.NullHandler())  # the store's failures reach the task as StoreError, not stderr
    quiet_client_logging()  # off the module's stderr: the store reports connection trouble itself
    try:
        store = ClusterStore(options, logger=log)
    except StoreError as exc:
        module.fail_json(msg=str(exc))
    try:
        try:
            store.start()
            # before anything is read or written: a pvc.cluster at zk_root, and credentials that fit it
            store.verify_cluster()
        except StoreError as exc:
            module.fail_json(msg=str(exc))
        session = Session(module, store)
        try:
            yield session
        except ModuleFailure as exc:
            # a failure after a write (a wait that timed out, a start that failed) says what was written
            if session.written:
                exc.result.setdefault("changed", True)
            module.fail_json(msg=exc.msg + session.after_writes(), **exc.result)
        except ConflictError as exc:
            if session.written:
                module.fail_json(
                    msg=f"the cluster changed while this task ran{session.after_writes()}; nothing more was "
                    f"written; run it again ({exc})",
                    changed=True,
                )
            module.fail_json(msg=f"the cluster changed while this task ran; nothing was written; run it again ({exc})")
        except StoreError as exc:
            module.fail_json(msg=str(exc) + session.after_writes(), changed=bool(session.written))
    finally:
        store.stop()


class Differences:
    """Compared fields of one object: ``changed`` and the ``diff`` come from the same entries."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[object, object]] = {}

    def add(self, key: str, before, after) -> None:
        self._entries[key] = (before, after)

    @property
    def changed(self) -> bool:
        return any(before != after for before, after in self._entries.values())

    @property
    def changed_keys(self) -> list[str]:
        return [key for key, (before, after) in self._entries.items() if before != after]

    def before(self) -> dict:
        return {key: before for key, (before, _after) in self._entries.items()}

    def after(self) -> dict:
        return {key: after for key, (_before, after) in self._entries.items()}

    def diff(self) -> dict:
        return {"before": self.before(), "after": self.after()}
