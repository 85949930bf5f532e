# -*- coding: utf-8 -*-
# Copyright: pvc.cluster developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
#
# PRIVATE: this module is internal to the pvc.cluster collection and its node daemon.
# It may change without notice; do not import it from other collections.
"""The cluster store: one kazoo connection to ZooKeeper, reads, transactional writes and locks.

Used by the node daemon (``pvc_cluster_common._store``) and by the Ansible modules
(``ansible_collections.pvc.cluster.plugins.module_utils._store``). Paths come from ``_schema``.

Every accessor returns what it read or raises, so that "missing", "unreachable" and "changed
concurrently" are never confused: MissingError, UnreachableError and ConflictError, all under
StoreError. ``get`` returns a ``Versioned`` or raises MissingError; ``find``/``find_text``,
``get_many`` and ``get_round`` answer None for a key that does not exist (and only for that);
``list_children`` raises MissingError (or answers [] with ``missing_ok``); ``exists`` says True or
False, never for a key it could not look at; ``commit`` and ``delete`` are the only writes.

Watches, session listeners, ephemeral keys and locks are store methods too: nothing else in the
collection or the daemon talks to ZooKeeper (tests/common/test_store_door.py).

Every call waits at most ``timeout_s`` for a lost connection to come back, then at most ``timeout_s``
for the answer. A write that fails after its request was sent may still have been applied
(ZooKeeper's connection-loss semantics): callers re-read rather than assume.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import select
import socket
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple
from contextlib import contextmanager
from dataclasses import dataclass, field

from ._schema import PERM_ALL, PERM_RWCD, SCHEMA_VERSION, AclRule, Schema

try:
    from kazoo import exceptions as kz
    from kazoo.client import KazooClient, KazooState
    from kazoo.handlers.threading import SequentialThreadingHandler
    from kazoo.handlers.utils import fileobj_to_fd
    from kazoo.recipe.lock import Lock
    from kazoo.security import ACL, Id, make_digest_acl_credential
except ImportError:
    KAZOO_IMPORT_ERROR: str | None = traceback.format_exc()
    KazooClient = KazooState = Lock = kz = SequentialThreadingHandler = None
    ACL = Id = make_digest_acl_credential = None
else:
    KAZOO_IMPORT_ERROR = None


# poll() events that mean "the descriptor failed or hung up"
_POLL_FAILED = select.POLLERR | select.POLLHUP | select.POLLNVAL


if SequentialThreadingHandler is not None:

    class PollingHandler(SequentialThreadingHandler):  # type: ignore[misc]  # kazoo has no type information
        """kazoo's threading handler, waiting with one poll() call.

        kazoo's connection thread waits before every single request it sends and every answer
        it reads; its stock ``select`` builds and closes an epoll set each time (four system
        calls where poll needs one). With every daemon watching every VM this wait is the
        hottest path of the process: measured on the CI machines, a round of 17 parallel reads
        takes about half the time with this handler.
        """

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self._pollers = threading.local()

        def select(self, rlist, wlist, xlist, timeout=None):
            rfds = tuple(fileobj_to_fd(obj) for obj in rlist)
            wfds = tuple(fileobj_to_fd(obj) for obj in wlist)
            # The connection thread waits on the same one or two descriptors thousands of times
            # a second: keep one poll object per set (per thread; poll registers fd numbers, so
            # a reconnection's new socket simply makes a new set).
            pollers = self._pollers.__dict__.setdefault("by_fds", {})
            poller = pollers.get((rfds, wfds))
            if poller is None:
                if len(pollers) > 16:
                    pollers.clear()
                poller = select.poll()
                for fd in set(rfds) | set(wfds):
                    poller.register(fd, (select.POLLIN if fd in rfds else 0) | (select.POLLOUT if fd in wfds else 0))
                pollers[(rfds, wfds)] = poller
            ready_r: list[Any] = []
            ready_w: list[Any] = []
            # errors and hang-ups count as ready, like select(): the reader then sees the failure
            for fd, events in poller.poll(None if timeout is None else max(0.0, timeout) * 1000):
                failed = events & _POLL_FAILED
                if events & select.POLLIN or failed:
                    ready_r.extend(obj for obj, obj_fd in zip(rlist, rfds) if obj_fd == fd)
                if events & select.POLLOUT or failed:
                    ready_w.extend(obj for obj, obj_fd in zip(wlist, wfds) if obj_fd == fd)
            return ready_r, ready_w, []


# Lock acquisition: attempts, and the first pause between them (doubled after each: 0.1 0.2 0.4 0.8 s).
LOCK_ATTEMPTS = 5
LOCK_BACKOFF_S = 0.1
# Longest pause between reconnection attempts (kazoo's default grows to an hour). Short, so that a
# client comes back within its session timeout after an outage and keeps its session.
RECONNECT_MAX_DELAY_S = 1.0


# Bounds of ConnectionOptions.timeout_s (seconds). kazoo sends the timeout to ZooKeeper as a
# 32-bit count of milliseconds (its connection thread dies above about 24.8 days), the server
# clamps the session timeout to its maxSessionTimeout (40 s by default) anyway, and every wait
# of the store must stay within what Python's timers take; an hour covers any real deployment.
MIN_TIMEOUT_S = 0.1
MAX_TIMEOUT_S = 3600.0
# The permissions a world:anyone ACL entry of an open cluster's root grants (READ | WRITE | CREATE | DELETE).
_OPEN_PERMS = 1 | 2 | 4 | 8
# A ZooKeeper digest id: "username:" and the base64 of a SHA-1 digest.
_DIGEST_ID = re.compile(r"[^:\s]+:[A-Za-z0-9+/]{27}=")
# The longest cluster root accepted (ZooKeeper paths are sent whole with every request).
MAX_ROOT_LENGTH = 1024


def root_problem(root) -> str | None:
    """Why ``root`` is not a cluster root ZooKeeper accepts (its path rules), or None."""
    if not isinstance(root, str) or not root.startswith("/"):
        return f"root must be an absolute znode path like /pvc, not {root!r}"
    if len(root) > MAX_ROOT_LENGTH:
        return f"root must be at most {MAX_ROOT_LENGTH} characters long, not {len(root)}"
    if root == "/":
        return None
    parts = root[1:].split("/")
    if root.endswith("/") or "" in parts:
        return f"root {root!r} has an empty path component (a '//' or a trailing '/'); write it like /pvc"
    if "." in parts or ".." in parts:
        return f"root {root!r} has a '.' or '..' component, which ZooKeeper refuses; write the path without them"
    for char in root:
        code = ord(char)
        if code < 0x20 or 0x7F <= code <= 0x9F or 0xD800 <= code <= 0xF8FF or code >= 0xFFF0:
            return f"root {root!r} contains the character U+{code:04X}, which ZooKeeper refuses in a path"
    return None


class StoreError(Exception):
    """The root of the store's errors: ZooKeeper could not be reached, refused the operation, or
    answered something this code does not accept. The subclasses name the cases callers tell apart."""


class MissingError(StoreError):
    """The key does not exist."""


class UnreachableError(StoreError):
    """ZooKeeper could not be reached, or did not answer in time (the operation may still have been
    applied: re-read rather than assume)."""


class ConflictError(StoreError):
    """A compare-and-set expectation failed: a key changed, vanished or appeared concurrently.
    ``path`` names the key (None when not known)."""

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class LockError(StoreError):
    """A lock could not be acquired within its attempts."""

    def __init__(self, path: str, attempts: int, reason: str) -> None:
        super().__init__(f"could not acquire lock {path} after {attempts} attempts: {reason}")
        self.path = path
        self.attempts = attempts


class Attempts:
    """One budget of attempts for an operation that can meet a conflict (a ConflictError: a key it
    was planned from changed), handed down to every step that tries it again, so that nested
    retries share one limit instead of multiplying theirs. ``again()`` counts a failed attempt
    and says whether another may be made. (A commit's own re-planning when a key appeared or
    vanished meanwhile is part of one attempt: ``ClusterStore.commit``.)"""

    def __init__(self, limit: int) -> None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"an attempt limit must be an int >= 1, not {limit!r}")
        self.limit = limit
        self.failed = 0

    def again(self) -> bool:
        self.failed += 1
        return self.failed < self.limit

    def __str__(self) -> str:
        return f"{self.failed}/{self.limit}"


class _Assumed(Exception):
    """A transaction planned without looking met a key that is missing or has children (internal)."""


class _Raced(Exception):
    """A key appeared or vanished between planning a transaction and committing it (internal)."""


class Versioned(NamedTuple):
    """A value read from ZooKeeper (UTF-8 text) and the version it had: what a version-checked
    write (``commit``'s ``expect_versions``) expects."""

    value: str
    version: int


def text_of(found: Versioned | None) -> str | None:
    """The text of an answer of ``find``/``get_many``/``get_round`` (None for a key that does not exist)."""
    return None if found is None else found.value


# The session states a listener of ``add_session_listener`` is told.
SESSION_CONNECTED = "connected"  # connected with a session (a new one after SESSION_LOST)
SESSION_SUSPENDED = "suspended"  # the connection is gone; the session may still come back
SESSION_LOST = "lost"  # the session expired: its ephemeral znodes went with it


def quiet_client_logging() -> None:
    """Keep the ZooKeeper client library's own log lines (connection trouble, which the store
    reports itself) off the caller's stderr: for the modules and the inventory, whose output is
    Ansible's."""
    for name in ("kazoo",):
        logging.getLogger(name).addHandler(logging.NullHandler())
        logging.getLogger(name).propagate = False


def encode_value(value) -> bytes:
    """The one encoding of values stored in ZooKeeper (always UTF-8 text, or bytes as given)."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        text = value
    elif value is None:
        text = ""
    elif isinstance(value, bool):  # before int: bool is an int
        text = "true" if value else "false"
    elif isinstance(value, (int, float)):
        text = str(value)
    elif isinstance(value, (dict, list, tuple)):
        text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    else:
        raise TypeError(f"cannot store a {type(value).__name__} value in ZooKeeper: {value!r}")
    return text.encode("utf-8")


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0] or "/"


def _depth_order(path: str) -> tuple[int, str]:
    return path.count("/"), path


def _parents_first(paths) -> list[str]:
    """``paths`` in the order given, each moved after those of its ancestors that are among them
    (a transaction creates a parent before its children). ZooKeeper fires the watches of a
    transaction's operations in their order, so a writer's order is the order its watchers learn
    of its changes in."""
    given = set(paths)
    ordered: list[str] = []
    placed: set[str] = set()

    def place(path: str) -> None:
        if path in placed:
            return
        parent = _parent(path)
        while parent not in ("", "/"):
            if parent in given:
                place(parent)  # and its own ancestors before it
                break
            parent = _parent(parent)
        placed.add(path)
        ordered.append(path)

    for path in paths:
        place(path)
    return ordered


def _acl_set(acls, names_only: bool = False) -> set:
    return {
        (acl.perms, acl.id.scheme, _id_name(acl.id.id) if names_only and acl.id.scheme == "digest" else acl.id.id)
        for acl in acls or ()
    }


def _same_acl(found, expected) -> bool:
    """Whether an ACL read from ZooKeeper is ``expected``. ZooKeeper shows a client without the
    ADMIN permission every digest id as "username:x": then the usernames are compared (the hash
    behind them is checked by using the znode, see ``check_acls``)."""
    redacted = any(acl.id.scheme == "digest" and acl.id.id.endswith(":x") for acl in found or ())
    return _acl_set(found, redacted) == _acl_set(expected, redacted)


def _refused(exc: BaseException) -> bool:
    """Whether a StoreError comes from ZooKeeper refusing this client (an ACL)."""
    return kz is not None and isinstance(exc.__cause__, kz.NoAuthError)


def _path_list(paths) -> list[str]:
    return [paths] if isinstance(paths, str) else list(paths)


@dataclass(frozen=True)
class ConnectionOptions:
    """How to reach ZooKeeper. ``hosts`` is kazoo's "h1:port,h2:port[/chroot]" (the chroot must exist)."""

    hosts: str
    root: str = "/pvc"
    timeout_s: float = 10.0
    auth_username: str | None = None
    auth_password: str | None = field(default=None, repr=False)
    tls: bool = False
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_verify: bool = True
    # A node daemon's own identity (username: the node's name) and the operator's digest id
    # ("username:base64(sha1(username:password))", never the password), from which the daemon
    # builds the ACLs of the znodes it creates. Modules leave them out: they are the operator.
    node_name: str | None = None
    node_password: str | None = field(default=None, repr=False)
    operator_digest: str | None = None
    # While a node daemon's passwords are rotated (docs/security.md): the former password of the
    # nodes' identity and of the node's own. The daemon then holds both identities of each and
    # names both in the ACLs of the znodes it creates, so that a daemon not yet moved to the new
    # password and one already moved can each use what the other creates.
    previous_password: str | None = field(default=None, repr=False)
    previous_node_password: str | None = field(default=None, repr=False)
    # The nodes' digest id, for an operator's client that creates a cluster (ensure_schema) before
    # any daemon has: the ACLs it creates must name the nodes. Other operator clients read it
    # from the cluster.
    nodes_digest: str | None = None
    # An open cluster: no authentication, znodes created open to anyone. Only when asked for.
    insecure: bool = False

    def validate(self) -> None:
        """Raise ValueError naming every problem."""
        problems = []
        if not isinstance(self.hosts, str) or not self.hosts.strip():
            problems.append("hosts must name at least one ZooKeeper server as host:port")
        else:
            servers = self.hosts.strip().split("/", 1)[0]
            for server in servers.split(","):
                server = server.strip()
                host, sep, port = server.rpartition(":")
                if not server or (sep and not host):
                    problems.append(f"hosts {self.hosts!r} has an empty server entry")
                elif sep and not server.endswith("]") and not (port.isdigit() and 0 < int(port) < 65536):
                    problems.append(f"hosts entry {server!r} has no valid port")
        root = root_problem(self.root)
        if root:
            problems.append(root)
        if (
            isinstance(self.timeout_s, bool)
            or not isinstance(self.timeout_s, (int, float))
            or not math.isfinite(self.timeout_s)
            or not MIN_TIMEOUT_S <= self.timeout_s <= MAX_TIMEOUT_S
        ):
            problems.append(
                f"timeout_s must be a number of seconds from {MIN_TIMEOUT_S:g} to {MAX_TIMEOUT_S:g}, "
                f"not {self.timeout_s!r}"
            )
        if self.auth_password and not self.auth_username:
            problems.append("auth_password is set but auth_username is not")
        if self.auth_username and not self.auth_password:
            problems.append("auth_username is set but auth_password is not")
        if self.auth_username and ":" in self.auth_username:
            problems.append("auth_username must not contain ':'")
        if self.tls_cert and not self.tls_key:
            problems.append("tls_cert is set but tls_key is not (a client certificate needs its key)")
        if self.tls_key and not self.tls_cert:
            problems.append("tls_key is set but tls_cert is not")
        if self.tls is True:  # with tls false the files are unused, and not checked
            for name, value in (("tls_ca", self.tls_ca), ("tls_cert", self.tls_cert), ("tls_key", self.tls_key)):
                if value and not os.path.isfile(value):
                    problems.append(f"{name} file {value} does not exist")
        if not isinstance(self.tls, bool) or not isinstance(self.tls_verify, bool):
            problems.append("tls and tls_verify must be true or false")
        if not isinstance(self.insecure, bool):
            problems.append("insecure must be true or false")
        if self.node_name is not None:
            problems += self._node_identity_problems()
        elif self.previous_password is not None or self.previous_node_password is not None:
            problems.append("previous_password and previous_node_password are for a node daemon (node_name)")
        if self.nodes_digest is not None and not (
            isinstance(self.nodes_digest, str) and _DIGEST_ID.fullmatch(self.nodes_digest)
        ):
            problems.append("nodes_digest must be the nodes' digest id, username:base64(sha1(username:password))")
        if problems:
            raise ValueError("invalid ZooKeeper connection options: " + "; ".join(problems))

    def _node_identity_problems(self) -> list[str]:
        """What is wrong with a node daemon's identities (``node_name`` is set)."""
        if self.insecure:
            if self.auth_username or self.node_password or self.operator_digest:
                return [
                    "insecure is true, so credentials are refused (an open cluster's znodes would be created "
                    "readable by one user only); leave insecure out to secure the cluster"
                ]
            return []
        problems = []
        if not self.auth_username:
            problems.append(
                "authentication is required: give the nodes' username and password (or insecure: true "
                "for an open cluster anyone can read and write)"
            )
        if not self.node_password:
            problems.append(f"node_password (the password of node {self.node_name}'s own identity) is required")
        if not isinstance(self.operator_digest, str) or not _DIGEST_ID.fullmatch(self.operator_digest):
            problems.append(
                "operator_digest must be the operator's digest id, username:base64(sha1(username:password)) "
                f"(28 characters after the ':'), not {self.operator_digest!r}"
            )
        elif self.operator_digest.split(":", 1)[0] in (self.auth_username, self.node_name):
            problems.append("the operator, the nodes and this node need three different usernames")
        if self.auth_username and self.auth_username == self.node_name:
            problems.append(f"the nodes' username must not be a node's name ({self.node_name})")
        if self.previous_password is not None and self.previous_password == self.auth_password:
            problems.append("previous_password is the nodes' password itself: leave it out, or give the former one")
        if self.previous_node_password is not None and self.previous_node_password == self.node_password:
            problems.append("previous_node_password is node_password itself: leave it out, or give the former one")
        return problems


@dataclass(frozen=True)
class AclIds:
    """The digest ids ("username:hash") ACLs name: the operator, the nodes, and one node's own."""

    operator: str
    nodes: tuple[str, ...]
    own_node: str | None = None
    own_node_id: str | None = None
    # the node's own former digest id, while its password is rotated
    own_node_previous_id: str | None = None


def digest_id(username: str, password: str) -> str:
    """ZooKeeper's digest id of a user: "username:base64(sha1(username:password))"."""
    return make_digest_acl_credential(username, password)


def _id_name(identity: str) -> str:
    return identity.split(":", 1)[0]


def describe_acl(acls) -> str:
    """A list of ACL entries for a message, without the password hashes."""
    names = {1: "r", 2: "w", 4: "c", 8: "d", 16: "a"}
    entries = []
    for acl in acls:
        perms = "".join(letter for bit, letter in names.items() if acl.perms & bit) or "-"
        who = acl.id.id if acl.id.scheme != "digest" else _id_name(acl.id.id)
        entries.append(f"{acl.id.scheme}:{who}:{perms}")
    return ", ".join(sorted(entries)) or "nobody"


_SESSION_STATES: dict[Any, str] = {}
if KazooState is not None:
    _SESSION_STATES = {
        KazooState.CONNECTED: SESSION_CONNECTED,
        KazooState.SUSPENDED: SESSION_SUSPENDED,
        KazooState.LOST: SESSION_LOST,
    }


class StoreLock:
    """A ZooKeeper lock taken through the store (``ClusterStore.lock``, ``ClusterStore.try_lock``)."""

    def __init__(self, store: ClusterStore, lock) -> None:
        self._store = store
        self._lock = lock
        self.path: str = lock.path
        # the session the lock's (ephemeral) node belongs to
        self._session = store.client.client_id

    @property
    def held(self) -> bool:
        """Whether this lock is still ours: acquired, not released, and the session that took it
        still the store's, connected (a lock whose session was lost may be another contender's)."""
        return bool(self._lock.is_acquired) and self._store.connected and self._store.client.client_id == self._session

    def contenders(self) -> list[str]:
        """The identifiers of the lock's holder and of those waiting for it, holder first."""
        try:
            return list(self._lock.contenders())
        except kz.KazooException as exc:
            raise StoreError(f"list the contenders of lock {self.path}: {_describe(exc)}") from exc


class ClusterStore:
    """One cluster's state in ZooKeeper. Thread-safe. The only code that talks to ZooKeeper:
    everything else reads, writes, watches, locks and listens through its methods (``client``, the
    KazooClient, is for the store's own tests)."""

    def __init__(self, options: ConnectionOptions, logger: logging.Logger | None = None) -> None:
        if KazooClient is None:
            raise StoreError(
                "the kazoo Python library is required: " + (KAZOO_IMPORT_ERROR or "").strip().splitlines()[-1]
            )
        options.validate()
        self.options = options
        self.log = logger or logging.getLogger(__name__)
        self.schema = Schema(options.root)
        # Written into lock contender znodes, so that `Lock.contenders()` names the holders.
        self.lock_identifier = socket.gethostname()
        self._live = threading.Event()
        self._started = False
        self._stopped = False
        # Lock nodes we failed to delete (lost connection): (lock path, our contender prefix).
        self._orphans: set[tuple[str, str]] = set()
        self._orphans_mutex = threading.Lock()
        # add_session_listener's listeners, and the wrappers kazoo calls
        self._listeners: dict[Callable[[str], None], Callable[[Any], None]] = {}
        self._listeners_mutex = threading.Lock()
        kwargs = {
            "hosts": options.hosts,
            "handler": PollingHandler(),
            "timeout": options.timeout_s,
            "connection_retry": {"max_tries": -1, "delay": 0.1, "backoff": 2, "max_delay": RECONNECT_MAX_DELAY_S},
        }
        # The identities ACLs name: None for an open cluster (and, until verify_cluster has read
        # them from the cluster, for a module's client).
        self.acl_ids: AclIds | None = None
        # whether verify_cluster found the cluster open to anyone (None: not verified)
        self.cluster_open: bool | None = None
        if options.auth_username and options.auth_password:  # validate(): both or neither
            user, password = options.auth_username, options.auth_password
            auth_data = [("digest", f"{user}:{password}")]
            if options.node_name and options.node_password and options.operator_digest:
                auth_data.append(("digest", f"{options.node_name}:{options.node_password}"))
                nodes: tuple[str, ...] = (digest_id(user, password),)
                if options.previous_password:
                    auth_data.append(("digest", f"{user}:{options.previous_password}"))
                    nodes += (digest_id(user, options.previous_password),)
                own_previous = None
                if options.previous_node_password:
                    auth_data.append(("digest", f"{options.node_name}:{options.previous_node_password}"))
                    own_previous = digest_id(options.node_name, options.previous_node_password)
                self.acl_ids = AclIds(
                    operator=options.operator_digest,
                    nodes=nodes,
                    own_node=options.node_name,
                    own_node_id=digest_id(options.node_name, options.node_password),
                    own_node_previous_id=own_previous,
                )
            elif options.nodes_digest and not options.node_name:
                self.acl_ids = AclIds(operator=digest_id(user, password), nodes=(options.nodes_digest,))
            kwargs["auth_data"] = auth_data
            # until the cluster's identities are known (verify_cluster), this user's alone
            kwargs["default_acl"] = [ACL(PERM_ALL, Id("digest", digest_id(user, password)))]
        if options.tls:
            # verify: the server's certificate chains to the CA *and* names the host connected to
            kwargs.update(
                use_ssl=True,
                ca=options.tls_ca,
                certfile=options.tls_cert,
                keyfile=options.tls_key,
                verify_certs=options.tls_verify,
                check_hostname=options.tls_verify,
            )
        self.client = KazooClient(**kwargs)
        if self.acl_ids is not None:
            # for the znodes kazoo's recipes create (lock contenders): a lock's rule
            self.client.default_acl = self.acl_for(self.schema.node_lock("contender") + "/contender")
        self.client.add_listener(self._on_state)

    # ---- ACLs -------------------------------------------------------------------------------

    @property
    def secured(self) -> bool:
        return self.acl_ids is not None

    def acl_for(self, path: str) -> list | None:
        """The ACL a znode created at ``path`` gets (``Schema.acl_rule`` with this cluster's
        identities), or None in an open cluster (kazoo then creates it open to anyone)."""
        ids = self.acl_ids
        if ids is None:
            return None if not self.options.auth_username else list(self.client.default_acl)
        return self._acl(self.schema.acl_rule(path), ids)

    @staticmethod
    def _acl(rule: AclRule, ids: AclIds) -> list:
        acl = [ACL(PERM_ALL, Id("digest", ids.operator))]
        if rule.nodes:
            acl += [ACL(rule.nodes, Id("digest", node)) for node in ids.nodes]
        if rule.own_node is not None and rule.own_node == ids.own_node and ids.own_node_id:
            acl.append(ACL(PERM_RWCD, Id("digest", ids.own_node_id)))
            if ids.own_node_previous_id:
                acl.append(ACL(PERM_RWCD, Id("digest", ids.own_node_previous_id)))
        return acl

    # ---- connection -------------------------------------------------------------------------

    def start(self) -> ClusterStore:
        if self._stopped:
            raise StoreError("this store was stopped; make a new ClusterStore")
        timeout = self.options.timeout_s
        try:
            self.client.start(timeout=timeout)
        except Exception as exc:  # kazoo's timeout, or a socket/TLS setup error
            self._close_client()
            raise StoreError(
                f"cannot reach ZooKeeper at {self.options.hosts} within {timeout:g} s: {_describe(exc)}"
            ) from exc
        self._started = True
        self.log.info("connected to ZooKeeper at %s", self.options.hosts)
        return self

    def stop(self) -> None:
        """Stop and close the client. Idempotent; a stopped store cannot be started again."""
        if self._stopped:
            return
        self._stopped = True
        self._live.clear()
        self._close_client()

    def _close_client(self) -> None:
        try:
            self.client.stop()
            self.client.close()
        except Exception as exc:  # already stopped or closed: nothing left to free
            self.log.debug("closing the ZooKeeper client: %s", _describe(exc))

    def __enter__(self) -> ClusterStore:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    @property
    def connected(self) -> bool:
        return self._started and not self._stopped and self.client.connected

    def add_session_listener(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(state)`` on every change of the connection: SESSION_CONNECTED,
        SESSION_SUSPENDED or SESSION_LOST. It runs on the store's connection thread and must not
        block; an exception it raises is logged."""

        def on_state(state) -> None:
            try:
                listener(_SESSION_STATES.get(state, SESSION_SUSPENDED))
            except Exception:
                self.log.exception("session listener %r failed", listener)

        with self._listeners_mutex:
            self._listeners[listener] = on_state
        self.client.add_listener(on_state)

    def remove_session_listener(self, listener: Callable[[str], None]) -> None:
        with self._listeners_mutex:
            on_state = self._listeners.pop(listener, None)
        if on_state is not None:
            self.client.remove_listener(on_state)

    def _on_state(self, state) -> None:
        if state == KazooState.CONNECTED:
            if self._started:
                self.log.info("ZooKeeper connection %s: %s again", self.options.hosts, state)
            self._live.set()
            if self._orphans:
                self.client.handler.spawn(self._delete_orphans)
        else:
            self._live.clear()
            if not self._stopped:
                self.log.warning("ZooKeeper connection %s: %s", self.options.hosts, state)

    # ---- calls with timeouts ----------------------------------------------------------------

    def _require_connection(self, what: str) -> None:
        if not self._started or self._stopped:
            raise StoreError(f"{what}: the store is {'stopped' if self._stopped else 'not started'}")
        if not self._live.wait(self.options.timeout_s):
            raise UnreachableError(
                f"{what}: not connected to ZooKeeper at {self.options.hosts} "
                f"(waited {self.options.timeout_s:g} s; state {self.client.state})"
            )

    def _call_many(self, what: str, starters) -> list:
        """Start kazoo async calls together, then collect each answer, with timeouts and our errors."""
        self._require_connection(what)
        pending = [start() for start in starters]
        results = []
        for async_result in pending:
            try:
                results.append(async_result.get(timeout=self.options.timeout_s))
            except self.client.handler.timeout_exception as exc:
                raise UnreachableError(
                    f"{what}: no answer from ZooKeeper at {self.options.hosts} within {self.options.timeout_s:g} s"
                ) from exc
            except kz.NoNodeError as exc:
                raise MissingError(f"{what}: no such key") from exc
            except (kz.ConnectionLoss, kz.SessionExpiredError) as exc:
                raise UnreachableError(f"{what}: {_describe(exc)}") from exc
            except kz.KazooException as exc:
                raise StoreError(f"{what}: {_describe(exc)}") from exc
        return results

    def _call(self, what: str, starter):
        return self._call_many(what, [starter])[0]

    # ---- raising accessors ------------------------------------------------------------------

    def get(self, path: str) -> Versioned:
        """The value and version of a key. Raises MissingError, UnreachableError or StoreError."""
        data, stat = self._call(f"read {path}", lambda: self.client.get_async(path))
        try:
            return Versioned((data or b"").decode("utf-8"), stat.version)
        except UnicodeDecodeError as exc:
            raise StoreError(f"read {path}: the value is not UTF-8 text") from exc

    def find(self, path: str) -> Versioned | None:
        """The value and version of a key, or None when it does not exist (never for any other
        failure), decoded as ``get_many`` decodes. Raises UnreachableError or StoreError."""
        return self.get_round([path])[0][path]

    def find_text(self, path: str) -> str | None:
        """``find``'s text: None when the key does not exist. Raises UnreachableError or StoreError."""
        return text_of(self.find(path))

    def get_many(self, paths) -> dict[str, Versioned | None]:
        """Several keys in one round of parallel requests: every path asked is a key of the
        answer, mapped to its ``Versioned``, or to None when the key does not exist. None never
        stands for a failed read: ZooKeeper not answering raises UnreachableError (any other
        failure StoreError), for the whole round. A value that is not UTF-8 reads with U+FFFD
        in place of its bad bytes (the typed decoders refuse it): one garbage key does not
        keep the others from being read."""
        return self.get_round(paths)[0]

    def get_round(self, paths, lists=()) -> tuple[dict[str, Versioned | None], dict[str, list[str] | None]]:
        """``get_many`` of ``paths`` and the sorted children of ``lists``, all in one round of
        parallel requests, answered in the order sent: ``({path: Versioned or None}, {path:
        [names] or None})``, None only for a key that does not exist. Raises UnreachableError or
        StoreError when any request of the round fails otherwise."""
        found, listed, _zxids = self.get_round_zxids(paths, lists)
        return found, listed

    def get_round_zxids(
        self, paths, lists=()
    ) -> tuple[dict[str, Versioned | None], dict[str, list[str] | None], dict[str, int]]:
        """``get_round``, and the zxid of the last change of the data of every key that exists,
        read or listed (its ``mzxid``: ZooKeeper orders every write of the ensemble, so of two
        keys the one with the higher zxid was written later; a transaction's writes share one).
        Sent in the order given, ``paths`` before ``lists``: one session's requests are answered
        in order, so a key later in the round is read no earlier than one before it."""
        paths, lists = list(paths), list(lists)
        named = paths + lists
        what = f"read {', '.join(named[:3])}" + (f" and {len(named) - 3} more" if len(named) > 3 else "")
        self._require_connection(what)
        pending = [(path, self.client.get_async(path)) for path in paths]
        pending_lists = [(path, self.client.get_children_async(path, include_data=True)) for path in lists]
        listed: dict[str, list[str] | None] = {}
        zxids: dict[str, int] = {}
        for path, async_result in pending_lists:
            answer = self._answer_of("list", path, async_result)
            if answer is None:
                listed[path] = None
                continue
            children, stat = answer
            listed[path] = sorted(children)
            zxids[path] = stat.mzxid
        result: dict[str, Versioned | None] = {}
        for path, async_result in pending:
            answer = self._answer_of("read", path, async_result)
            if answer is None:
                result[path] = None
                continue
            data, stat = answer
            result[path] = Versioned((data or b"").decode("utf-8", errors="replace"), stat.version)
            zxids[path] = stat.mzxid
        return result, listed, zxids

    def _answer_of(self, what: str, path: str, async_result):
        """One answer of a parallel round (``get_round``, ``_subtrees``): None for a missing key;
        raises UnreachableError or StoreError for everything else."""
        try:
            return async_result.get(timeout=self.options.timeout_s)
        except kz.NoNodeError:
            return None
        except self.client.handler.timeout_exception as exc:
            raise UnreachableError(
                f"{what} {path}: no answer from ZooKeeper at {self.options.hosts} within {self.options.timeout_s:g} s"
            ) from exc
        except (kz.ConnectionLoss, kz.SessionExpiredError) as exc:
            raise UnreachableError(f"{what} {path}: {_describe(exc)}") from exc
        except kz.KazooException as exc:
            raise StoreError(f"{what} {path}: {_describe(exc)}") from exc

    def list_children(self, path: str, missing_ok: bool = False) -> list[str]:
        """The sorted names of the children of ``path``. Raises MissingError when ``path`` does
        not exist (``missing_ok``: [] instead), UnreachableError or StoreError."""
        try:
            return sorted(self._call(f"list {path}", lambda: self.client.get_children_async(path)))
        except MissingError:
            if missing_ok:
                return []
            raise

    def exists(self, path: str) -> bool:
        """Whether the key exists. Raises UnreachableError or StoreError (never False for a key
        that could not be looked at)."""
        return self._call(f"exists {path}", lambda: self.client.exists_async(path)) is not None

    def delete(self, paths, recursive: bool = True) -> None:
        """Delete keys (with everything below them unless ``recursive`` is False) in one
        transaction; a missing key is not an error. Raises UnreachableError or StoreError (the
        delete may still have been applied: re-read rather than assume)."""
        self._commit({}, {}, _path_list(paths), set(), recursive)

    def commit(self, values: dict, expect_versions: dict | None = None, delete=(), create=()) -> dict[str, int]:
        """Write ``values`` and delete the ``delete`` subtrees in one transaction.

        Missing keys are created (their parents first, outside the transaction). ``expect_versions``
        maps keys to the version they must still have (written, deleted or only checked keys);
        ``create`` names written keys that must not exist yet. Either failing raises ConflictError
        and nothing is written. Deleting a missing key is not an error (unless a version is expected).
        Returns the new version of every written key. Raises ConflictError, UnreachableError or
        StoreError.
        """
        return self._commit(values, dict(expect_versions or {}), _path_list(delete), set(_path_list(create)))

    def _commit(
        self, values: dict, expect: dict, deletes: list, creates: set, recursive: bool = True
    ) -> dict[str, int]:
        self._check_commit(values, expect, deletes, creates)
        encoded = {path: encode_value(value) for path, value in values.items()}
        try:
            # First as if every written key existed and every deleted key were a leaf (true of
            # almost every write): one round trip. Only if the transaction says otherwise are
            # the keys looked at and the transaction planned again.
            return self._commit_once(encoded, expect, deletes, creates, recursive, assume=True)
        except _Assumed as exc:
            self.log.debug("commit: %s; checking the keys first", exc)
        try:
            return self._commit_once(encoded, expect, deletes, creates, recursive)
        except _Raced as exc:
            # a key appeared or vanished between looking and committing: plan once more, from fresh state
            self.log.info("commit: %s; retrying once", exc)
        try:
            return self._commit_once(encoded, expect, deletes, creates, recursive)
        except _Raced as exc:
            raise StoreError(f"commit: keys kept changing concurrently: {exc}") from None

    @staticmethod
    def _check_commit(values, expect, deletes, creates) -> None:
        for path, version in expect.items():
            if isinstance(version, bool) or not isinstance(version, int) or version < 0:
                raise ValueError(f"expected version of {path} must be an int >= 0, not {version!r}")
        if not creates <= set(values):
            raise ValueError(f"keys to create must be written too: {sorted(creates - set(values))}")
        if creates & set(expect):
            raise ValueError(f"keys to create cannot also expect a version: {sorted(creates & set(expect))}")
        for gone in deletes:
            clash = [p for p in values if p == gone or p.startswith(gone.rstrip("/") + "/")]
            if clash:
                raise ValueError(f"cannot delete {gone} and write {clash[0]} in one commit")

    def _commit_once(
        self, encoded: dict, expect: dict, deletes: list, creates: set, recursive: bool, assume: bool = False
    ) -> dict[str, int]:
        """One planned transaction. ``assume``: plan without looking (written keys other than
        ``creates`` exist, deleted keys are leaves); raises _Assumed when that was wrong."""
        client = self.client
        written = _parents_first(encoded)
        # Keys written with an expected version must exist and keys in ``creates`` must not: the
        # transaction itself checks both, so only the other keys need an existence check, and a
        # version-checked update or a create-only write costs one round trip.
        unknown = [path for path in written if path not in expect and path not in creates]
        if assume:
            existing = set(unknown) | (set(written) & set(expect))
        else:
            stats = self._call_many("commit", [lambda p=p: client.exists_async(p) for p in unknown]) if unknown else []
            existing = {path for path, stat in zip(unknown, stats) if stat is not None} | (set(written) & set(expect))

        ops = []  # (kind, path, guarded, data, version) per transaction operation
        to_create = []
        for path in written:
            if path in existing:
                ops.append(("set", path, path in expect, encoded[path], expect.get(path, -1)))
            else:
                ops.append(("create", path, path in creates, encoded[path], -1))
                to_create.append(path)
        for path in sorted(set(expect) - set(encoded) - set(deletes)):
            ops.append(("check", path, True, None, expect[path]))
        subtrees = {top: [top] for top in deletes} if assume else self._subtrees(deletes, recursive)
        for top in deletes:
            nodes = subtrees[top]
            if not nodes:
                if top in expect:
                    raise ConflictError(f"commit: {top} does not exist (expected version {expect[top]})", top)
                self.log.debug("commit: %s is already gone", top)
            for node in nodes:  # deepest first
                guarded = node == top and top in expect
                ops.append(("delete", node, guarded, None, expect[top] if guarded else -1))
        if not ops:
            return {}

        # Parents of new keys are created only when the transaction says one is missing (most
        # already exist, and checking first would cost a round trip on every write).
        results = self._run_transaction(ops)
        if to_create and any(
            kind == "create" and isinstance(result, kz.NoNodeError) for (kind, *_rest), result in zip(ops, results)
        ):
            parents = set()
            for path in to_create:
                parent = _parent(path)
                while parent in encoded:
                    parent = _parent(parent)
                if parent != "/":
                    parents.add(parent)
            self._create_parents(sorted(parents))
            results = self._run_transaction(ops)
        if assume:
            # After the parents were made, too: a transaction that first failed at a create with
            # no parent only then reaches the keys it assumed (a set of a key that is missing).
            for (kind, path, guarded, _data, _version), result in zip(ops, results):
                if isinstance(result, (kz.RolledBackError, kz.RuntimeInconsistency)) or not isinstance(
                    result, Exception
                ):
                    continue
                # the first real failure: was it one of the assumptions?
                if kind == "set" and not guarded and isinstance(result, kz.NoNodeError):
                    raise _Assumed(f"{path} does not exist")
                if kind == "delete" and not guarded and isinstance(result, kz.NoNodeError):
                    raise _Assumed(f"{path} is already gone")
                if kind == "delete" and recursive and isinstance(result, kz.NotEmptyError):
                    raise _Assumed(f"{path} has children")
                break
        for (kind, path, guarded, _data, _version), result in zip(ops, results):
            if not isinstance(result, Exception) or isinstance(result, (kz.RolledBackError, kz.RuntimeInconsistency)):
                continue
            why = f"{kind} {path}: {_describe(result)}"
            if kind in ("set", "delete") and guarded and isinstance(result, kz.NoNodeError):
                raise ConflictError(f"commit: {path} does not exist (expected version {expect[path]})", path)
            if kind == "create" and guarded and isinstance(result, kz.NodeExistsError):
                raise ConflictError(f"commit: {path} already exists", path)
            if isinstance(result, kz.BadVersionError) or (
                guarded and isinstance(result, (kz.NoNodeError, kz.NodeExistsError))
            ):
                raise ConflictError(f"commit: {path} changed concurrently ({why})", path)
            if isinstance(result, kz.NotEmptyError) and not recursive:
                raise StoreError(f"delete {path}: it has children")
            if isinstance(result, (kz.NodeExistsError, kz.NoNodeError, kz.NotEmptyError)):
                raise _Raced(why)
            raise StoreError(f"commit failed at {why}")
        versions = {}
        for (kind, path, _guarded, _data, _version), result in zip(ops, results):
            if kind == "set":
                versions[path] = result.version
            elif kind == "create":
                versions[path] = 0
        return versions

    def _create_parents(self, paths: list) -> None:
        """Create ``paths`` and their missing ancestors, each with its ACL (kazoo's ensure_path
        would give every level the client's default ACL). The levels that exist are found first:
        creating one that exists is refused for want of the CREATE permission on its parent
        before ZooKeeper says that it exists."""
        levels = set()
        for path in paths:
            while path not in ("", "/"):
                levels.add(path)
                path = _parent(path)
        ordered = sorted(levels, key=_depth_order)
        stats = self._call_many("commit: look at parents", [lambda p=p: self.client.exists_async(p) for p in ordered])
        for path, stat in zip(ordered, stats):
            if stat is not None:
                continue
            try:
                self._call(
                    f"commit: create {path}", lambda p=path: self.client.create_async(p, b"", acl=self.acl_for(p))
                )
            except StoreError as exc:
                if not isinstance(exc.__cause__, kz.NodeExistsError):  # created meanwhile: fine
                    raise

    def _run_transaction(self, ops) -> list:
        txn = self.client.transaction()
        for kind, path, _guarded, data, version in ops:
            if kind == "set":
                txn.set_data(path, data, version=version)
            elif kind == "create":
                txn.create(path, data, acl=self.acl_for(path))
            elif kind == "check":
                txn.check(path, version)
            else:
                txn.delete(path, version=version)
        return self._call("commit", txn.commit_async)

    def _subtrees(self, tops: list, recursive: bool) -> dict:
        """``_subtree`` of several keys; their first levels are listed in one parallel round."""
        if not tops:
            return {}
        if not recursive:
            return {top: self._subtree(top, recursive) for top in tops}
        self._require_connection("list")
        pending = [(top, self.client.get_children_async(top)) for top in tops]
        result: dict[str, Any] = {}
        for top, async_result in pending:
            children = self._answer_of("list", top, async_result)
            if children is None:  # no such key
                result[top] = []
            else:
                result[top] = [top] if not children else self._subtree(top, recursive)
        return result

    def _subtree(self, top: str, recursive: bool = True) -> list[str]:
        """``top`` and (if ``recursive``) every key below it, deepest first; [] when ``top`` does not exist."""
        if not recursive:
            return [top] if self._call(f"exists {top}", lambda: self.client.exists_async(top)) else []
        found = []
        level = [top]
        while level:
            found.extend(level)
            listings = []
            for path in level:
                try:
                    listings.append(
                        (path, self._call(f"list {path}", lambda p=path: self.client.get_children_async(p)))
                    )
                except MissingError:
                    if path == top:
                        return []
                    # deleted meanwhile: the transaction fails on it and the commit is planned again
            level = [f"{path.rstrip('/')}/{child}" for path, children in listings for child in children]
        return found[::-1]

    # ---- watches and ephemeral keys ---------------------------------------------------------

    def watch_data(self, path: str, callback: Callable[[Versioned | None], object]) -> None:
        """Call ``callback(value)`` with the key's value (None while it does not exist) once before
        returning, then after every change, until it returns False. The watch is kept across
        reconnections and new sessions. The callback runs on the store's event thread: it must not
        block, and an exception it raises is logged and ends the watch (the value is untrusted
        text: decode it with ``_decode``, or only compare it). During an outage the call returns at
        once and the first call of ``callback`` comes when the connection is back."""

        def on_data(data, stat) -> bool:
            value = None if stat is None else Versioned((data or b"").decode("utf-8", errors="replace"), stat.version)
            try:
                return callback(value) is not False
            except Exception:
                self.log.exception("watch %s: the callback failed; the watch ends", path)
                return False

        self._register(f"watch {path}", lambda: self.client.DataWatch(path, on_data))

    def watch_children(self, path: str, callback: Callable[[list[str] | None], object]) -> None:
        """Call ``callback(names)`` with the sorted children of ``path`` once before returning, then
        after every change of the list, until it returns False. When ``path`` does not exist the
        callback is called once with None and nothing is watched; when it is deleted later, the
        watch ends without a call. Kept across reconnections and new sessions; runs on the store's
        event thread like ``watch_data``'s; during an outage, armed once the connection is back."""

        def register() -> None:
            answered = []

            def on_children(children) -> bool:
                answered.append(True)
                try:
                    return callback(sorted(children)) is not False
                except Exception:
                    self.log.exception("watch of the children of %s: the callback failed; the watch ends", path)
                    return False

            self.client.ChildrenWatch(path, on_children)  # answers on this thread before it returns
            if not answered:
                callback(None)

        self._register(f"watch of the children of {path}", register)

    def _register(self, what: str, register: Callable[[], object]) -> None:
        """Arm a watch: now when connected (kazoo's recipe reads once, on this thread); during an
        outage on a thread of its own once the connection is back, so that the caller never
        waits for an outage to end (the recipe's first read retries until it is answered)."""
        if self.connected:
            register()
            return
        self.log.debug("%s: no connection; armed once it is back", what)

        def when_back() -> None:
            while not self._live.wait(self.options.timeout_s):
                if self._stopped:
                    return
            if self._stopped:
                return
            try:
                register()
            except Exception as exc:
                self.log.warning("%s: not armed: %s", what, _describe(exc))

        threading.Thread(target=when_back, name="zk-watch", daemon=True).start()

    def follow(
        self, path: str, on_value: Callable[[Versioned | None], None], wanted: Callable[[], bool] = lambda: True
    ) -> None:
        """Keep ``on_value`` told of the key's value (None while it does not exist): read now, and
        after every change for as long as ``wanted()`` (asked at each change) is true.

        Unlike ``watch_data``, which re-reads a key synchronously on the one event thread (with
        many keys watched, events queue behind each other's round trips), each change starts an
        asynchronous read that also re-arms the one-shot watch, so many re-reads are in flight at
        once on the one connection. ``on_value`` runs on the store's event thread and must not
        block. A read that fails (no connection) ends the following: call ``follow`` again after
        SESSION_CONNECTED (``add_session_listener``)."""
        client = self.client

        def on_event(_event=None) -> None:
            if wanted():
                fetch()

        def fetch() -> None:
            try:
                client.get_async(path, watch=on_event).rawlink(answered)
            except Exception as exc:  # not connected
                self.log.debug("watch %s not armed: %s", path, _describe(exc))

        def answered(result) -> None:
            try:
                data, stat = result.get_nowait()
            except kz.NoNodeError:
                # not there (yet): an exists-watch says when it appears
                try:
                    client.exists_async(path, watch=on_event).rawlink(appeared)
                except Exception as exc:
                    self.log.debug("watch %s not armed: %s", path, _describe(exc))
                self._tell(path, on_value, None)
                return
            except Exception as exc:
                self.log.debug(
                    "watch %s: read failed (%s); following it again after a reconnection re-arms it",
                    path,
                    _describe(exc),
                )
                return
            self._tell(path, on_value, Versioned((data or b"").decode("utf-8", errors="replace"), stat.version))

        def appeared(result) -> None:
            try:
                if result.get_nowait() is not None:
                    fetch()
            except Exception as exc:
                self.log.debug("watch %s: exists failed (%s)", path, _describe(exc))

        fetch()

    def _tell(self, path: str, on_value: Callable[[Versioned | None], None], value: Versioned | None) -> None:
        try:
            on_value(value)
        except Exception:  # the event thread must never see one: its other watches would stop
            self.log.exception("watch %s: the callback failed", path)

    def put_ephemeral(self, path: str, value) -> None:
        """Make ``path`` an ephemeral key of this session holding ``value`` (it vanishes with the
        session). A key left by an earlier session of this client's identity that has not expired
        yet is replaced in one transaction: a delete then a create would leave an instant with no
        key, in which a peer could take its owner for gone. Raises UnreachableError or StoreError."""
        data = encode_value(value)
        acl = self.acl_for(path)
        stat = self._call(f"exists {path}", lambda: self.client.exists_async(path))
        session = self.client.client_id
        if stat is not None and (session is None or stat.ephemeralOwner != session[0]):
            txn = self.client.transaction()
            txn.delete(path, version=stat.version)
            txn.create(path, data, acl=acl, ephemeral=True)
            results = self._call(f"replace {path}", txn.commit_async)
            failed = [
                r
                for r in results
                if isinstance(r, Exception) and not isinstance(r, (kz.RolledBackError, kz.RuntimeInconsistency))
            ]
            if failed:
                raise StoreError(f"replace {path}: {_describe(failed[0])}")
        if self._call(f"exists {path}", lambda: self.client.exists_async(path)) is None:
            self._call(
                f"create {path}", lambda: self.client.create_async(path, data, acl=acl, ephemeral=True, makepath=True)
            )

    # ---- schema -----------------------------------------------------------------------------

    def ensure_schema(self) -> bool:
        """Create the base paths and /schema/version (one transaction). True if anything was created.

        Raises StoreError if the cluster has another schema version than this code knows.
        """
        version_path = self.schema.schema_version()
        bases = [path for path in self.schema.base_paths() if path != "/"]
        for attempt in (1, 2):
            try:
                stored = self.get(version_path)[0]
            except MissingError:
                stored = None
            except StoreError as exc:
                if _refused(exc):
                    raise StoreError(self._foreign(version_path)) from None
                raise
            if stored is not None:
                self._check_version(stored)
            stats = self._call_many("ensure_schema", [lambda p=p: self.client.exists_async(p) for p in bases])
            missing: dict[str, object] = {path: "" for path, stat in zip(bases, stats) if stat is None}
            if stored is None:
                missing[version_path] = SCHEMA_VERSION
            existing = [path for path, stat in zip(bases, stats) if stat is not None]
            self.check_acls(existing + ([version_path] if stored is not None else []))
            if not missing:
                return False
            try:
                self.commit(missing, create=list(missing))
            except ConflictError:
                if attempt == 2:
                    raise
                continue  # another client created them at the same moment: look again
            self.log.info("created the cluster schema (version %s) under %s", SCHEMA_VERSION, self.schema.root or "/")
            return True
        return False

    def check_acls(self, paths) -> list[str]:
        """Check that each existing znode of ``paths`` has the ACL its rule gives it; repair those
        open to anyone (created by an older version, or pre-created by someone else, since
        ZooKeeper's ``/`` lets anyone create). Returns the repaired paths.

        Raises StoreError naming the znode, the ACL found and the one expected when a znode is
        neither right nor open (secured with other identities: check the credentials), or when
        an open one cannot be repaired. In an open (insecure) cluster, nothing is checked.
        """
        if self.acl_ids is None:
            return []
        paths = list(paths)
        if not paths:
            return []
        where = f"{self.options.hosts}"
        try:
            found = self._call_many("check ACLs", [lambda p=p: self.client.get_acls_async(p) for p in paths])
        except StoreError as exc:
            if _refused(exc):  # not even allowed to read an ACL
                refused = [p for p in paths if self.client.exists(p) is not None]
                raise StoreError(self._foreign(refused[0] if refused else paths[0])) from None
            raise
        repaired = []
        for path, (acls, stat) in zip(paths, found):
            expected = self.acl_for(path)
            if _same_acl(acls, expected):
                continue
            older = [self._acl(rule, self.acl_ids) for rule in self.schema.acl_rules_accepted(path)]
            if any(_same_acl(acls, acl) for acl in older):
                # an older version's looser rule: still working, but not what this version creates;
                # the node identity cannot change an ACL, the operator can (docs/security.md, "Upgrading")
                self.log.warning(
                    "%s has the ACL of an older version (%s), not %s: accepted; an operator should set it to %s",
                    path,
                    describe_acl(acls),
                    describe_acl(expected),
                    describe_acl(expected),
                )
                continue
            if any(acl.id.scheme == "world" for acl in acls):
                try:
                    self._call(
                        f"repair the ACL of {path}",
                        lambda p=path, v=stat.aversion, e=expected: self.client.set_acls_async(p, e, v),
                    )
                except StoreError as exc:
                    raise StoreError(
                        f"{path} at {where} is open to anyone (ACL {describe_acl(acls)}) and could not be "
                        f"secured: {exc}; an operator must set its ACL to {describe_acl(expected)}"
                    ) from None
                self.log.warning(
                    "%s was open to anyone (ACL %s): secured it (ACL %s)",
                    path,
                    describe_acl(acls),
                    describe_acl(expected),
                )
                repaired.append(path)
                continue
            raise StoreError(
                f"{path} at {where} has the ACL {describe_acl(acls)}, not {describe_acl(expected)}: the "
                "cluster was secured with other identities; check the usernames and passwords (and the "
                "operator's digest) this client was given"
            )
        return repaired

    def _foreign(self, path: str) -> str:
        user = self.options.auth_username
        return (
            f"ZooKeeper at {self.options.hosts} refuses {'user ' + user if user else 'a client without credentials'} "
            f"access to {path}: the cluster was secured with other identities; check the usernames and passwords "
            "(and the operator's digest) this client was given"
        )

    def _check_version(self, stored: str) -> None:
        """Raise StoreError unless ``stored`` (the text of /schema/version) is this code's version."""
        if stored.strip() == str(SCHEMA_VERSION):
            return
        shown = stored if len(stored) <= 40 else stored[:40] + "..."
        if not re.fullmatch(r"[0-9]{1,9}", stored.strip()):
            raise StoreError(f"{self.schema.schema_version()} holds {shown!r}, not a schema version")
        newer = int(stored) > SCHEMA_VERSION
        raise StoreError(
            f"the cluster at {self.options.hosts}{self.schema.root} has schema version {stored.strip()}, "
            f"this code knows version {SCHEMA_VERSION}"
            + (": upgrade pvc.cluster first" if newer else " and no migration from it")
        )

    def verify_cluster(self) -> None:
        """Check, before anything is read or written, that the cluster root holds a pvc.cluster
        schema this code knows and that this client's credentials match how the cluster is
        secured; raise StoreError saying what is wrong and what to change. For the clients that use
        a cluster but never create it (the modules and the inventory; the daemons create it with
        ``ensure_schema``).

        How a cluster is secured is read from the ACL of its root: a root that lets anyone read and
        write is an open cluster, and credentials for it are refused (every key a client creates
        with them would be readable by that user only, locking the daemons and every other reader
        out). A root that does not is a cluster that uses authentication, and a client without
        credentials is refused. After the check, every key this client creates takes the ACL of the
        cluster root: ACLs are the cluster's, never an accident of the client's options.
        """
        root = self.schema.root or "/"
        where = f"{self.options.hosts}{root}"
        user = self.options.auth_username
        credentials = bool(user) or bool(self.options.tls_cert)
        try:
            acls, _stat = self._call(f"read the ACL of {root}", lambda: self.client.get_acls_async(root))
        except MissingError:
            raise StoreError(
                f"there is no pvc.cluster at {where}: {root} does not exist; check zk_root "
                "(the node daemons create a cluster's keys when they first start)"
            ) from None
        except StoreError as exc:
            if kz is not None and isinstance(exc.__cause__, kz.SessionClosedRequireSaslError):
                # a server with enforce.auth (the zookeeper role's default) closes the session of a
                # client that has not authenticated, before any ACL is looked at
                raise StoreError(
                    f"the ZooKeeper at {self.options.hosts} requires every client to authenticate (enforce.auth) "
                    f"and closed this client's session: give zk_username and zk_password for {root}"
                ) from None
            if kz is not None and isinstance(exc.__cause__, kz.NoAuthError):
                if user:
                    raise StoreError(
                        f"ZooKeeper refuses user {user} access to the cluster at {where} (cannot read the ACL "
                        f"of {root}): check zk_username and zk_password"
                    ) from None
                raise StoreError(
                    f"the cluster at {where} uses authentication: ZooKeeper lets no client without credentials "
                    f"read {root}; give zk_username and zk_password"
                ) from None
            raise
        open_to_anyone = any(
            acl.id.scheme == "world" and acl.id.id == "anyone" and acl.perms & _OPEN_PERMS == _OPEN_PERMS
            for acl in acls
        )
        # an open cluster (the daemons run with insecure: true): node_info says so
        self.cluster_open = open_to_anyone
        if open_to_anyone and user:
            if self.exists(self.schema.schema_version()) is False:  # a root that holds no cluster (ZooKeeper's /)
                raise StoreError(
                    f"there is no pvc.cluster at {where}: {self.schema.schema_version()} does not exist; check "
                    "zk_root (the node daemons create a cluster's keys when they first start)"
                )
            raise StoreError(
                f"the cluster at {where} does not use authentication ({root} lets anyone read and write it), "
                "so zk_username and zk_password are refused: the keys a task created with them would be "
                f"readable by user {user} only, locking the node daemons and every other reader out; leave "
                "them out, or secure the cluster first"
            )
        if not open_to_anyone and not credentials:
            granted = ", ".join(sorted({f"{acl.id.scheme}:{acl.id.id.split(':', 1)[0]}" for acl in acls})) or "nobody"
            raise StoreError(
                f"the cluster at {where} uses authentication (the ACL of {root} grants {granted}), "
                "but no zk_username and zk_password were given; give them"
            )
        try:
            stored = self.get(self.schema.schema_version())[0]
        except MissingError:
            raise StoreError(
                f"there is no pvc.cluster at {where}: {self.schema.schema_version()} does not exist; check "
                "zk_root (the node daemons create a cluster's keys when they first start)"
            ) from None
        self._check_version(stored)
        if not open_to_anyone and user:
            self._learn_identities(acls, where)

    def _learn_identities(self, root_acls, where: str) -> None:
        """Take the operator's and the nodes' identities from the ACL of the cluster root (the
        operator may do anything there, the nodes may only read), so that every znode this
        client creates gets its rule's ACL. This client must be the operator."""
        own = digest_id(self.options.auth_username or "", self.options.auth_password or "")
        digests = [acl for acl in root_acls if acl.id.scheme == "digest"]
        if not any(acl.id.id == own and acl.perms & PERM_ALL == PERM_ALL for acl in digests):
            raise StoreError(
                f"user {self.options.auth_username} is not the operator of the cluster at {where} "
                f"(the ACL of {self.schema.root or '/'} is {describe_acl(root_acls)}): check zk_username "
                "and zk_password"
            )
        # the operator's other digest ids (its former password, while it is rotated) are no node's
        user = self.options.auth_username or ""
        nodes = tuple(sorted(acl.id.id for acl in digests if acl.id.id.split(":", 1)[0] != user))
        self.acl_ids = AclIds(operator=own, nodes=nodes)
        self.client.default_acl = self.acl_for(self.schema.node_lock("contender") + "/contender")

    # ---- rotating a password (docs/security.md) ------------------------------------------------

    def add_auth(self, username: str, password: str) -> None:
        """Authenticate this session as one more digest identity, beside the one it connected as:
        an operator rotating its password holds the former identity and the new one at once."""
        self._call(
            f"authenticate as {username}", lambda: self.client.add_auth_async("digest", f"{username}:{password}")
        )

    def digest_perms(self, path: str) -> dict[str, int]:
        """The digest ids the ACL of ``path`` names, each with its permissions. A session without
        the ADMIN permission there sees each id as "username:x" (ZooKeeper hides the hashes)."""
        acls, _stat = self._call(f"read the ACL of {path}", lambda: self.client.get_acls_async(path))
        perms: dict[str, int] = {}
        for acl in acls:
            if acl.id.scheme == "digest":
                perms[acl.id.id] = perms.get(acl.id.id, 0) | acl.perms
        return perms

    def replace_acl_id(self, old: str, new: str, keep_old: bool = False, dry_run: bool = False) -> list[str]:
        """On every znode of the cluster (its root and everything below it), give digest id ``new``
        the permissions digest id ``old`` has there and, unless ``keep_old``, take them from ``old``.
        Returns the paths changed. A new password is a new digest id (ZooKeeper keeps the SHA-1 of
        each identity in every ACL), so this is how a password is rotated: ``keep_old`` first (both
        work while the clients move to the new one), then without it. The session needs the ADMIN
        permission on every znode that names ``old``: the operator's (both identities, add_auth).
        A znode whose ACL is already what it would be set to is not changed (a second run returns
        []), and ``dry_run`` returns the paths that would change without changing them. A znode
        removed meanwhile is passed over."""
        for digest in (old, new):
            if not _DIGEST_ID.fullmatch(digest):
                raise StoreError(f"{digest!r} is not a digest id, username:base64(sha1(username:password))")

        def perms_of(acls, digest: str) -> int:
            perms = 0
            for acl in acls:
                if acl.id.scheme == "digest" and acl.id.id == digest:
                    perms |= acl.perms
            return perms

        changed = []
        level = [self.schema.root or "/"]
        while level:
            found = []
            for path in level:
                try:
                    acls, stat = self._call(f"read the ACL of {path}", lambda p=path: self.client.get_acls_async(p))
                    names = self._call(f"list {path}", lambda p=path: self.client.get_children_async(p))
                except MissingError:
                    continue
                found.append((path, names))
                perms = perms_of(acls, old)
                if not perms:
                    continue
                drop = (new,) if keep_old else (old, new)
                wanted = [acl for acl in acls if not (acl.id.scheme == "digest" and acl.id.id in drop)]
                wanted.append(ACL(perms | perms_of(acls, new), Id("digest", new)))
                if _acl_set(wanted) == _acl_set(acls):
                    continue
                if dry_run:
                    changed.append(path)
                    continue
                try:
                    self._call(
                        f"set the ACL of {path}",
                        lambda p=path, a=wanted, v=stat.aversion: self.client.set_acls_async(p, a, v),
                    )
                except MissingError:
                    continue
                changed.append(path)
            level = [f"{path.rstrip('/')}/{child}" for path, names in found for child in names]
        return changed

    # ---- locks ------------------------------------------------------------------------------

    @contextmanager
    def lock(self, path: str, timeout_s: float | None = None, identifier: str | None = None) -> Iterator[StoreLock]:
        """Hold the lock at ``path`` for the with-block; yields the held StoreLock.

        Each of LOCK_ATTEMPTS acquisition attempts waits up to ``timeout_s`` (default: the connection
        timeout); then LockError. The lock is released on leaving the block, whatever happens.
        """
        wait_s = self.options.timeout_s if timeout_s is None else timeout_s
        lock = Lock(self.client, path, identifier or self.lock_identifier)  # no ZooKeeper I/O here
        self._acquire(lock, wait_s)
        try:
            yield StoreLock(self, lock)
        finally:
            self._release(lock)

    @contextmanager
    def try_lock(self, path: str, identifier: str | None = None) -> Iterator[StoreLock | None]:
        """Take the lock at ``path`` for the with-block if it is free now; yields the held StoreLock,
        or None (without waiting) when another contender holds it or ZooKeeper cannot be asked now
        (logged at DEBUG: "not now" is this call's normal answer). Released on leaving the block,
        whatever happens, the same way as ``lock``'s."""
        lock = Lock(self.client, path, identifier or self.lock_identifier)  # no ZooKeeper I/O here
        acquired = False
        try:
            acquired = self._try_acquire(lock)
        except StoreError as exc:
            self.log.debug("lock %s: not taken: %s", path, exc)
        try:
            yield StoreLock(self, lock) if acquired else None
        finally:
            if acquired:
                self._release(lock)

    def _try_acquire(self, lock) -> bool:
        """One try at ``lock`` (a kazoo Lock, for its names and its bookkeeping): create our
        contender node; hold the lock when no contender is before it, else delete ours again.
        Not through the recipe's ``acquire``: kazoo queues a request made while the connection
        is being re-established until it is back, so a connection lost after the look would
        hold the caller for the whole outage. Here nothing waits for a lost connection that is
        not live now, and every answer at most ``timeout_s``. Raises StoreError."""
        what = f"lock {lock.path}"
        if not self._live.is_set():
            raise UnreachableError(f"{what}: not connected to ZooKeeper at {self.options.hosts}")

        def create() -> str:
            created: str = self._call(
                what, lambda: self.client.create_async(lock.create_path, lock.data, ephemeral=True, sequence=True)
            )
            return created

        try:
            try:
                created = create()
            except MissingError:  # the lock's first contender: its znode is made first
                self._create_parents([lock.path])
                created = create()
        except UnreachableError:
            # the create may still be made (kazoo sends it when the connection is back): our
            # contender node is deleted then, before it can hold the lock for nobody
            self._add_orphan(lock.path, lock.prefix)
            raise
        lock.node = created[len(lock.path) + 1 :]
        try:
            children = self._call(f"list {lock.path}", lambda: self.client.get_children_async(lock.path))
        except StoreError:
            self._add_orphan(lock.path, lock.prefix)
            raise
        ours = lock.node[len(lock.prefix) :]
        before = [
            child
            for child in children
            if (found := lock._contenders_re.search(child)) is not None and found.group(1) < ours
        ]
        if not before:
            lock.is_acquired = True
            return True
        try:
            self._delete_contender(lock.path, lock.prefix)
        except StoreError:
            self._add_orphan(lock.path, lock.prefix)
        return False

    def _acquire(self, lock, wait_s: float) -> None:
        reason = ""
        attempts = Attempts(LOCK_ATTEMPTS)
        while True:
            attempt = attempts.failed + 1
            try:
                self._require_connection(f"lock {lock.path}")
                if lock.acquire(timeout=wait_s):
                    return
                reason = f"not acquired within {wait_s:g} s"
            except kz.LockTimeout:
                reason = f"held by another contender for {wait_s:g} s"
            except (StoreError, kz.KazooException) as exc:
                reason = _describe(exc)
            if not attempts.again():
                self.log.warning("lock %s: attempt %d of %d failed (%s)", lock.path, attempt, LOCK_ATTEMPTS, reason)
                break
            pause = LOCK_BACKOFF_S * 2 ** (attempt - 1)
            self.log.warning(
                "lock %s: attempt %d of %d failed (%s); retrying in %.1f s",
                lock.path,
                attempt,
                LOCK_ATTEMPTS,
                reason,
                pause,
            )
            # The backoff itself: give the holder (or a reconnecting session) time; nothing to wait on.
            time.sleep(pause)
        # kazoo removes our contender node on a failed attempt; make sure, in case that failed too
        try:
            self._delete_contender(lock.path, lock.prefix)
        except StoreError:
            self._add_orphan(lock.path, lock.prefix)
        raise LockError(lock.path, LOCK_ATTEMPTS, reason)

    def _release(self, lock) -> None:
        if not lock.is_acquired:
            return
        lock.is_acquired = False
        node = f"{lock.path}/{lock.node}"
        try:
            # not lock.release(): it retries forever and blocks while the connection is down
            self._call(f"release lock {lock.path}", lambda: self.client.delete_async(node))
        except MissingError:
            self.log.warning(
                "lock %s: our lock node was already gone (the session expired while it was held)", lock.path
            )
        except StoreError as exc:
            self.log.error(
                "lock %s: release failed (%s); its node is deleted when the connection returns, "
                "or vanishes with the session",
                lock.path,
                exc,
            )
            self._add_orphan(lock.path, lock.prefix)

    def _add_orphan(self, lock_path: str, prefix: str) -> None:
        with self._orphans_mutex:
            self._orphans.add((lock_path, prefix))
        if self.connected:  # the connection came back before we noted it
            self.client.handler.spawn(self._delete_orphans)

    def _delete_orphans(self) -> None:
        with self._orphans_mutex:
            pending = sorted(self._orphans)
        for lock_path, prefix in pending:
            try:
                self._delete_contender(lock_path, prefix)
            except StoreError as exc:
                self.log.warning("lock %s: leftover lock node not deleted yet: %s", lock_path, exc)
                continue
            with self._orphans_mutex:
                self._orphans.discard((lock_path, prefix))

    def _delete_contender(self, lock_path: str, prefix: str) -> None:
        """Delete our (``prefix``) contender nodes of a lock. Raises StoreError."""
        try:
            children = self._call(f"list {lock_path}", lambda: self.client.get_children_async(lock_path))
        except MissingError:
            return
        for child in children:
            if child.startswith(prefix):
                try:
                    self._call(
                        f"delete {lock_path}/{child}", lambda c=child: self.client.delete_async(f"{lock_path}/{c}")
                    )
                    self.log.info("lock %s: deleted our leftover lock node %s", lock_path, child)
                except MissingError:
                    continue  # already gone (the session that held it expired)
