# -*- coding: utf-8 -*-
# Copyright: pvc.cluster developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
#
# PRIVATE: this module is internal to the pvc.cluster collection and its node daemon.
# It may change without notice; do not import it from other collections.
"""Typed, bounded decoders for values read from ZooKeeper, which are untrusted input.

Anyone who can write to ZooKeeper can put anything into any key: text that is no number, a number
too large for a float, JSON nested 50,000 levels deep, a name with a ``/`` or a newline in it. A
value decoded here is either what the schema says it is, inside bounds that keep every later
computation finite, or an :class:`Invalid` that names the key and what was expected. Nothing here
raises anything else, whatever the input.

Every decoder takes the stored value (text, bytes, or None when the key does not exist) and the
path it was read from (for the message), and returns the typed value or raises :class:`Invalid`.
``default``: what a missing key (None) reads as; without it, a missing key is invalid too.
:func:`or_default` reads a missing or invalid value as a fallback and records the Invalid, for
readers that must go on.

Standard library only, no I/O.
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
from collections.abc import Callable, Collection
from typing import Any, NoReturn, TypeVar

__all__ = [
    "Invalid",
    "MAX_DEPTH",
    "MAX_INT",
    "MAX_MIB",
    "MAX_NAME_LENGTH",
    "MAX_TEXT_BYTES",
    "MAX_JSON_BYTES",
    "MAX_XML_BYTES",
    "NODE_NAME_RULE",
    "address",
    "boolean",
    "choice",
    "integer",
    "json_list",
    "json_object",
    "json_value",
    "node_name",
    "number",
    "or_default",
    "text",
    "uuid",
    "vm_name",
]

# ---- bounds (each one documented where it is used) ------------------------------------------

# Largest integer any stored count or size may hold: 2^53, the largest a float (and JSON in other
# languages) represents exactly, so sums of a few thousand of them stay exact and finite.
MAX_INT = 2**53
# Largest memory size in MiB: libvirt's own limit, sizes below 8 EiB (2^63 bytes).
MAX_MIB = 2**43
# Text keys (states, names, URIs, reasons): 4 KiB is far more than any of them needs.
MAX_TEXT_BYTES = 4096
# JSON keys (migration and audit records, statistics, lists of UUIDs): 256 KiB.
MAX_JSON_BYTES = 256 * 1024
# Domain XML: ZooKeeper's own default limit on a znode (jute.maxbuffer, 1 MiB).
MAX_XML_BYTES = 1024 * 1024
# JSON nesting, checked before the text reaches the parser (whose recursion a deep document
# would exhaust): the deepest value the schema defines is an audit record's steps (depth 2).
MAX_DEPTH = 8
# Names (nodes, VMs): libvirt allows long domain names, but nothing in a cluster needs more.
MAX_NAME_LENGTH = 255
# A number's text: enough for any float repr and 2^53 with room to spare; more is not a number
# we store (and int() of thousands of digits is slow).
_MAX_NUMBER_CHARS = 40
_EXCERPT = 60

_NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
NODE_NAME_RULE = "a node name: 1 to 63 letters, digits, '.', '_' or '-', starting with a letter or digit"
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# The characters that decide JSON nesting: brackets, and the quotes and escapes of strings
# (brackets inside strings do not nest).
_JSON_SPECIAL = re.compile(r'[\\"\[\]{}]')
# Number text as JSON writes it (no '_', 'nan' or 'inf', which Python's own parsers accept).
_INTEGER = re.compile(r"[+-]?[0-9]+")
_FLOAT = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")

_MISSING: Any = object()  # Any: it stands for a missing default of whatever type

T = TypeVar("T")
U = TypeVar("U")


class Invalid(ValueError):
    """A stored value that is not what the schema defines.

    ``path``: the key it was read from (a znode path, or any name the caller gives); ``field``:
    where inside the value (e.g. ``target`` of a migration record), or ""; ``expected``: what
    is accepted; ``value``: a short excerpt of what was found.
    """

    def __init__(self, path: str, expected: str, value: object = _MISSING, field: str = "") -> None:
        self.path = path
        self.field = field
        self.expected = expected
        self.value = "missing" if value is _MISSING else excerpt(value)
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f"{self.path} ({self.field})" if self.field else self.path
        return f"{where}: {self.value} is not valid; expected {self.expected}"

    def __reduce__(self) -> tuple[Callable[[str, str, str, str], Invalid], tuple[str, str, str, str]]:
        return _rebuild_invalid, (self.path, self.expected, self.value, self.field)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Invalid) and (self.path, self.field, self.expected, self.value) == (
            other.path,
            other.field,
            other.expected,
            other.value,
        )

    def __hash__(self) -> int:
        return hash((self.path, self.field, self.expected, self.value))

    def in_field(self, field: str) -> Invalid:
        """The same problem, found in ``field`` of a larger value (fields nest with '.')."""
        inner = Invalid(self.path, self.expected, field=f"{field}.{self.field}" if self.field else field)
        inner.value = self.value
        inner.args = (str(inner),)
        return inner


def _rebuild_invalid(path: str, expected: str, value: str, field: str) -> Invalid:
    invalid = Invalid(path, expected, field=field)
    invalid.value = value
    invalid.args = (str(invalid),)
    return invalid


def excerpt(value: object) -> str:
    """A short, printable description of a stored value for messages and logs."""
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value[: _EXCERPT * 4]).decode("utf-8", errors="replace")
    shown = repr(value)
    if len(shown) > _EXCERPT:
        size = f"{len(value)} characters" if isinstance(value, str) else type(value).__name__
        shown = f"{shown[:_EXCERPT]}... ({size})"
    return shown


def or_default(
    decoder: Callable[..., T], value: object, path: str, fallback: U, problems: list[Invalid], **bounds: Any
) -> T | U:
    """``decoder(value, path, **bounds)``; ``fallback`` when the key is missing (``value`` None)
    or its value is invalid, and then the Invalid is appended to ``problems``. For readers that
    must go on with a safe value (and report what they could not read)."""
    if value is None:
        return fallback
    try:
        return decoder(value, path, **bounds)
    except Invalid as exc:
        problems.append(exc)
        return fallback


# ---- text -----------------------------------------------------------------------------------


def text(
    value: object, path: str, *, default: str = _MISSING, max_bytes: int = MAX_TEXT_BYTES, allow_empty: bool = True
) -> str:
    """A stored text value of at most ``max_bytes`` bytes of UTF-8 (bytes are decoded strictly)."""
    if value is None:
        if default is _MISSING:
            raise Invalid(path, "a value (the key does not exist)")
        return default
    if isinstance(value, (bytes, bytearray)):
        if len(value) > max_bytes:
            raise Invalid(path, f"text of at most {max_bytes} bytes (got {len(value)})", value)
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise Invalid(path, "UTF-8 text", value) from None
    elif not isinstance(value, str):
        raise Invalid(path, "text", value)
    elif len(value) > max_bytes or len(value.encode("utf-8", errors="surrogatepass")) > max_bytes:
        raise Invalid(
            path, f"text of at most {max_bytes} bytes (got {len(value.encode('utf-8', errors='surrogatepass'))})", value
        )
    if not allow_empty and not value.strip():
        raise Invalid(path, "non-empty text", value)
    return value


def choice(value: object, path: str, choices: Collection[str], *, default: str = _MISSING) -> str:
    """One of ``choices`` exactly (stored vocabularies are written by us, in one spelling)."""
    if value is None and default is not _MISSING:
        return default
    found = text(value, path, max_bytes=256)
    if found not in choices:
        raise Invalid(path, "one of " + ", ".join(choices), value)
    return found


def boolean(value: object, path: str, *, default: bool = _MISSING) -> bool:
    """``true`` or ``false``, as the store writes a bool."""
    if value is None and default is not _MISSING:
        return default
    return choice(value, path, ("true", "false")) == "true"


# ---- numbers --------------------------------------------------------------------------------


def _number_text(value: object, path: str, what: str) -> str:
    if isinstance(value, bool):
        raise Invalid(path, what, value)
    if isinstance(value, (int, float)):
        return repr(value)
    found = text(value, path, max_bytes=_MAX_NUMBER_CHARS * 4).strip()
    if not found or len(found) > _MAX_NUMBER_CHARS:
        raise Invalid(path, what, value)
    return found


def integer(value: object, path: str, *, default: int = _MISSING, minimum: int = 0, maximum: int = MAX_INT) -> int:
    """An integer from ``minimum`` to ``maximum``. The text of a whole float (``1024.0``) is
    read as that integer; a fraction, ``nan``, ``inf`` or ``1e999`` are invalid."""
    what = f"an integer from {minimum} to {maximum}"
    if value is None:
        if default is _MISSING:
            raise Invalid(path, what)
        return default
    found = _number_text(value, path, what)
    if _INTEGER.fullmatch(found):
        number = int(found, 10)
    elif _FLOAT.fullmatch(found):
        as_float = float(found)
        if not math.isfinite(as_float) or not as_float.is_integer():
            raise Invalid(path, what, value)
        number = int(as_float)
    else:
        raise Invalid(path, what, value)
    if not minimum <= number <= maximum:
        raise Invalid(path, what, value)
    return number


def number(
    value: object, path: str, *, default: float = _MISSING, minimum: float = 0.0, maximum: float = float(MAX_INT)
) -> float:
    """A finite number from ``minimum`` to ``maximum``."""
    what = f"a number from {minimum:g} to {maximum:g}"
    if value is None:
        if default is _MISSING:
            raise Invalid(path, what)
        return default
    found = _number_text(value, path, what)
    if not _FLOAT.fullmatch(found):
        raise Invalid(path, what, value)
    result = float(found)
    if not math.isfinite(result) or not minimum <= result <= maximum:
        raise Invalid(path, what, value)
    return result


# ---- JSON -----------------------------------------------------------------------------------


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(found: str) -> float:
    result = float(found)
    if not math.isfinite(result):
        raise ValueError(f"{found} is too large for a number")
    return result


def _depth(document: str, max_depth: int) -> int:
    """The nesting depth of a JSON document, counting only up to ``max_depth + 1``: one linear
    pass over its special characters, no recursion and no backtracking, brackets inside strings
    skipped. (A malformed document gets some depth; the parser then refuses it.)"""
    depth = deepest = 0
    in_string = False
    escaped = -1  # the position of a character escaped by a backslash inside a string
    for match in _JSON_SPECIAL.finditer(document):
        position, char = match.start(), match.group()
        if position == escaped:
            continue
        if in_string:
            if char == "\\":
                escaped = position + 1
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > max_depth:
                    break
        elif char in "]}":
            depth -= 1
    return deepest


def json_value(
    value: object, path: str, *, default: Any = _MISSING, max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_DEPTH
) -> Any:
    """A JSON document of at most ``max_bytes`` bytes nested at most ``max_depth`` deep, parsed.
    Numbers are finite (``NaN``, ``Infinity`` and ``1e999`` are invalid)."""
    what = f"JSON of at most {max_bytes} bytes, nested at most {max_depth} deep"
    if value is None:
        if default is _MISSING:
            raise Invalid(path, what)
        return default
    document = text(value, path, max_bytes=max_bytes)
    # Fewer brackets than the cap cannot nest deeper than it (str.count is cheap; most stored
    # values are small objects read often, e.g. a migration record at every step).
    if document.count("[") + document.count("{") > max_depth and _depth(document, max_depth) > max_depth:
        raise Invalid(path, what + " (it is nested deeper)", value)
    try:
        return json.loads(document, parse_constant=_reject_constant, parse_float=_finite_float)
    except (ValueError, RecursionError) as exc:  # RecursionError: defence in depth only
        raise Invalid(path, f"{what} ({exc})", value) from None


def json_object(
    value: object,
    path: str,
    *,
    default: dict[str, Any] = _MISSING,
    max_bytes: int = MAX_JSON_BYTES,
    max_depth: int = MAX_DEPTH,
) -> dict[str, Any]:
    """A JSON object (a dict), bounded as :func:`json_value`."""
    if value is None and default is not _MISSING:
        return default
    found = json_value(value, path, max_bytes=max_bytes, max_depth=max_depth)
    if not isinstance(found, dict):
        raise Invalid(path, "a JSON object", value)
    return found


def json_list(
    value: object,
    path: str,
    *,
    default: list[Any] = _MISSING,
    max_bytes: int = MAX_JSON_BYTES,
    max_depth: int = MAX_DEPTH,
) -> list[Any]:
    """A JSON list, bounded as :func:`json_value`."""
    if value is None and default is not _MISSING:
        return default
    found = json_value(value, path, max_bytes=max_bytes, max_depth=max_depth)
    if not isinstance(found, list):
        raise Invalid(path, "a JSON list", value)
    return found


# ---- names ----------------------------------------------------------------------------------


def node_name(value: object, path: str, *, default: str = _MISSING) -> str:
    """A node name (:data:`NODE_NAME_RULE`): also a safe znode name and host-name-like label."""
    if value is None and default is not _MISSING:
        return default
    found = text(value, path, max_bytes=256)
    if not _NODE_NAME.fullmatch(found):
        raise Invalid(path, NODE_NAME_RULE, value)
    return found


def vm_name(value: object, path: str, *, default: str = _MISSING) -> str:
    """A VM (libvirt domain) name: 1 to MAX_NAME_LENGTH characters, no '/', no control
    characters, not only white space."""
    if value is None and default is not _MISSING:
        return default
    found = text(value, path, max_bytes=MAX_NAME_LENGTH * 4)
    if not found.strip() or len(found) > MAX_NAME_LENGTH or "/" in found or _CONTROL.search(found):
        raise Invalid(path, f"a VM name of 1 to {MAX_NAME_LENGTH} characters without '/' or control characters", value)
    return found


def uuid(value: object, path: str, *, default: str = _MISSING) -> str:
    """A UUID in its canonical form (lowercase, 8-4-4-4-12), as the cluster names VMs."""
    if value is None and default is not _MISSING:
        return default
    found = text(value, path, max_bytes=64)
    if not _UUID.fullmatch(found):
        raise Invalid(path, "a UUID in lowercase 8-4-4-4-12 form", value)
    return found


def address(value: object, path: str, *, default: str = _MISSING) -> str:
    """An IP address (v4 or v6, no zone, no brackets) or a DNS host name (labels of letters,
    digits and '-', at most 253 characters): something a URI template can take as its host and
    that cannot change the rest of the URI (no '/', '?', '@', ':' outside IPv6, '+', spaces)."""
    if value is None and default is not _MISSING:
        return default
    found = text(value, path, max_bytes=256)
    accepted = "an IP address or a host name"
    try:
        ip = ipaddress.ip_address(found)
    except ValueError:
        ip = None
    if ip is not None:
        if "%" in found:
            raise Invalid(path, accepted + " (no IPv6 zone)", value)
        return str(ip)
    name = found[:-1] if found.endswith(".") else found
    if not name or len(name) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in name.split(".")):
        raise Invalid(path, accepted, value)
    if name.replace(".", "").isdigit():
        raise Invalid(path, accepted + " (all-numeric names are not host names)", value)
    return found
