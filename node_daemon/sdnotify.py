"""systemd's service notification protocol (sd_notify) without python-systemd.

Under ``Type=notify`` systemd passes the address of a datagram socket in ``$NOTIFY_SOCKET`` (a path,
or ``@name`` for an abstract socket) and counts the service as started when a datagram with the
line ``READY=1`` arrives there; ``STOPPING=1`` and ``STATUS=<text>`` say what it is doing. One
datagram per message, newline-separated ``KEY=VALUE`` lines, nothing to read back.

The address is taken out of the environment when first read (as sd_notify's ``unset_environment``
does), so that nothing the daemon might start later sends in its name.
"""

from __future__ import annotations

import os
import socket

from .log import get_logger

log = get_logger(__name__)

_UNSET = object()
_address: object = _UNSET


def _socket_address() -> str | None:
    global _address  # pylint: disable=global-statement
    if _address is _UNSET:
        _address = os.environ.pop("NOTIFY_SOCKET", None) or None
    return _address  # type: ignore[return-value]


def notify(*lines: str) -> bool:
    """Send ``lines`` (e.g. ``"READY=1"``, ``"STATUS=running"``) to the service manager. False
    when there is none (no ``$NOTIFY_SOCKET``: started by hand) or the message could not be sent,
    which is logged: the daemon keeps running either way."""
    address = _socket_address()
    if address is None:
        return False
    if address.startswith("@"):
        target = "\0" + address[1:]
    elif address.startswith("/"):
        target = address
    else:
        log.warning("NOTIFY_SOCKET %r is neither a path nor an abstract socket; not notifying", address)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(target)
            sock.sendall("\n".join(lines).encode("utf-8"))
    except OSError as exc:
        log.warning("cannot notify the service manager at %s: %s", address, exc)
        return False
    return True


def reset() -> None:
    """Forget the address read (tests)."""
    global _address  # pylint: disable=global-statement
    _address = _UNSET
