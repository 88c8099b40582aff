"""configure_logging: the sink, stdlib routing, the service tag, JSON lines, journald priorities."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest
from loguru import logger

import hostkit._logging
from hostkit import BackgroundService, CancellationToken, HostBuilder, HostedService, HostOptions, configure_logging
from hostkit.exceptions import ConfigurationError, ConfigurationTypeError


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Undo everything configure_logging() changes: its sinks, loguru's default sink, stdlib root."""
    root = logging.getLogger()
    root_level, root_handlers = root.level, list(root.handlers)
    had_default = 0 in logger._core.handlers  # type: ignore[attr-defined]
    try:
        yield
    finally:
        for handler_id in hostkit._logging._handler_ids:
            try:
                logger.remove(handler_id)
            except ValueError:
                pass
        hostkit._logging._handler_ids.clear()
        if had_default and 0 not in logger._core.handlers:  # type: ignore[attr-defined]
            logger.add(sys.stderr)
        root.handlers[:] = root_handlers
        root.setLevel(root_level)
        logger.disable("hostkit")


LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} \| (?P<level>\w+) *\| (?P<service>\S+) \| (?P<pid>\d+) \| (?P<msg>.*)$"
)


def lines(stream: io.StringIO) -> list[str]:
    return [line for line in stream.getvalue().splitlines() if line.strip()]


class Chatty(BackgroundService):
    """Logs through loguru and through stdlib logging from its own thread, then waits."""

    def __init__(self) -> None:
        self.logged = threading.Event()

    def execute(self, stopping: CancellationToken) -> None:
        logger.info("hello from loguru")
        logging.getLogger("thirdparty.client").warning("hello from stdlib")
        self.logged.set()
        stopping.wait()


def run_chatty(name: str = "chatty") -> None:
    chatty = Chatty()
    builder = HostBuilder(options=HostOptions(shutdown_timeout=5))
    builder.services.add_hosted_service(chatty, name=name)
    with builder.build():
        assert chatty.logged.wait(10)


@pytest.mark.usefixtures("restore_logging")
class TestSink:
    def test_text_lines_carry_level_service_and_pid(self) -> None:
        """Each text line has time, level, service name, pid and message."""
        stream = io.StringIO()
        ids = configure_logging(sink=stream)
        assert len(ids) == 1
        run_chatty()
        parsed = [m.groupdict() for m in map(LINE.match, lines(stream)) if m]
        assert len(parsed) == len(lines(stream)), stream.getvalue()
        mine = [p for p in parsed if p["msg"] == "hello from loguru"]
        assert mine == [{"level": "INFO", "service": "chatty", "pid": str(os.getpid()), "msg": "hello from loguru"}]
        assert any(p["service"] == "host" and p["msg"].startswith("Host started") for p in parsed)

    def test_level_filters(self) -> None:
        """Lines below the level are not written."""
        stream = io.StringIO()
        configure_logging("WARNING", sink=stream)
        run_chatty()
        text = stream.getvalue()
        assert "hello from stdlib" in text
        assert "hello from loguru" not in text
        assert "Host started" not in text

    def test_calling_again_replaces_the_sink(self) -> None:
        """A second configure_logging() replaces hostkit's sink instead of adding another one."""
        first, second = io.StringIO(), io.StringIO()
        configure_logging(sink=first)
        configure_logging(sink=second)
        logger.bind(service="t").info("once")
        assert "once" not in first.getvalue()
        assert second.getvalue().count("once") == 1

    def test_logging_is_off_until_configured(self) -> None:
        """Importing hostkit adds no sink: a fresh interpreter running a host prints nothing."""
        code = (
            "import hostkit\n"
            "class S(hostkit.HostedService):\n"
            "    pass\n"
            "b = hostkit.HostBuilder()\n"
            "b.services.add_hosted_service(S)\n"
            "with b.build():\n"
            "    pass\n"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
        assert out.stdout == "" and out.stderr == ""

    def test_bad_level_is_refused_before_changing_anything(self) -> None:
        """An unknown level name fails with the known names, and the previous sink keeps working."""
        stream = io.StringIO()
        configure_logging(sink=stream)
        with pytest.raises(ConfigurationError, match="unknown level name 'VERBOSE'; use one of TRACE, DEBUG, INFO"):
            configure_logging("VERBOSE", sink=io.StringIO())
        with pytest.raises(
            ConfigurationTypeError, match=r"must be a level name like 'INFO' or a number, not: 2.5 \(float\)"
        ):
            configure_logging(2.5)  # type: ignore[arg-type]
        logger.bind(service="t").info("still here")
        assert "still here" in stream.getvalue()

    def test_trace_level_reaches_stdlib_too(self) -> None:
        """TRACE (a loguru-only level) configures stdlib's root level without error."""
        stream = io.StringIO()
        configure_logging("TRACE", sink=stream)
        assert logging.getLogger().level == 5
        logging.getLogger("x").debug("stdlib debug")
        assert "stdlib debug" in stream.getvalue()


@pytest.mark.usefixtures("restore_logging")
class TestStdlibRouting:
    def test_stdlib_records_reach_the_sink(self) -> None:
        """A stdlib logger's record is written by the loguru sink, with its level."""
        stream = io.StringIO()
        configure_logging(sink=stream)
        logging.getLogger("somelib").error("stdlib says %s", "hi")
        (match,) = [m for m in map(LINE.match, lines(stream)) if m and m["msg"] == "stdlib says hi"]
        assert match["level"] == "ERROR"
        assert match["service"] == "-"

    def test_stdlib_routing_can_be_off(self) -> None:
        """stdlib=False leaves stdlib logging alone."""
        stream = io.StringIO()
        configure_logging(sink=stream, stdlib=False)
        logging.getLogger("somelib").error("not routed")
        assert "not routed" not in stream.getvalue()

    def test_intercept_handler_added_once(self) -> None:
        """Configuring twice does not route stdlib records twice."""
        stream = io.StringIO()
        configure_logging(sink=stream)
        configure_logging(sink=stream)
        logging.getLogger("somelib").warning("only once")
        assert stream.getvalue().count("only once") == 1


@pytest.mark.usefixtures("restore_logging")
class TestServiceTag:
    def test_records_from_the_service_thread_are_tagged(self) -> None:
        """loguru and stdlib records logged by a service's own code carry its name."""
        stream = io.StringIO()
        configure_logging(sink=stream)
        run_chatty("orders-sync")
        parsed = {m["msg"]: m for m in map(LINE.match, lines(stream)) if m}
        assert parsed["hello from loguru"]["service"] == "orders-sync"
        assert parsed["hello from stdlib"]["service"] == "orders-sync"
        assert parsed["hello from stdlib"]["level"] == "WARNING"

    def test_hosted_service_start_is_tagged(self) -> None:
        """Lines logged inside a hosted service's start() and stop() carry its name."""
        stream = io.StringIO()
        configure_logging(sink=stream)

        class Warm(HostedService):
            def start(self, token: CancellationToken) -> None:
                logging.getLogger("warm").info("warming")

            def stop(self, token: CancellationToken) -> None:
                logger.info("cooling")

        builder = HostBuilder()
        builder.services.add_hosted_service(Warm, name="cache-warm")
        with builder.build():
            pass
        parsed = {m["msg"]: m for m in map(LINE.match, lines(stream)) if m}
        assert parsed["warming"]["service"] == "cache-warm"
        assert parsed["cooling"]["service"] == "cache-warm"

    def test_tag_does_not_leak_to_other_threads(self) -> None:
        """A line logged by the test's own thread while a service runs is not tagged with the service."""
        stream = io.StringIO()
        configure_logging(sink=stream)
        chatty = Chatty()
        builder = HostBuilder()
        builder.services.add_hosted_service(chatty, name="chatty")
        with builder.build():
            assert chatty.logged.wait(10)
            logger.info("from the test thread")
        parsed = {m["msg"]: m for m in map(LINE.match, lines(stream)) if m}
        assert parsed["from the test thread"]["service"] == "-"


@pytest.mark.usefixtures("restore_logging")
class TestJson:
    def test_json_lines_with_the_service(self) -> None:
        """json=True writes one JSON object per line, with extra.service set."""
        stream = io.StringIO()
        configure_logging(sink=stream, json=True)
        run_chatty("jsonsvc")
        objects = [json.loads(line) for line in lines(stream)]
        hello = [o for o in objects if o["record"]["message"] == "hello from loguru"]
        assert len(hello) == 1
        assert hello[0]["record"]["extra"]["service"] == "jsonsvc"
        assert hello[0]["record"]["level"]["name"] == "INFO"
        assert hello[0]["record"]["process"]["id"] == os.getpid()


@pytest.mark.usefixtures("restore_logging")
class TestJournald:
    def _journal_file(self, tmp_path, monkeypatch: pytest.MonkeyPatch, *, matching: bool):  # type: ignore[no-untyped-def]
        sink = open(tmp_path / "journal.log", "w+", encoding="utf-8")
        st = os.fstat(sink.fileno())
        inode = st.st_ino if matching else st.st_ino + 1
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{inode}")
        return sink

    def test_priority_prefix_when_journal_stream_matches(self, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
        """When JOURNAL_STREAM names the sink, each line starts with its syslog priority <N> and no timestamp."""
        sink = self._journal_file(tmp_path, monkeypatch, matching=True)
        try:
            configure_logging("DEBUG", sink=sink)
            log = logger.bind(service="j")
            log.debug("d")
            log.info("i")
            log.warning("w")
            log.error("e")
            log.critical("c")
            sink.flush()
            sink.seek(0)
            got = [line.rstrip("\n") for line in sink if line.strip()]
        finally:
            sink.close()
        pid = os.getpid()
        assert got == [
            f"<7>DEBUG    | j | {pid} | d",
            f"<6>INFO     | j | {pid} | i",
            f"<4>WARNING  | j | {pid} | w",
            f"<3>ERROR    | j | {pid} | e",
            f"<2>CRITICAL | j | {pid} | c",
        ]

    def test_no_prefix_when_journal_stream_names_another_file(self, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
        """A JOURNAL_STREAM for some other stream (inherited by a child) does not switch the format."""
        sink = self._journal_file(tmp_path, monkeypatch, matching=False)
        try:
            configure_logging(sink=sink)
            logger.bind(service="j").info("plain")
            sink.flush()
            sink.seek(0)
            (line,) = [line.rstrip("\n") for line in sink if line.strip()]
        finally:
            sink.close()
        assert LINE.match(line) is not None
        assert not line.startswith("<")

    def test_journald_can_be_forced(self) -> None:
        """journald=True prefixes lines even without JOURNAL_STREAM."""
        stream = io.StringIO()
        configure_logging(sink=stream, journald=True)
        logger.bind(service="j").warning("forced")
        assert lines(stream) == [f"<4>WARNING  | j | {os.getpid()} | forced"]
