"""The node daemon's logging: the standard library's ``logging``, one formatter and one adapter.

One line per message::

    2024/05/01 12:00:00.123456 ok: [migration-0b6c...] VM 0b6c...: migrated to node2
    2024/05/01 12:00:00.123456 \\033[92m>>>\\033[0m [keepalive] ...        (on a terminal)

that is: the timestamp, the state prompt, the tag of the thread that logged (``MainThread`` is
shown as ``main-thread``) and the message. Records carry standard levels; the daemon's three states
of its own (ok, system, tick) are INFO records marked with their letter (the record attribute
``state``), so any handler or tool that knows ``logging`` reads them as what they are. States,
their level, colour and plain prompt:

=====  ============  =====================  ============
state  level         colour of ``>>>``      plain prompt
=====  ============  =====================  ============
o      INFO          green                  ``ok:``
e      ERROR (40+)   red                    ``failed:``
w      WARNING       yellow                 ``warning:``
i      INFO          blue                   ``info:``
s      INFO          cyan                   ``system:``
t      INFO          purple                 ``tick:``
d      DEBUG         white (``\\033[97m``)  ``debug:``
=====  ============  =====================  ============

Colours are used when the stream is a terminal, unless forced on or off (``colours``). Debug lines
are written only when debug is enabled. Every daemon module gets its logger here::

    from .log import get_logger
    log = get_logger(__name__)
    log.ok("VM %s: started", uuid); log.system(...); log.tick(...); log.info/warning/error/debug(...)

``get_logger`` returns a :class:`DaemonLog`, a ``logging.LoggerAdapter`` that adds ``ok``,
``system`` and ``tick``; importing this module changes nothing in ``logging`` itself.

A message never spans lines: control characters in it (a VM name with a newline, an escape
sequence in a libvirt error) are written escaped (``\\n``, ``\\x1b``), so a name cannot forge a log
line nor drive a terminal. Only a traceback, which the formatter appends itself, has more lines.

The log file is opened by a ``WatchedFileHandler``: when logrotate has renamed it, the next line
reopens it by its name, so no signal is needed (the daemon accepts SIGHUP, the unit's reload, and
ignores it). The file is created 0640 and narrowed to that when it is reopened wider.
"""

from __future__ import annotations

import io
import logging
import logging.handlers
import os
import re
import sys
import threading
from collections.abc import MutableMapping
from datetime import datetime
from typing import IO, TYPE_CHECKING, Any

ROOT_LOGGER = "pvc_node_daemon"

ENDC = "\033[0m"
COLOUR_PROMPT = ">>>"
TIMESTAMP_FORMAT = "%Y/%m/%d %H:%M:%S.%f"

# Log files are readable by root and the adm group only: they name VMs, nodes and libvirt's errors.
LOG_FILE_MODE = 0o640

# The record attribute that carries a state letter (set by DaemonLog.ok/system/tick).
STATE_ATTRIBUTE = "state"


class State:
    """One log state: its letter, ANSI colour and plain-text prompt."""

    __slots__ = ("letter", "colour", "prompt")

    def __init__(self, letter: str, colour: str, prompt: str) -> None:
        self.letter = letter
        self.colour = colour
        self.prompt = prompt

    def __repr__(self) -> str:
        return f"State({self.letter!r}, {self.colour!r}, {self.prompt!r})"


STATES = {
    "o": State("o", "\033[92m", "ok:"),
    "e": State("e", "\033[91m", "failed:"),
    "w": State("w", "\033[93m", "warning:"),
    "i": State("i", "\033[94m", "info:"),
    "s": State("s", "\033[96m", "system:"),
    "t": State("t", "\033[95m", "tick:"),
    "d": State("d", "\033[97m", "debug:"),
}


def state_for_level(levelno: int) -> State:
    """The state of a record level: its own, or the one of the standard level below it."""
    if levelno >= logging.ERROR:
        return STATES["e"]
    if levelno >= logging.WARNING:
        return STATES["w"]
    if levelno >= logging.INFO:
        return STATES["i"]
    return STATES["d"]


def state_of(record: logging.LogRecord) -> State:
    """The state of a record: the letter it was marked with, else the one of its level."""
    letter = getattr(record, STATE_ATTRIBUTE, None)
    if isinstance(letter, str) and letter in STATES:
        return STATES[letter]
    return state_for_level(record.levelno)


# C0 and C1 controls, DEL, and Unicode's line and paragraph separators: anything that could end a
# line, start a forged one or send a terminal an escape sequence.
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED_CONTROLS = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_control(match: re.Match[str]) -> str:
    char = match.group()
    named = _NAMED_CONTROLS.get(char)
    if named is not None:
        return named
    code = ord(char)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def escape_controls(text: str) -> str:
    """``text`` on one line: control characters written as escapes (``\\n``, ``\\x1b``, ``\\u2028``)."""
    return _CONTROLS.sub(_escape_control, text)


def thread_tag(name: str | None) -> str:
    """The tag shown for a thread name: ``MainThread`` becomes ``main-thread``."""
    if not name or name == "MainThread":
        return "main-thread"
    return escape_controls(name)


# ---- the adapter ----------------------------------------------------------------------------

if TYPE_CHECKING:
    _Adapter = logging.LoggerAdapter[logging.Logger]
else:
    _Adapter = logging.LoggerAdapter


class DaemonLog(_Adapter):
    """A daemon logger: the standard methods, plus ``ok``, ``system`` and ``tick`` (INFO records
    marked with their state)."""

    def __init__(self, logger: logging.Logger) -> None:
        super().__init__(logger, {})

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        # The adapter adds nothing of its own; ``extra`` given to a call is kept as it is (the
        # standard adapter would replace it with the adapter's).
        return msg, kwargs

    def _state(self, letter: str, msg: object, args: tuple[object, ...], kwargs: dict[str, Any]) -> None:
        if self.isEnabledFor(logging.INFO):
            kwargs["extra"] = {**(kwargs.get("extra") or {}), STATE_ATTRIBUTE: letter}
            # Two more frames (this method and ok/system/tick) so that funcName and lineno name the
            # caller; logging's own frames (the adapter's log) are skipped by logging itself.
            kwargs["stacklevel"] = kwargs.get("stacklevel", 1) + 2
            self.log(logging.INFO, msg, *args, **kwargs)

    def ok(self, msg: object, *args: object, **kwargs: Any) -> None:
        """A successful action (green ``ok:``)."""
        self._state("o", msg, args, kwargs)

    def system(self, msg: object, *args: object, **kwargs: Any) -> None:
        """A daemon life-cycle event (cyan ``system:``)."""
        self._state("s", msg, args, kwargs)

    def tick(self, msg: object, *args: object, **kwargs: Any) -> None:
        """A keepalive tick (purple ``tick:``)."""
        self._state("t", msg, args, kwargs)


def _in_tree(name: str) -> bool:
    return name == ROOT_LOGGER or name.startswith(ROOT_LOGGER + ".")


def get_logger(name: str | None = None) -> DaemonLog:
    """The daemon logger ``name`` (``None`` = the root ``pvc_node_daemon``).

    ``__name__`` of a daemon module is used as is; any other name is put below the root, so
    ``get_logger("keepalive")`` is ``pvc_node_daemon.keepalive``.
    """
    if not name:
        full = ROOT_LOGGER
    elif _in_tree(name):
        full = name
    else:
        full = f"{ROOT_LOGGER}.{name}"
    return DaemonLog(logging.getLogger(full))


# ---- formatting -----------------------------------------------------------------------------


class DaemonFormatter(logging.Formatter):
    """``<timestamp> <prompt> [<thread>] <message>``, the prompt coloured or plain, the message on
    one line (control characters escaped); a traceback follows on lines of its own."""

    def __init__(self, colours: bool) -> None:
        super().__init__()
        self.colours = colours

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802 (logging's name)
        return datetime.fromtimestamp(record.created).strftime(datefmt or TIMESTAMP_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        state = state_of(record)
        prompt = f"{state.colour}{COLOUR_PROMPT}{ENDC}" if self.colours else state.prompt
        message = escape_controls(record.getMessage())
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            message = f"{message}\n{record.exc_text}"
        if record.stack_info:
            message = f"{message}\n{self.formatStack(record.stack_info)}"
        return f"{self.formatTime(record)} {prompt} [{thread_tag(record.threadName)}] {message}"


def stream_is_tty(stream: object) -> bool:
    """Whether ``stream`` is a terminal; False for anything that cannot tell."""
    isatty = getattr(stream, "isatty", None)
    if isatty is None:
        return False
    try:
        return bool(isatty())
    except (ValueError, OSError):
        return False


# ---- handlers -------------------------------------------------------------------------------

_MARK = "_pvc_node_daemon_handler"


class LogFileHandler(logging.handlers.WatchedFileHandler):
    """The daemon's log file: appended to in UTF-8, reopened by its name at the first line after a
    rotation renamed it (``WatchedFileHandler``), created 0640 whatever the umask and narrowed to
    0640 when it is (re)opened wider (a file logrotate or an operator made)."""

    def __init__(self, filename: str | os.PathLike[str]) -> None:
        directory = os.path.dirname(os.fspath(filename))
        if directory:
            os.makedirs(directory, exist_ok=True)
        super().__init__(filename, mode="a", encoding="utf-8")

    def _open(self) -> io.TextIOWrapper:
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, LOG_FILE_MODE)
        try:
            if os.fstat(fd).st_mode & 0o777 & ~LOG_FILE_MODE:
                os.fchmod(fd, LOG_FILE_MODE)
            # StreamHandler flushes after every record, so each line reaches the file whole.
            return open(fd, "a", encoding=self.encoding, errors=self.errors)
        except BaseException:
            os.close(fd)
            raise


def _marked(handler: logging.Handler) -> logging.Handler:
    setattr(handler, _MARK, True)
    return handler


def _our_handlers(logger: logging.Logger) -> list[logging.Handler]:
    return [handler for handler in logger.handlers if getattr(handler, _MARK, False)]


_SETUP_LOCK = threading.RLock()


def reset_logging() -> None:
    """Remove the handlers :func:`setup_logging` installed and restore the logger's defaults."""
    with _SETUP_LOCK:
        logger = logging.getLogger(ROOT_LOGGER)
        for handler in _our_handlers(logger):
            logger.removeHandler(handler)
            handler.close()  # a StreamHandler does not close its stream (stdout stays open)
        logger.setLevel(logging.NOTSET)
        logger.propagate = True


def setup_logging(
    debug: bool = False,
    stdout: bool | IO[str] = True,
    file: str | os.PathLike[str] | None = None,
    colours: bool | None = None,
) -> DaemonLog:
    """Configure the ``pvc_node_daemon`` logger tree and return its root logger.

    ``stdout``: True writes to ``sys.stdout`` (journald under systemd); a text stream writes to
    that stream; False writes nowhere but the file. ``file``: path of the log file, or None.
    ``colours``: None colours a sink when it is a terminal; True/False force colours on/off for
    every sink. ``debug``: debug lines are written only when true.

    Idempotent: each call replaces the handlers of the previous call (closing its file). The tree
    does not propagate to the root logger, so nothing is written twice.
    """
    with _SETUP_LOCK:
        reset_logging()
        logger = logging.getLogger(ROOT_LOGGER)
        level = logging.DEBUG if debug else logging.INFO
        handlers: list[logging.Handler] = []
        if stdout:
            stream = sys.stdout if stdout is True else stdout
            handler: logging.Handler = logging.StreamHandler(stream)
            handler.setFormatter(DaemonFormatter(stream_is_tty(stream) if colours is None else bool(colours)))
            handlers.append(handler)
        if file is not None:
            handler = LogFileHandler(file)
            handler.setFormatter(DaemonFormatter(bool(colours)))  # a file is never a terminal
            handlers.append(handler)
        if not handlers:
            handlers.append(logging.NullHandler())  # no "No handlers could be found" fallback to stderr
        for handler in handlers:
            handler.setLevel(level)
            logger.addHandler(_marked(handler))
        logger.setLevel(level)
        logger.propagate = False
        return DaemonLog(logger)
