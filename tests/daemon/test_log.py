"""The daemon logger: prompts and colours per state, TTY detection, debug, thread tags, SIGHUP reopen."""

from __future__ import annotations

import io
import logging
import re
import threading

import pytest

from pvc_node_daemon import log as daemon_log
from pvc_node_daemon.log import (
    OK,
    SYSTEM,
    TICK,
    DaemonLogger,
    get_logger,
    reopen_log_files,
    reset_logging,
    setup_logging,
)

TIMESTAMP = r"\d{4}/\d{2}/\d{2} \d{2}:\d{2}:\d{2}\.\d{6}"


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _restore_logging():
    yield
    reset_logging()


# (method, colour, plain prompt)
STATES = [
    ("ok", "\033[92m", "ok:"),
    ("error", "\033[91m", "failed:"),
    ("warning", "\033[93m", "warning:"),
    ("info", "\033[94m", "info:"),
    ("system", "\033[96m", "system:"),
    ("tick", "\033[95m", "tick:"),
    ("debug", "\033[97m", "debug:"),
]


@pytest.mark.parametrize("method,colour,prompt", STATES)
def test_state_on_a_terminal_is_a_coloured_prompt(method, colour, prompt):
    stream = FakeTTY()
    setup_logging(debug=True, stdout=stream)
    getattr(get_logger("test"), method)("hello %s", "world")
    line = stream.getvalue()
    assert re.fullmatch(TIMESTAMP + re.escape(f" {colour}>>>\033[0m [main-thread] hello world") + "\n", line), line
    assert prompt not in line


@pytest.mark.parametrize("method,colour,prompt", STATES)
def test_state_on_a_pipe_is_a_plain_prompt(method, colour, prompt):
    stream = io.StringIO()
    setup_logging(debug=True, stdout=stream)
    getattr(get_logger("test"), method)("hello %s", "world")
    line = stream.getvalue()
    assert re.fullmatch(TIMESTAMP + re.escape(f" {prompt} [main-thread] hello world") + "\n", line), line
    assert "\033" not in line and colour not in line


def test_colours_can_be_forced_on_and_off():
    plain_tty, coloured_pipe = FakeTTY(), io.StringIO()
    setup_logging(stdout=plain_tty, colours=False)
    get_logger().ok("x")
    setup_logging(stdout=coloured_pipe, colours=True)
    get_logger().ok("x")
    assert " ok: " in plain_tty.getvalue() and "\033" not in plain_tty.getvalue()
    assert "\033[92m>>>\033[0m" in coloured_pipe.getvalue()


def test_critical_and_other_levels_map_to_the_state_below():
    stream = io.StringIO()
    setup_logging(debug=True, stdout=stream)
    logger = get_logger()
    logger.critical("c")
    logger.log(35, "between warning and error")
    logger.log(15, "between debug and info")
    lines = stream.getvalue().splitlines()
    assert " failed: " in lines[0] and " warning: " in lines[1] and " debug: " in lines[2]


def test_debug_only_when_enabled():
    stream = io.StringIO()
    setup_logging(debug=False, stdout=stream)
    logger = get_logger("x")
    logger.debug("hidden")
    logger.info("shown")
    logger.tick("tick shown")
    assert "hidden" not in stream.getvalue()
    assert "shown" in stream.getvalue() and "tick shown" in stream.getvalue()
    # a child logger set to DEBUG by mistake still does not leak debug lines
    logger.setLevel(logging.DEBUG)
    logger.debug("still hidden")
    logger.setLevel(logging.NOTSET)
    assert "still hidden" not in stream.getvalue()

    setup_logging(debug=True, stdout=stream)
    logger.debug("now shown")
    assert " debug: [main-thread] now shown" in stream.getvalue()


def test_thread_tag_is_the_thread_name():
    stream = io.StringIO()
    setup_logging(stdout=stream)
    logger = get_logger("t")
    names = ["vm-thread", "keepalive", "reconciler", "migration-0b6c2f9e-1111-2222-3333-444455556666"]
    threads = [threading.Thread(target=logger.ok, args=(f"from {name}",), name=name) for name in names]
    for thread in threads:
        thread.start()
        thread.join()
    logger.system("from main")
    text = stream.getvalue()
    for name in names:
        assert f" ok: [{name}] from {name}\n" in text
    assert " system: [main-thread] from main\n" in text


def test_timestamp_starts_every_line():
    stream = io.StringIO()
    setup_logging(stdout=stream)
    get_logger().info("one")
    get_logger().warning("two")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    assert all(re.match(TIMESTAMP + " ", line) for line in lines)


def test_exception_traceback_is_included():
    stream = io.StringIO()
    setup_logging(stdout=stream)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        get_logger().exception("tick failed")
    text = stream.getvalue()
    assert " failed: [main-thread] tick failed\nTraceback" in text and "RuntimeError: boom" in text


def test_levels_and_logger_class():
    assert (logging.getLevelName(OK), logging.getLevelName(SYSTEM), logging.getLevelName(TICK)) == ("OK", "SYSTEM", "TICK")
    assert logging.INFO < TICK < SYSTEM < OK < logging.WARNING
    assert get_logger().name == "pvc_node_daemon"
    assert get_logger("keepalive").name == "pvc_node_daemon.keepalive"
    assert get_logger("pvc_node_daemon.reconciler").name == "pvc_node_daemon.reconciler"
    # modules that use logging.getLogger(__name__) get the same methods
    assert isinstance(logging.getLogger("pvc_node_daemon.some_module"), DaemonLogger)


def test_plain_logger_created_before_is_upgraded():
    manager = logging.Logger.manager
    name = "pvc_node_daemon.created_early"
    early = logging.Logger(name)  # what getLogger returned before our logger class was installed
    manager.loggerDict[name] = early
    try:
        stream = io.StringIO()
        setup_logging(stdout=stream)
        early.parent = get_logger()
        early.ok("upgraded")
        assert " ok: [main-thread] upgraded" in stream.getvalue()
    finally:
        del manager.loggerDict[name]


def test_caller_location_is_the_daemon_code():
    stream = io.StringIO()
    setup_logging(stdout=stream)
    records = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    get_logger().addHandler(handler)
    try:
        get_logger().ok("where")
    finally:
        get_logger().removeHandler(handler)
    assert records[0].funcName == "test_caller_location_is_the_daemon_code"


def test_setup_is_idempotent():
    first, second = io.StringIO(), io.StringIO()
    setup_logging(stdout=first)
    logger = setup_logging(stdout=second)
    assert logger is get_logger()
    marked = [h for h in logger.handlers if getattr(h, daemon_log._MARK, False)]  # pylint: disable=protected-access
    assert len(marked) == 1
    logger.ok("once")
    assert first.getvalue() == ""
    assert second.getvalue().count("once") == 1
    assert logger.propagate is False


def test_no_sink_writes_nothing(capsys):
    logger = setup_logging(stdout=False)
    logger.error("nowhere")
    captured = capsys.readouterr()
    assert "nowhere" not in captured.err and "nowhere" not in captured.out


def test_stdout_true_uses_sys_stdout(capsys):
    setup_logging(stdout=True)
    get_logger().ok("to stdout")
    assert " ok: [main-thread] to stdout" in capsys.readouterr().out


def test_file_sink_is_plain_and_reopen_after_rotation(tmp_path):
    path = tmp_path / "logs" / "node-daemon.log"  # the directory is created
    tty = FakeTTY()
    setup_logging(stdout=tty, file=str(path))
    logger = get_logger("rot")
    logger.ok("before rotation")
    rotated = tmp_path / "logs" / "node-daemon.log.1"
    path.rename(rotated)
    logger.ok("after rename, before reopen")  # still the old (renamed) file
    assert reopen_log_files() == 1
    logger.ok("after reopen")
    old, new = rotated.read_text(), path.read_text()
    assert "before rotation" in old and "after rename, before reopen" in old and "after reopen" not in old
    assert "after reopen" in new and "before rotation" not in new
    assert "\033" not in old + new  # a file is not a terminal
    assert "\033[92m>>>" in tty.getvalue()
    assert re.fullmatch(TIMESTAMP + r" ok: \[main-thread\] after reopen\n", new)


def test_reopen_inside_a_write_is_deferred(tmp_path):
    # A SIGHUP handler runs in the main thread, possibly in the middle of a write of the same
    # handler. Simulate that: reopen from inside the formatter (which runs under the handler lock).
    path = tmp_path / "pvc.log"
    setup_logging(stdout=False, file=path)
    logger = get_logger()
    (handler,) = [h for h in logger.handlers if isinstance(h, daemon_log.ReopenableFileHandler)]
    original_format = handler.formatter.format

    def format_and_reopen(record):
        if record.getMessage() == "interrupted":
            path.rename(tmp_path / "pvc.log.1")
            assert reopen_log_files() == 1
        return original_format(record)

    handler.formatter.format = format_and_reopen  # type: ignore[method-assign]
    logger.info("interrupted")
    logger.info("next")
    assert "interrupted" in (tmp_path / "pvc.log.1").read_text()
    assert "next" in path.read_text() and "interrupted" not in path.read_text()


def test_reopen_without_file_handlers():
    setup_logging(stdout=io.StringIO())
    assert reopen_log_files() == 0


def test_reopen_races_with_writers(tmp_path):
    path = tmp_path / "pvc.log"
    setup_logging(stdout=False, file=path)
    logger = get_logger()
    stop = threading.Event()

    def writer(n):
        i = 0
        while not stop.is_set():
            logger.info("w%d-%d", n, i)
            i += 1

    threads = [threading.Thread(target=writer, args=(n,), name=f"w{n}") for n in range(3)]
    for thread in threads:
        thread.start()
    try:
        for generation in range(20):
            path.rename(tmp_path / f"pvc.log.{generation}")
            reopen_log_files()
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    logger.info("final")
    assert path.read_text().endswith("final\n")
    # every line in every file is complete
    for file in tmp_path.iterdir():
        for line in file.read_text().splitlines():
            assert re.fullmatch(TIMESTAMP + r" info: \[(w\d|main-thread)\] (w\d-\d+|final)", line), line


def test_reset_restores_propagation():
    setup_logging(stdout=io.StringIO())
    reset_logging()
    logger = get_logger()
    assert logger.propagate is True and logger.level == logging.NOTSET
    assert not [h for h in logger.handlers if getattr(h, daemon_log._MARK, False)]  # pylint: disable=protected-access
