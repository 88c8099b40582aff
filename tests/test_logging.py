"""configure_logging: the sink, stdlib routing, the service tag, JSON lines, journald priorities."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator

import pytest
from loguru import logger

import hostkit._logging
from hostkit import BackgroundService, CancellationToken, HostBuilder, HostedService, HostOptions, configure_logging
from hostkit.exceptions import ConfigurationError, ConfigurationTypeError
from tests.conftest import PROJECT_ROOT


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
        """Importing hostkit adds no sink: a fresh interpreter running a host with embedded logging off
        prints nothing."""
        code = (
            "import hostkit\n"
            "from loguru import logger\n"
            "class S(hostkit.HostedService):\n"
            "    pass\n"
            "b = hostkit.HostBuilder(options=hostkit.HostOptions(embedded_logging=False))\n"
            "b.services.add_hosted_service(S)\n"
            "with b.build():\n"
            "    pass\n"
            "assert repr(logger) == '<loguru.logger handlers=[(id=0, level=10, sink=<stderr>)]>', repr(logger)\n"
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


def fresh(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter: loguru and stdlib logging as a new process has them."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": PROJECT_ROOT, **env},
    )


EMBEDDED_HOST = """
import logging, sys, threading
from loguru import logger
from hostkit import ApplicationLifetime, BackgroundService, HostBuilder, HostOptions

class Failing(BackgroundService):
    def __init__(self, lifetime: ApplicationLifetime):
        self.lifetime = lifetime

    def execute(self, stopping):
        self.lifetime.started.wait(10)  # fail once the start is over (and logged)
        logger.info("the service's own loguru line")
        raise RuntimeError("boom in a background service")

class Waiting(BackgroundService):
    def execute(self, stopping):
        stopping.wait()

def make_host(service=Failing, **options):
    builder = HostBuilder(options=HostOptions(shutdown_timeout=5, **options))
    builder.add_hosted_service(service)
    return builder.build()

def hostkit_line(text):
    # A line logged from inside the hostkit package, as hostkit's own modules log.
    exec("logger.warning(text)", {"__name__": "hostkit.somewhere", "logger": logger, "text": text})
"""

STDERR_LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} \| (?P<level>\w+) *\| hostkit \| (?P<service>\S+) \| (?P<pid>\d+) \| "
    r"(?P<msg>.*)$"
)


class TestEmbeddedHost:
    """A host started without run() logs into the application's logging, or to stderr."""

    def test_with_host_and_no_logging_configured_prints_to_stderr(self) -> None:
        """No stdlib handler, loguru untouched: `with host:` prints its start, the failure with its traceback
        and its stop on stderr, once each, INFO and up; after the host, hostkit is quiet again."""
        out = fresh(
            EMBEDDED_HOST
            + """
with make_host() as host:
    assert host.lifetime.stopping.wait(10)
hostkit_line("after the host: not shown")
print(repr(logger))
"""
        )
        assert out.returncode == 0, out.stderr
        parsed = [m for m in map(STDERR_LINE.match, out.stderr.splitlines()) if m]
        messages = [m["msg"] for m in parsed]
        assert messages[0].startswith("Host starting 1 service(s)")
        assert sum(m.startswith("Host started in") for m in messages) == 1
        (failure,) = [m for m in parsed if "failed: RuntimeError: boom in a background service" in m["msg"]]
        assert failure["level"] == "CRITICAL" and failure["service"] == "Failing"
        assert out.stderr.count("Traceback (most recent call last)") == 1
        assert messages[-1].startswith("Host stopped in") and messages[-1].endswith("(exit code 1)")
        assert {m["pid"] for m in parsed} == {str(parsed[0]["pid"])}
        assert all(m["level"] != "DEBUG" for m in parsed)
        # The service's own loguru line still goes to loguru's default sink, as before.
        assert out.stderr.count("the service's own loguru line") == 1
        assert "after the host" not in out.stderr
        assert out.stdout.count("(id=") == 1  # loguru's default sink (a stand-in): the route is gone

    def test_the_applications_stdlib_configuration_applies(self) -> None:
        """With the "hostkit" logger at WARNING in the app's config, the start and stop lines are dropped,
        the failure is kept: stdlib decides, and nothing goes to stderr besides."""
        out = fresh(
            EMBEDDED_HOST
            + """
seen = []
class Keep(logging.Handler):
    def emit(self, record):
        seen.append((record.name, record.levelname, record.getMessage().splitlines()[0]))
logging.getLogger().addHandler(Keep())
logging.getLogger("hostkit").setLevel(logging.WARNING)
with make_host() as host:
    assert host.lifetime.stopping.wait(10)
for item in seen:
    print(*item, sep="|")
"""
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.splitlines() == [
            "hostkit|CRITICAL|Background service 'Failing' failed: RuntimeError: boom in a background service",
            "hostkit|ERROR|Stopping the host because background service 'Failing' failed "
            "(on_background_error='stop_host'); exit code 1",
        ]
        assert "hostkit" not in out.stderr and "Host st" not in out.stderr

    def test_an_app_routing_stdlib_into_loguru_sees_each_line_once(self) -> None:
        """An app that sends stdlib records into loguru (InterceptHandler) and keeps loguru's default sink:
        hostkit's lines come back from stdlib and are printed once, with no loop."""
        out = fresh(
            EMBEDDED_HOST
            + """
class Intercept(logging.Handler):  # loguru's recipe for sending stdlib records into loguru
    def emit(self, record):
        frame, depth = sys._getframe(), 0
        while frame and (depth == 0 or frame.f_code.co_filename == logging.__file__):
            frame, depth = frame.f_back, depth + 1
        logger.opt(depth=depth, exception=record.exc_info).log(record.levelname, record.getMessage())
logging.basicConfig(handlers=[Intercept()], level=0, force=True)
with make_host() as host:
    assert host.lifetime.stopping.wait(10)
"""
        )
        assert out.returncode == 0, out.stderr
        assert out.stderr.count("Host started in") == 1
        assert out.stderr.count("failed: RuntimeError: boom in a background service") == 1
        assert out.stderr.count("Host stopped in") == 1

    def test_hosts_one_after_another_and_overlapping_share_one_route(self) -> None:
        """Two hosts at once log through one route, which closes when the last stops; a later host opens it
        again. loguru ends with one sink, as it began."""
        out = fresh(
            EMBEDDED_HOST
            + """
first, second = make_host(Waiting), make_host(Waiting)
first.start()
second.start()
first.stop()
hostkit_line("while the second runs: shown")
second.stop()
hostkit_line("between the hosts: not shown")
with make_host(Waiting):
    hostkit_line("in the third: shown")
print(repr(logger))
"""
        )
        assert out.returncode == 0, out.stderr
        assert out.stderr.count("Host started in") == 3
        assert out.stderr.count("Host stopped in") == 3
        assert out.stderr.count("while the second runs: shown") == 1
        assert out.stderr.count("in the third: shown") == 1
        assert "between the hosts" not in out.stderr
        assert out.stdout.count("(id=") == 1

    def test_host_run_is_not_embedded(self) -> None:
        """run() with configure_logging=False leaves logging to the application: no route is opened."""
        out = fresh(
            EMBEDDED_HOST
            + """
make_host(configure_logging=False).run()
print(repr(logger))
"""
        )
        assert out.returncode == 0, out.stderr
        assert "Host st" not in out.stderr
        assert out.stdout.strip() == "<loguru.logger handlers=[(id=0, level=10, sink=<stderr>)]>"

    def test_option_must_be_a_bool(self) -> None:
        with pytest.raises(ConfigurationTypeError, match=r"HostOptions.embedded_logging must be True or False"):
            HostOptions(embedded_logging="yes")  # type: ignore[arg-type]
