# -*- coding: utf-8 -*-
# Copyright: pvc.cluster developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
#
# PRIVATE: this module is internal to the pvc.cluster collection and its node daemon.
# It may change without notice; do not import it from other collections.
"""VM meta values (``/domains/<uuid>/meta/<key>``): vocabulary, defaults, parsing and validation.

Two readers, two levels of strictness:

* The node daemon re-reads a VM's meta at every transition (never caches it) with
  :meth:`VMMeta.from_store`. That parser never raises: a missing key takes its default, and a
  stored value it cannot understand also takes the default and is described in
  :attr:`VMMeta.warnings` so that the daemon can log it instead of crashing.
* The Ansible modules validate user input with :func:`validate_meta_updates`, which raises
  :class:`MetaError` naming the option, the bad value and the accepted values.

Keys and stored forms (every value is text in the store):

====================================  ======================================  =============
key                                   values                                  default
====================================  ======================================  =============
``migration_method``                  ``default`` | ``live`` | ``shutdown``   ``default``
``node_selector``                     ``mem`` | ``memfree`` | ``load`` |      ``default``
                                      ``vcpus`` | ``vms`` | ``default``
``node_limit``                        JSON list of node names, ``[]`` = any   ``[]``
``node_autostart``                    ``true`` | ``false``                    ``false``
``migration_max_downtime_ms``         integer from 1 to 2,000,000 (ms)        ``300``
``migration_auto_converge``           ``true`` | ``false``                    ``false``
====================================  ======================================  =============

Legacy values (upstream PVC) are accepted everywhere and normalised:

* ``migration_method``: missing, ``""``, ``none`` and ``None`` mean ``default`` (live with a
  shutdown fallback). Upstream documented "default" but stored "none".
* ``node_selector``: missing, ``""``, ``none`` and ``None`` mean ``default`` (the cluster default,
  itself ``mem``); upstream's ``memprov`` is our ``mem`` (headroom against provisioned memory).
* ``node_limit``: upstream stored a comma-separated string; it is read as a list.
* ``node_autostart``: upstream stored ``True``/``False``; any common boolean spelling is read.

Standard library only, no I/O.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from ._schema import (
    META_KEYS,
    META_MIGRATION_AUTO_CONVERGE,
    META_MIGRATION_MAX_DOWNTIME_MS,
    META_MIGRATION_METHOD,
    META_NODE_AUTOSTART,
    META_NODE_LIMIT,
    META_NODE_SELECTOR,
)

# ---- vocabulary -----------------------------------------------------------------------------

MIGRATION_METHODS = ("default", "live", "shutdown")
# Concrete selectors, in documentation order; "default" defers to the cluster default.
CONCRETE_SELECTORS = ("mem", "memfree", "load", "vcpus", "vms", "fit")
NODE_SELECTORS = CONCRETE_SELECTORS + ("default",)
CLUSTER_DEFAULT_SELECTOR = "mem"

DEFAULT_MIGRATION_METHOD = "default"
DEFAULT_NODE_SELECTOR = "default"
DEFAULT_NODE_LIMIT: tuple[str, ...] = ()
DEFAULT_NODE_AUTOSTART = False
DEFAULT_MIGRATION_MAX_DOWNTIME_MS = 300
# Off unless asked for: throttling a guest's vCPUs is a change in its behaviour that its owner
# chooses (docs/migration-protocol.md, "Busy guests"); without it a guest that never converges is
# aborted by the completion timeout and keeps running where it is.
DEFAULT_MIGRATION_AUTO_CONVERGE = False
# Bounds of migration_max_downtime_ms. QEMU refuses a downtime-limit above 2000 seconds
# (MAX_MIGRATE_DOWNTIME in its migration code), and libvirt's migrateSetMaxDowntime takes an
# unsigned 64-bit figure: a larger value fails only at migration time, inside the daemon. The
# modules refuse it, and the daemon reads a stored value out of these bounds as invalid.
MIN_MIGRATION_MAX_DOWNTIME_MS = 1
MAX_MIGRATION_MAX_DOWNTIME_MS = 2_000_000

# Spellings (compared after strip() and lower()) that mean "the default".
_DEFAULT_ALIASES = ("", "none", "default", "null")
_SELECTOR_ALIASES = {"memprov": "mem"}
_DECIMAL_RE = re.compile(r"[+-]?[0-9]+")
_TRUE = ("true", "yes", "on", "1", "y", "t")
_FALSE = ("false", "no", "off", "0", "n", "f", "", "none", "null")


class MetaError(ValueError):
    """A meta value given by a user is not valid; the message names option, value and choices."""

    def __init__(self, option: str, value: object, accepted: str) -> None:
        self.option = option
        self.value = value
        self.accepted = accepted
        super().__init__(f"invalid value {value!r} for {option}: accepted values are {accepted}")


# ---- single-value parsers (raise MetaError; the tolerant reader catches it) --------------------


def _text(value: object) -> str:
    return value.strip().lower() if isinstance(value, str) else str(value).strip().lower()


def parse_migration_method(value: object) -> str:
    """Normalise a migration method; ``None``/""/"none"/"default" give ``default``."""
    if value is None:
        return DEFAULT_MIGRATION_METHOD
    if not isinstance(value, str):
        raise MetaError(META_MIGRATION_METHOD, value, ", ".join(MIGRATION_METHODS))
    text = _text(value)
    if text in _DEFAULT_ALIASES:
        return DEFAULT_MIGRATION_METHOD
    if text in MIGRATION_METHODS:
        return text
    raise MetaError(META_MIGRATION_METHOD, value, ", ".join(MIGRATION_METHODS))


def parse_node_selector(value: object) -> str:
    """Normalise a node selector; ``None``/""/"none" give ``default``, ``memprov`` gives ``mem``."""
    if value is None:
        return DEFAULT_NODE_SELECTOR
    if not isinstance(value, str):
        raise MetaError(META_NODE_SELECTOR, value, ", ".join(NODE_SELECTORS))
    text = _text(value)
    if text in _DEFAULT_ALIASES:
        return DEFAULT_NODE_SELECTOR
    text = _SELECTOR_ALIASES.get(text, text)
    if text in NODE_SELECTORS:
        return text
    raise MetaError(META_NODE_SELECTOR, value, ", ".join(NODE_SELECTORS))


_LIMIT_ACCEPTED = "a list of node names or a comma-separated string of them (empty = any node)"


def _limit_name(raw_value: object, item: object) -> str:
    if not isinstance(item, str):
        raise MetaError(META_NODE_LIMIT, raw_value, _LIMIT_ACCEPTED)
    name = item.strip()
    if "/" in name or "," in name or any(ch.isspace() for ch in name):
        raise MetaError(META_NODE_LIMIT, raw_value, _LIMIT_ACCEPTED + "; a name has no '/', ',' or spaces")
    return name


def parse_node_limit(value: object) -> tuple[str, ...]:
    """Normalise a node limit to a tuple of unique names in the given order; empty = any node.

    Accepts a list/tuple of names, a JSON list in a string, or a comma-separated string.
    """
    if value is None:
        return DEFAULT_NODE_LIMIT
    items: list[object]
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                decoded = json.loads(text)
            except ValueError:
                raise MetaError(META_NODE_LIMIT, value, _LIMIT_ACCEPTED) from None
            if not isinstance(decoded, list):
                raise MetaError(META_NODE_LIMIT, value, _LIMIT_ACCEPTED)
            items = decoded
        elif _text(text) in ("none", "null"):
            items = []
        else:
            items = list(text.split(","))
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise MetaError(META_NODE_LIMIT, value, _LIMIT_ACCEPTED)
    names: list[str] = []
    for item in items:
        name = _limit_name(value, item)
        if name and name not in names:
            names.append(name)
    return tuple(names)


def _parse_bool(key: str, value: object, default: bool) -> bool:
    """Normalise a boolean: bools, 0/1, and true/false, yes/no, on/off, 1/0 in any case."""
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        text = _text(value)
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
    raise MetaError(key, value, "true or false (also yes/no, on/off, 1/0)")


def parse_node_autostart(value: object) -> bool:
    """Normalise node_autostart (a boolean, see _parse_bool)."""
    return _parse_bool(META_NODE_AUTOSTART, value, DEFAULT_NODE_AUTOSTART)


def parse_auto_converge(value: object) -> bool:
    """Normalise migration_auto_converge (a boolean, see _parse_bool): whether a live migration
    may throttle the guest's vCPUs until it converges (libvirt's VIR_MIGRATE_AUTO_CONVERGE)."""
    return _parse_bool(META_MIGRATION_AUTO_CONVERGE, value, DEFAULT_MIGRATION_AUTO_CONVERGE)


def parse_max_downtime_ms(value: object) -> int:
    """Normalise the maximum live-migration downtime: an integer number of milliseconds from
    MIN_MIGRATION_MAX_DOWNTIME_MS to MAX_MIGRATION_MAX_DOWNTIME_MS (what QEMU accepts)."""
    accepted = (
        f"an integer number of milliseconds from {MIN_MIGRATION_MAX_DOWNTIME_MS} to "
        f"{MAX_MIGRATION_MAX_DOWNTIME_MS} (QEMU's limit, 2000 s)"
    )
    if value is None:
        return DEFAULT_MIGRATION_MAX_DOWNTIME_MS
    if isinstance(value, bool):
        raise MetaError(META_MIGRATION_MAX_DOWNTIME_MS, value, accepted)
    if isinstance(value, int):
        number = value
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    elif isinstance(value, str):
        text = value.strip()
        if text == "":
            return DEFAULT_MIGRATION_MAX_DOWNTIME_MS
        # bounded before int(): a stored value of a million digits must not cost a big-number parse
        if len(text) > len(str(MAX_MIGRATION_MAX_DOWNTIME_MS)) + 1 or not _DECIMAL_RE.fullmatch(text):
            raise MetaError(META_MIGRATION_MAX_DOWNTIME_MS, _shown(value), accepted)
        number = int(text, 10)
    else:
        raise MetaError(META_MIGRATION_MAX_DOWNTIME_MS, value, accepted)
    if not MIN_MIGRATION_MAX_DOWNTIME_MS <= number <= MAX_MIGRATION_MAX_DOWNTIME_MS:
        raise MetaError(META_MIGRATION_MAX_DOWNTIME_MS, _shown(value), accepted)
    return number


def _shown(value: object) -> object:
    """A value as an error message shows it: long text cut (a stored value may be huge)."""
    if isinstance(value, str) and len(value) > 40:
        return value[:40] + f"... ({len(value)} characters)"
    return value


_PARSERS = {
    META_MIGRATION_METHOD: parse_migration_method,
    META_NODE_SELECTOR: parse_node_selector,
    META_NODE_LIMIT: parse_node_limit,
    META_NODE_AUTOSTART: parse_node_autostart,
    META_MIGRATION_MAX_DOWNTIME_MS: parse_max_downtime_ms,
    META_MIGRATION_AUTO_CONVERGE: parse_auto_converge,
}


# ---- stored form ----------------------------------------------------------------------------


def format_value(key: str, value: object) -> str:
    """The stored text of an already normalised value of meta key ``key``."""
    if key == META_NODE_LIMIT:
        return json.dumps(list(value))  # type: ignore[call-overload]
    if key in (META_NODE_AUTOSTART, META_MIGRATION_AUTO_CONVERGE):
        return "true" if value else "false"
    return str(value)


@dataclass(frozen=True)
class VMMeta:
    """The normalised meta of one VM.

    ``warnings`` describes stored values that could not be understood and were replaced by their
    default (see :meth:`from_store`); it takes no part in equality.
    """

    migration_method: str = DEFAULT_MIGRATION_METHOD
    node_selector: str = DEFAULT_NODE_SELECTOR
    node_limit: tuple[str, ...] = DEFAULT_NODE_LIMIT
    node_autostart: bool = DEFAULT_NODE_AUTOSTART
    migration_max_downtime_ms: int = DEFAULT_MIGRATION_MAX_DOWNTIME_MS
    migration_auto_converge: bool = DEFAULT_MIGRATION_AUTO_CONVERGE
    warnings: tuple[str, ...] = field(default=(), compare=False)

    @classmethod
    def from_store(cls, raw: Mapping[str, str | None] | None) -> VMMeta:
        """Parse the stored meta of a VM; never raises.

        ``raw`` maps META_* keys to their stored text (``None`` or absent = not set). Unknown keys
        are ignored. A value that cannot be parsed takes its default and adds a warning naming the
        key, the stored value and the default used.
        """
        raw = raw or {}
        values: dict[str, object] = {}
        warnings: list[str] = []
        defaults = cls()
        for key in META_KEYS:
            parser = _PARSERS[key]
            stored = raw.get(key)
            try:
                values[key] = parser(stored)
            except MetaError as exc:
                default = getattr(defaults, key)
                warnings.append(
                    f"meta {key}: stored value {stored!r} is not valid ({exc.accepted}); using the default {format_value(key, default)!r}"
                )
                values[key] = default
        return cls(warnings=tuple(warnings), **values)  # type: ignore[arg-type]

    def to_store(self) -> dict[str, str]:
        """Every META_* key with its stored text."""
        return {key: format_value(key, getattr(self, key)) for key in META_KEYS}

    @property
    def is_live_only(self) -> bool:
        """``live``: live migration only, abort instead of falling back to a shutdown migration."""
        return self.migration_method == "live"

    @property
    def is_shutdown_only(self) -> bool:
        """``shutdown``: always shut down, move and start; never try a live migration."""
        return self.migration_method == "shutdown"

    def effective_selector(self, cluster_default: str | None) -> str:
        """This VM's concrete selector, given the cluster default."""
        return effective_selector(self.node_selector, cluster_default)


def effective_selector(meta_selector: str | None, cluster_default: str | None) -> str:
    """The concrete selector for a VM.

    ``meta_selector`` is the VM's node_selector; when it is ``default`` (or missing, legacy
    ``none``, or unparseable) the cluster default applies. When the cluster default is itself
    missing, ``default`` or unparseable, the built-in default ``mem`` applies. Never raises.
    """
    for candidate in (meta_selector, cluster_default):
        try:
            selector = parse_node_selector(candidate)
        except MetaError:
            continue
        if selector != DEFAULT_NODE_SELECTOR:
            return selector
    return CLUSTER_DEFAULT_SELECTOR


def validate_meta_updates(updates: Mapping[str, object]) -> dict[str, str]:
    """Validate meta changes given by a user; return ``{META key: stored text}`` for each change.

    A key whose value is ``None`` means "leave unchanged" and is left out of the result (so that a
    module option left unset never resets a value; to reset, pass ``default``, ``[]`` or the
    default value explicitly). Legacy spellings are accepted and normalised as documented in the
    module docstring. Raises :class:`MetaError` for an unknown key or an invalid value.
    """
    result: dict[str, str] = {}
    for key, value in updates.items():
        parser = _PARSERS.get(key)
        if parser is None:
            raise MetaError("meta key", key, ", ".join(META_KEYS))
        if value is None:
            continue
        if (
            key == META_NODE_LIMIT
            and isinstance(value, (list, tuple))
            and any(isinstance(item, str) and not item.strip() for item in value)
        ):
            # the stored form reads an empty name as nothing, so [""] would silently clear the limit
            raise MetaError(META_NODE_LIMIT, value, "a list of node names, none of them empty ([] for any node)")
        result[key] = format_value(key, parser(value))
    return result
