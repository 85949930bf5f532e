"""The node daemon's logging, on the standard library's ``logging``.

One line per message::

    2024/05/01 12:00:00.123456 ok: [migration-0b6c...] VM 0b6c...: migrated to node2
    2024/05/01 12:00:00.123456 \\033[92m>>>\\033[0m [keepalive] ...        (on a terminal)

that is: the timestamp, the state prompt, the tag of the thread that logged (``MainThread`` is
shown as ``main-thread``) and the message. States, their level, colour and plain prompt:

=====  ============  =====================  ============
state  level         colour of ``>>>``      plain prompt
=====  ============  =====================  ============
o      OK (25)       green                  ``ok:``
e      ERROR (40+)   red                    ``failed:``
w      WARNING (30)  yellow                 ``warning:``
i      INFO (20)     blue                   ``info:``
s      SYSTEM (23)   cyan                   ``system:``
t      TICK (21)     purple                 ``tick:``
d      DEBUG (10)    white (``\\033[97m``)  ``debug:``
=====  ============  =====================  ============

Colours are used when the stream is a terminal, unless forced on or off (``colours``). Debug lines
are written only when debug is enabled. Use::

    from pvc_node_daemon.log import get_logger
    log = get_logger(__name__)
    log.ok("VM %s: started", uuid); log.system(...); log.tick(...); log.info/warning/error/debug(...)

Loggers obtained with ``logging.getLogger(__name__)`` work too: importing this module makes
:class:`DaemonLogger` the logger class (it only adds ``ok``/``system``/``tick`` to
``logging.Logger``) and upgrades loggers of the ``pvc_node_daemon`` tree created earlier.

:func:`reopen_log_files` reopens the log file for SIGHUP (after logrotate renamed it). It is safe
from any thread and from a signal handler: when the signal interrupts a write of the same handler,
the reopen is deferred to the start of the next write instead of closing the file under it.
(Upstream reopened with ``buffering=0``, which Python 3 refuses for text files.)
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from datetime import datetime
from typing import IO, Any

ROOT_LOGGER = "pvc_node_daemon"

TICK = 21
SYSTEM = 23
OK = 25

logging.addLevelName(TICK, "TICK")
logging.addLevelName(SYSTEM, "SYSTEM")
logging.addLevelName(OK, "OK")

ENDC = "\033[0m"
COLOUR_PROMPT = ">>>"
TIMESTAMP_FORMAT = "%Y/%m/%d %H:%M:%S.%f"


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
_LEVEL_STATES = {
    OK: "o",
    logging.CRITICAL: "e",
    logging.ERROR: "e",
    logging.WARNING: "w",
    logging.INFO: "i",
    SYSTEM: "s",
    TICK: "t",
    logging.DEBUG: "d",
}


def state_for_level(levelno: int) -> State:
    """The state of a record level; levels without a state of their own take the one below them."""
    letter = _LEVEL_STATES.get(levelno)
    if letter is None:
        if levelno >= logging.ERROR:
            letter = "e"
        elif levelno >= logging.WARNING:
            letter = "w"
        elif levelno >= logging.INFO:
            letter = "i"
        else:
            letter = "d"
    return STATES[letter]


def thread_tag(name: str | None) -> str:
    """The tag shown for a thread name: ``MainThread`` becomes ``main-thread``."""
    if not name or name == "MainThread":
        return "main-thread"
    return name


# ---- logger class ---------------------------------------------------------------------------


class DaemonLogger(logging.Logger):
    """``logging.Logger`` plus ``ok``, ``system`` and ``tick``."""

    def _state_log(self, level: int, msg: object, args: tuple, kwargs: dict[str, Any]) -> None:
        if self.isEnabledFor(level):
            # One more frame (this method's caller) so that funcName/lineno name the daemon code.
            kwargs["stacklevel"] = kwargs.get("stacklevel", 1) + 2
            self._log(level, msg, args, **kwargs)

    def ok(self, msg: object, *args: object, **kwargs: Any) -> None:
        """A successful action (green ``ok:``)."""
        self._state_log(OK, msg, args, kwargs)

    def system(self, msg: object, *args: object, **kwargs: Any) -> None:
        """A daemon life-cycle event (cyan ``system:``)."""
        self._state_log(SYSTEM, msg, args, kwargs)

    def tick(self, msg: object, *args: object, **kwargs: Any) -> None:
        """A keepalive tick (purple ``tick:``)."""
        self._state_log(TICK, msg, args, kwargs)


def _install_logger_class() -> None:
    current = logging.getLoggerClass()
    if issubclass(current, DaemonLogger):
        return
    if current is logging.Logger:
        logging.setLoggerClass(DaemonLogger)
    else:  # another library set its own class: keep it and add our methods on top
        logging.setLoggerClass(type("DaemonLogger", (DaemonLogger, current), {}))


def _in_tree(name: str) -> bool:
    return name == ROOT_LOGGER or name.startswith(ROOT_LOGGER + ".")


def _upgrade(logger: logging.Logger) -> DaemonLogger:
    # A plain Logger created before this module was imported gets our methods; the layouts are
    # identical (DaemonLogger adds methods only), so changing the class is safe.
    if not isinstance(logger, DaemonLogger) and type(logger) is logging.Logger:  # pylint: disable=unidiomatic-typecheck
        logger.__class__ = DaemonLogger
    return logger  # type: ignore[return-value]


def _upgrade_tree() -> None:
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if _in_tree(name) and isinstance(logger, logging.Logger):
            _upgrade(logger)


_install_logger_class()
_upgrade_tree()


def get_logger(name: str | None = None) -> DaemonLogger:
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
    return _upgrade(logging.getLogger(full))


# ---- formatting -----------------------------------------------------------------------------


class DaemonFormatter(logging.Formatter):
    """``<timestamp> <prompt> [<thread>] <message>``, the prompt coloured or plain."""

    def __init__(self, colours: bool) -> None:
        super().__init__()
        self.colours = colours

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return datetime.fromtimestamp(record.created).strftime(datefmt or TIMESTAMP_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        state = state_for_level(record.levelno)
        prompt = f"{state.colour}{COLOUR_PROMPT}{ENDC}" if self.colours else state.prompt
        message = record.getMessage()
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


class ReopenableFileHandler(logging.FileHandler):
    """A line-buffered, appending UTF-8 log file that can be reopened after rotation."""

    def __init__(self, filename: str | os.PathLike) -> None:
        directory = os.path.dirname(os.fspath(filename))
        if directory:
            os.makedirs(directory, exist_ok=True)
        self._in_emit = False
        self._reopen_pending = False
        super().__init__(filename, mode="a", encoding="utf-8")

    def _open(self) -> IO[str]:
        # buffering=1: line buffered, valid for text files (upstream's buffering=0 is not).
        return open(self.baseFilename, self.mode, buffering=1, encoding=self.encoding, errors=self.errors)  # pylint: disable=consider-using-with

    def _reopen_now(self) -> None:
        self._reopen_pending = False
        old = self.stream
        self.stream = self._open()
        if old is not None:
            try:
                old.flush()
                old.close()
            except (OSError, ValueError):
                old = None   # the rotated file is already unusable; the new one is open

    def emit(self, record: logging.LogRecord) -> None:
        # Called with the handler lock held (Handler.handle).
        self._in_emit = True
        try:
            if self._reopen_pending:
                try:
                    self._reopen_now()
                except OSError:
                    self.handleError(record)
            super().emit(record)
        finally:
            self._in_emit = False

    def reopen(self) -> None:
        """Close and reopen the file by name (a rotated file is left to logrotate)."""
        with self.lock:  # an RLock: another thread's write finishes first
            if self._in_emit:
                # We hold the lock and a write is in progress, so it is this very thread's write,
                # interrupted by a signal handler: do not close the file under it.
                self._reopen_pending = True
                return
            self._reopen_now()


def _marked(handler: logging.Handler) -> logging.Handler:
    setattr(handler, _MARK, True)
    return handler


def _our_handlers(logger: logging.Logger) -> list[logging.Handler]:
    return [handler for handler in logger.handlers if getattr(handler, _MARK, False)]


_SETUP_LOCK = threading.RLock()


def reset_logging() -> None:
    """Remove the handlers :func:`setup_logging` installed and restore the logger's defaults."""
    with _SETUP_LOCK:
        logger = get_logger()
        for handler in _our_handlers(logger):
            logger.removeHandler(handler)
            handler.close()  # a StreamHandler does not close its stream (stdout stays open)
        logger.setLevel(logging.NOTSET)
        logger.propagate = True


def setup_logging(
    debug: bool = False,
    stdout: bool | IO[str] = True,
    file: str | os.PathLike | None = None,
    colours: bool | None = None,
) -> DaemonLogger:
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
        logger = get_logger()
        level = logging.DEBUG if debug else logging.INFO
        handlers: list[logging.Handler] = []
        if stdout:
            stream = sys.stdout if stdout is True else stdout
            handler: logging.Handler = logging.StreamHandler(stream)
            handler.setFormatter(DaemonFormatter(stream_is_tty(stream) if colours is None else bool(colours)))
            handlers.append(handler)
        if file is not None:
            handler = ReopenableFileHandler(file)
            handler.setFormatter(DaemonFormatter(bool(colours)))  # a file is never a terminal
            handlers.append(handler)
        if not handlers:
            handlers.append(logging.NullHandler())  # no "No handlers could be found" fallback to stderr
        for handler in handlers:
            handler.setLevel(level)
            logger.addHandler(_marked(handler))
        logger.setLevel(level)
        logger.propagate = False
        _upgrade_tree()
        return logger


def reopen_log_files() -> int:
    """Reopen every log file of the daemon's loggers (SIGHUP); returns how many were reopened."""
    count = 0
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if not (_in_tree(name) and isinstance(logger, logging.Logger)):
            continue
        for handler in list(logger.handlers):
            if isinstance(handler, ReopenableFileHandler):
                handler.reopen()
                count += 1
    return count
