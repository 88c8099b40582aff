"""Failures: stop_host vs ignore, exit codes, every ending logged, the traceback in the snapshot."""

from __future__ import annotations

import threading

import pytest

from hostkit import (
    BackgroundService,
    CancellationToken,
    ExitCode,
    HostBuilder,
    HostedService,
    HostOptions,
    HostState,
    RestartPolicy,
    ServiceState,
)
from hostkit.exceptions import NotBuiltError
from tests.conftest import wait_until


def build(*services: HostedService, restart: RestartPolicy | None = None, **options: object):  # type: ignore[no-untyped-def]
    builder = HostBuilder(options=HostOptions(**{"shutdown_timeout": 10.0, **options}))  # type: ignore[arg-type]
    for i, service in enumerate(services):
        kwargs = {"restart": restart} if isinstance(service, BackgroundService) and restart is not None else {}
        builder.services.add_hosted_service(service, name=f"s{i}", **kwargs)
    return builder.build()


def parse_config(path: str) -> None:
    """A distinctive frame for tracebacks."""
    raise ValueError(f"bad config in {path}")


class Crasher(BackgroundService):
    """Raises once ``go`` is set (or at once)."""

    def __init__(self, go: threading.Event | None = None) -> None:
        self.go = go
        self.runs = 0

    def execute(self, stopping: CancellationToken) -> None:
        self.runs += 1
        if self.go is not None:
            self.go.wait(10)
        parse_config("/etc/app.toml")


class Waiter(BackgroundService):
    def __init__(self) -> None:
        self.running = threading.Event()
        self.ended = threading.Event()

    def execute(self, stopping: CancellationToken) -> None:
        self.running.set()
        stopping.wait()
        self.ended.set()


class RequestStop(BackgroundService):
    """Asks the host to stop once it has started."""

    def __init__(self, lifetime_getter) -> None:  # type: ignore[no-untyped-def]
        self.get = lifetime_getter

    def execute(self, stopping: CancellationToken) -> None:
        lifetime = self.get()
        assert lifetime.started.wait(10)
        lifetime.stop_application()
        stopping.wait()


class TestStopHost:
    def test_failure_stops_the_host_with_a_non_zero_exit_code(self, logs) -> None:
        """Under on_background_error='stop_host' a crash stops everything and run() returns 1."""
        waiter = Waiter()
        go = threading.Event()
        host = build(Crasher(go), waiter)
        host.lifetime.started.register(go.set)  # crash once everything runs
        code = host.run()
        assert code == ExitCode.SERVICE_FAILED == 1
        assert host.state is HostState.STOPPED
        assert waiter.ended.is_set()
        status = host.status()
        assert status.exit_code == 1
        assert status["s0"].state is ServiceState.FAULTED
        assert status["s1"].state is ServiceState.STOPPED
        assert logs.find("Stopping the host because background service 's0' failed (on_background_error='stop_host')")

    def test_crash_during_stop_still_gives_a_non_zero_exit_code(self, logs) -> None:
        """A service that crashes while winding down is a failure too: exit code 1, not 0."""

        class CrashOnStop(BackgroundService):
            def execute(self, stopping: CancellationToken) -> None:
                stopping.wait()
                raise BrokenPipeError("lost the connection while flushing")

        host = build(CrashOnStop())
        host.start()
        host.stop()
        assert host.exit_code == 1
        assert host.status()["s0"].state is ServiceState.FAULTED
        assert logs.find("Background service 's0' failed while the host was stopping; exit code 1", "ERROR")


class TestIgnore:
    def test_failure_is_marked_faulted_and_the_rest_runs_on(self, logs) -> None:
        """Under on_background_error='ignore' the crashed service is FAULTED; the host and others keep running."""
        go = threading.Event()
        waiter = Waiter()
        host = build(Crasher(go), waiter, on_background_error="ignore")
        with host:
            assert waiter.running.wait(10)
            go.set()
            assert wait_until(lambda: host.status()["s0"].state is ServiceState.FAULTED)
            assert host.state is HostState.RUNNING
            assert not host.lifetime.stopping.is_set()
            assert host.status()["s1"].state is ServiceState.RUNNING
            assert wait_until(lambda: logs.find("Background service 's0' is faulted; the host runs on", "WARNING"))
        assert host.exit_code == 0


class TestExitCodes:
    def test_requested_stop_returns_zero(self) -> None:
        """run() returns 0 after a stop_application() request."""
        host = build(RequestStop(lambda: host.lifetime))
        assert host.run() == ExitCode.OK == 0

    def test_failed_start_returns_three_and_logs_it(self, logs) -> None:
        """run() returns 3 when a start() raised, instead of raising, and logs the failure."""

        class Broken(HostedService):
            def start(self, token: CancellationToken) -> None:
                parse_config("/etc/x")

        host = build(Broken())
        assert host.run() == ExitCode.START_FAILED == 3
        assert logs.find("Hosted service 's0' failed to start: ValueError: bad config in /etc/x", "CRITICAL")

    def test_run_off_the_main_thread_returns_the_exit_code(self) -> None:
        """run() in a worker thread works without signal handlers and returns the same codes."""
        host = build(Crasher())
        result: list[int] = []
        thread = threading.Thread(target=lambda: result.append(host.run()))
        thread.start()
        thread.join(20)
        assert result == [1]


class TestRestartPolicy:
    def test_restarts_are_tried_before_the_failure_counts(self, logs) -> None:
        """With a restart policy the service is rerun N times; after that it is FAULTED and the host stops."""
        crasher = Crasher()
        policy = RestartPolicy(max_restarts=2, window=60, backoff=0.01, backoff_max=0.02, jitter=0)
        host = build(crasher, restart=policy)
        assert host.run() == 1
        assert crasher.runs == 3
        status = host.status()["s0"]
        assert status.state is ServiceState.FAULTED
        assert status.restarts == 2
        assert len(logs.find("Background service 's0' failed; restarting it in")) == 2

    def test_a_restart_that_succeeds_keeps_the_host_running(self) -> None:
        """A service that fails once then runs is RUNNING again with restarts=1; the host stays up."""
        running = threading.Event()

        class Flaky(BackgroundService):
            runs = 0

            def execute(self, stopping: CancellationToken) -> None:
                Flaky.runs += 1
                if Flaky.runs == 1:
                    raise TimeoutError("first connect timed out")
                running.set()
                stopping.wait()

        policy = RestartPolicy(max_restarts=3, backoff=0.01, jitter=0)
        host = build(Flaky(), restart=policy)
        with host:
            assert running.wait(10)
            status = host.status()["s0"]
            assert status.state is ServiceState.RUNNING
            assert status.restarts == 1
            assert status.error == "TimeoutError: first connect timed out"
        assert host.exit_code == 0
        assert host.status()["s0"].state is ServiceState.STOPPED


class TestEveryEndingLogged:
    def test_each_kind_of_ending_is_logged_with_the_service_name(self, logs) -> None:
        """Completed, stopped, failed and abandoned endings each leave a log line tagged with the service."""
        release = threading.Event()

        class Completes(BackgroundService):
            def execute(self, stopping: CancellationToken) -> None:
                return None

        class Stubborn(BackgroundService):
            def execute(self, stopping: CancellationToken) -> None:
                release.wait(30)

        go = threading.Event()
        host = build(
            Completes(),
            Waiter(),
            Crasher(go),
            Stubborn(),
            HostedService(),
            on_background_error="ignore",
            shutdown_timeout=1.0,
        )
        try:
            host.start()
            assert wait_until(lambda: host.status()["s0"].state is ServiceState.COMPLETED)
            go.set()
            assert wait_until(lambda: host.status()["s2"].state is ServiceState.FAULTED)
            host.stop()
        finally:
            release.set()
        expected = {
            "s0": ("Background service 's0' completed", "INFO"),
            "s1": ("Background service 's1' stopped", "INFO"),
            "s2": ("Background service 's2' failed: ValueError: bad config in /etc/app.toml", "CRITICAL"),
            "s3": ("Background service 's3' did not stop within the shutdown budget", "ERROR"),
            "s4": ("Hosted service 's4' stopped", "INFO"),
        }
        for name, (needle, level) in expected.items():
            records = logs.find(needle, level)
            assert records, f"no {level} line {needle!r}"
            assert records[0]["service"] == name
        states = {s.name: s.state for s in host.status().services}
        assert states == {
            "s0": ServiceState.COMPLETED,
            "s1": ServiceState.STOPPED,
            "s2": ServiceState.FAULTED,
            "s3": ServiceState.TIMED_OUT,
            "s4": ServiceState.STOPPED,
        }

    def test_host_lifecycle_lines_are_logged(self, logs) -> None:
        """Start, stop and the exit code appear at INFO, tagged service='host'."""
        host = build(Waiter())
        with host:
            pass
        for needle in ("Host starting 1 service(s)", "Host started in", "Host stopping 1 service(s)", "(exit code 0)"):
            records = logs.find(needle, "INFO")
            assert records, needle
            assert records[0]["service"] == "host"


class TestTracebackInSnapshot:
    def test_failure_traceback_text_is_in_the_snapshot(self) -> None:
        """The snapshot of a faulted service carries 'Type: message' and the traceback text with the failing frame."""
        host = build(Crasher(), on_background_error="ignore")
        with host:
            assert wait_until(lambda: host.status()["s0"].state is ServiceState.FAULTED)
            status = host.status()["s0"]
        assert status.error == "ValueError: bad config in /etc/app.toml"
        assert status.traceback is not None
        assert status.traceback.startswith("Traceback (most recent call last):")
        assert "in parse_config" in status.traceback
        assert status.traceback.rstrip().endswith("ValueError: bad config in /etc/app.toml")
        assert status.stopped_at is not None
        assert status.to_dict()["traceback"] == status.traceback

    def test_chained_cause_is_in_the_traceback(self) -> None:
        """An exception raised 'from' another keeps the cause in the snapshot's traceback."""

        class Chained(BackgroundService):
            def execute(self, stopping: CancellationToken) -> None:
                try:
                    parse_config("/a")
                except ValueError as err:
                    raise RuntimeError("could not load settings") from err

        host = build(Chained(), on_background_error="ignore")
        with host:
            assert wait_until(lambda: host.status()["s0"].state is ServiceState.FAULTED)
        text = host.status()["s0"].traceback or ""
        assert "ValueError: bad config in /a" in text
        assert "The above exception was the direct cause" in text
        assert host.status()["s0"].error == "RuntimeError: could not load settings"


class TestBuilderIsNotAHost:
    """The first mistake of many: using the builder where the host belongs."""

    @pytest.mark.parametrize("method", ["run", "start", "stop", "status"])
    def test_host_method_on_the_builder_says_call_build_first(self, method: str) -> None:
        """builder.run() (and start/stop/status) names the fix, and is still an AttributeError."""
        builder = HostBuilder()
        with pytest.raises(AttributeError) as info:
            getattr(builder, method)()
        assert isinstance(info.value, NotBuiltError)
        assert str(info.value) == (
            f"HostBuilder has no {method}(); call builder.build() first to get a Host, then host.{method}() "
            f"(the builder only collects services and options)"
        )
        assert not hasattr(builder, method)

    def test_with_builder_says_call_build_first(self) -> None:
        """`with builder:` is a TypeError, as Python's own, with the fix in it; nothing starts."""
        builder = HostBuilder()
        builder.services.add_hosted_service(Waiter())
        with pytest.raises(TypeError, match=r"call builder.build\(\) first to get a Host, then `with host:`") as info:
            with builder:  # type: ignore[attr-defined]
                pytest.fail("the body must not run")
        assert isinstance(info.value, NotBuiltError)
        # The builder is unharmed: building and running it afterwards works.
        host = builder.build()
        with host:
            assert host.state is HostState.RUNNING

    def test_other_missing_attributes_stay_plain(self) -> None:
        """A typo that is not a Host name is an ordinary AttributeError, naming the attribute."""
        with pytest.raises(AttributeError, match="'HostBuilder' object has no attribute 'sevices'") as info:
            HostBuilder().sevices
        assert not isinstance(info.value, NotBuiltError)
