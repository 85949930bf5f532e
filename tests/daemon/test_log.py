"""The daemon logger: prompts and colours per state over standard levels, TTY detection, debug, thread
tags, control characters escaped, the log file reopened after a rotation and created 0640."""

from __future__ import annotations

import ast
import io
import logging
import os
import re
import threading
import time
from pathlib import Path

import pytest

from pvc_node_daemon import log as daemon_log
from pvc_node_daemon.log import ROOT_LOGGER, DaemonLog, escape_controls, get_logger, reset_logging, setup_logging

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


class Records(logging.Handler):
    """The records that reach the daemon's root logger."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def __enter__(self) -> list[logging.LogRecord]:
        logging.getLogger(ROOT_LOGGER).addHandler(self)
        return self.records

    def __exit__(self, *exc: object) -> None:
        logging.getLogger(ROOT_LOGGER).removeHandler(self)


def test_states_of_their_own_are_info_records_marked_with_their_letter():
    setup_logging(debug=True, stdout=io.StringIO())
    with Records() as records:
        logger = get_logger("levels")
        logger.ok("o")
        logger.system("s")
        logger.tick("t")
        logger.info("i")
        logger.debug("d")
    assert [(r.levelno, getattr(r, "state", None)) for r in records] == [
        (logging.INFO, "o"),
        (logging.INFO, "s"),
        (logging.INFO, "t"),
        (logging.INFO, None),
        (logging.DEBUG, None),
    ]


def test_importing_the_module_changes_nothing_in_logging():
    assert logging.getLoggerClass() is logging.Logger
    assert type(logging.getLogger("pvc_node_daemon.some_module")) is logging.Logger  # pylint: disable=unidiomatic-typecheck
    assert all(logging.getLevelName(name) == f"Level {name}" for name in (21, 23, 25))  # no levels of our own


def test_logger_names():
    assert isinstance(get_logger(), DaemonLog)
    assert get_logger().name == "pvc_node_daemon"
    assert get_logger("keepalive").name == "pvc_node_daemon.keepalive"
    assert get_logger("pvc_node_daemon.reconciler").name == "pvc_node_daemon.reconciler"


def test_a_plain_logger_of_the_tree_is_formatted_too():
    # The store gets a plain logging.Logger of the tree (it is shared with the modules).
    stream = io.StringIO()
    setup_logging(stdout=stream)
    logging.getLogger("pvc_node_daemon.store").warning("connection %s", "lost")
    assert re.fullmatch(TIMESTAMP + re.escape(" warning: [main-thread] connection lost") + "\n", stream.getvalue())


def test_caller_location_is_the_daemon_code():
    setup_logging(stdout=io.StringIO())
    with Records() as records:
        get_logger().ok("where")
        get_logger().warning("there")
    assert [r.funcName for r in records] == ["test_caller_location_is_the_daemon_code"] * 2
    assert records[0].pathname == records[1].pathname == __file__


def test_extra_of_a_call_is_kept():
    setup_logging(stdout=io.StringIO())
    with Records() as records:
        get_logger().ok("with extra", extra={"vm": "web1"})
        get_logger().info("with extra", extra={"vm": "web2"})
    assert [(getattr(r, "vm", None), getattr(r, "state", None)) for r in records] == [("web1", "o"), ("web2", None)]


def test_control_characters_in_a_message_cannot_forge_a_line():
    stream = FakeTTY()
    setup_logging(stdout=stream)
    name = "web1\n2024/05/01 12:00:00.000000 \033[92m>>>\033[0m [main-thread] VM evil: migrated\r\t\x00\x7f\x9b\u2028"
    get_logger().ok("VM %s: started", name)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].endswith(
        " [main-thread] VM web1\\n2024/05/01 12:00:00.000000 \\x1b[92m>>>\\x1b[0m [main-thread] VM evil: migrated"
        "\\r\\t\\x00\\x7f\\x9b\\u2028: started"
    ), lines[0]
    assert lines[0].count("\033") == 2  # the prompt's own colour and reset only


def test_control_characters_in_a_thread_name_are_escaped():
    stream = io.StringIO()
    setup_logging(stdout=stream)
    thread = threading.Thread(target=get_logger().info, args=("from a thread",), name="vm-web1\nforged")
    thread.start()
    thread.join()
    assert stream.getvalue().endswith(" info: [vm-web1\\nforged] from a thread\n")


def test_escape_controls_leaves_printable_text_alone():
    text = "VM 0b6c2f9e-1111: naïve ünïcode, quotes ' \" and a backslash \\ stay"
    assert escape_controls(text) == text
    assert escape_controls("a\x1bb\x85c") == "a\\x1bb\\x85c"


def test_setup_is_idempotent():
    first, second = io.StringIO(), io.StringIO()
    setup_logging(stdout=first)
    logger = setup_logging(stdout=second)
    root = logging.getLogger(ROOT_LOGGER)
    assert logger.logger is root
    marked = [h for h in root.handlers if getattr(h, daemon_log._MARK, False)]  # pylint: disable=protected-access
    assert len(marked) == 1
    logger.ok("once")
    assert first.getvalue() == ""
    assert second.getvalue().count("once") == 1
    assert root.propagate is False


def test_no_sink_writes_nothing(capsys):
    logger = setup_logging(stdout=False)
    logger.error("nowhere")
    captured = capsys.readouterr()
    assert "nowhere" not in captured.err and "nowhere" not in captured.out


def test_stdout_true_uses_sys_stdout(capsys):
    setup_logging(stdout=True)
    get_logger().ok("to stdout")
    assert " ok: [main-thread] to stdout" in capsys.readouterr().out


def test_file_sink_is_plain_and_reopened_after_rotation_without_a_signal(tmp_path):
    path = tmp_path / "logs" / "node-daemon.log"  # the directory is created
    tty = FakeTTY()
    setup_logging(stdout=tty, file=str(path))
    logger = get_logger("rot")
    logger.ok("before rotation")
    rotated = tmp_path / "logs" / "node-daemon.log.1"
    path.rename(rotated)
    logger.ok("after rotation")  # the file by its name is gone: the handler opens a new one
    old, new = rotated.read_text(), path.read_text()
    assert "before rotation" in old and "after rotation" not in old
    assert "before rotation" not in new
    assert re.fullmatch(TIMESTAMP + r" ok: \[main-thread\] after rotation\n", new)
    assert "\033" not in old + new  # a file is not a terminal
    assert "\033[92m>>>" in tty.getvalue()


def test_log_files_are_0640_whatever_the_umask(tmp_path):
    """The log names VMs, nodes and libvirt's errors: root and the adm group only."""
    path = tmp_path / "node-daemon.log"
    old = os.umask(0)
    try:
        setup_logging(stdout=False, file=str(path))
        get_logger("perm").ok("created")
        assert path.stat().st_mode & 0o777 == 0o640
        # a file made wider meanwhile (by a rotation) is narrowed when it is opened
        path.rename(tmp_path / "node-daemon.log.1")
        path.write_text("")
        path.chmod(0o666)
        get_logger("perm").ok("reopened")
        assert path.stat().st_mode & 0o777 == 0o640
        assert "reopened" in path.read_text()
    finally:
        os.umask(old)


def test_rotations_during_writes_lose_and_break_no_line(tmp_path):
    path = tmp_path / "pvc.log"
    setup_logging(stdout=False, file=path)
    logger = get_logger()
    stop = threading.Event()
    written = [0, 0, 0]

    def writer(n):
        while not stop.is_set():
            logger.info("w%d-%d", n, written[n])
            written[n] += 1

    threads = [threading.Thread(target=writer, args=(n,), name=f"w{n}") for n in range(3)]
    for thread in threads:
        thread.start()
    try:
        for generation in range(20):
            # The writers make the file again at their next line: a file gives no event, so poll.
            deadline = time.monotonic() + 30
            while not path.exists():
                assert time.monotonic() < deadline, "no writer made the log file again"
                time.sleep(0.001)
            path.rename(tmp_path / f"pvc.log.{generation}")
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    logger.info("final")
    assert path.read_text().endswith("final\n")
    seen = []
    for file in tmp_path.iterdir():
        for line in file.read_text().splitlines():
            match = re.fullmatch(TIMESTAMP + r" info: \[(w\d|main-thread)\] (w\d-\d+|final)", line)
            assert match, line
            seen.append(match.group(2))
    assert sorted(seen) == sorted([f"w{n}-{i}" for n in range(3) for i in range(written[n])] + ["final"])


def test_reset_restores_propagation():
    setup_logging(stdout=io.StringIO())
    reset_logging()
    logger = logging.getLogger(ROOT_LOGGER)
    assert logger.propagate is True and logger.level == logging.NOTSET
    assert not [h for h in logger.handlers if getattr(h, daemon_log._MARK, False)]  # pylint: disable=protected-access


def test_every_daemon_module_gets_its_logger_from_get_logger():
    # ok/system/tick exist only on the adapter: a module whose log is a plain logging.Logger would
    # fail at its first log.ok(...), perhaps on a path no other test takes.
    package = Path(daemon_log.__file__).parent
    wrong = []
    for source in sorted(package.glob("*.py")):
        for node in ast.parse(source.read_text()).body:
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "log" for t in node.targets):
                call = node.value
                if not (
                    isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "get_logger"
                ):
                    wrong.append(f"{source.name}:{node.lineno}")
    assert not wrong, f"module loggers not made by log.get_logger(__name__): {wrong}"
