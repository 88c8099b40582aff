"""The stop: one shared budget, every service attempted, the stuck ones named with their stack."""

from __future__ import annotations

import threading
import time

import pytest

from hostkit import BackgroundService, CancellationToken, HostBuilder, HostedService, HostOptions, ServiceState
from hostkit.exceptions import ConfigurationError, ConfigurationTypeError


def build(*services: HostedService, shutdown_timeout: float = 10.0):  # type: ignore[no-untyped-def]
    builder = HostBuilder(options=HostOptions(shutdown_timeout=shutdown_timeout))
    for i, service in enumerate(services):
        builder.services.add_hosted_service(service, name=f"s{i}")
    return builder.build()


class SlowToWindDown(BackgroundService):
    """Needs ``linger`` seconds after its token is set; records when it was told and when it ended."""

    def __init__(self, linger: float) -> None:
        self.linger = linger
        self.running = threading.Event()
        self.told_at: float | None = None
        self.ended_at: float | None = None

    def execute(self, stopping: CancellationToken) -> None:
        self.running.set()
        stopping.wait()
        self.told_at = time.monotonic()
        time.sleep(self.linger)  # the wind-down work itself (flush, close), not a synchronisation
        self.ended_at = time.monotonic()


def hung_in_flush(release: threading.Event) -> None:
    """A distinctive frame for the stack in the log: non-cooperative work."""
    release.wait(30)


class Stubborn(BackgroundService):
    """Ignores its token: only ``release`` ends it."""

    def __init__(self, release: threading.Event) -> None:
        self.release = release
        self.running = threading.Event()

    def execute(self, stopping: CancellationToken) -> None:
        self.running.set()
        hung_in_flush(self.release)


class TestSharedBudget:
    def test_slow_services_wind_down_in_parallel(self) -> None:
        """Every background service is told to stop before the host waits for any: their wind-downs overlap."""
        services = [SlowToWindDown(1.0) for _ in range(3)]
        host = build(*services)
        host.start()
        for service in services:
            assert service.running.wait(10)
        began = time.monotonic()
        host.stop()
        elapsed = time.monotonic() - began
        told = [s.told_at for s in services]
        ended = [s.ended_at for s in services]
        assert None not in told and None not in ended
        # The last one told to stop was told before the first one finished winding down.
        assert max(told) < min(ended)  # type: ignore[type-var]
        # Loose check only (not a speed target): three 1 s wind-downs in sequence would take 3 s or more.
        assert elapsed < 2.9
        assert all(host.status()[f"s{i}"].state is ServiceState.STOPPED for i in range(3))

    def test_slow_hosted_stop_eats_into_the_budget_of_the_next(self) -> None:
        """A stop() that uses the whole budget leaves the next stop() a cancelled token, not a fresh budget."""
        tokens: dict[str, bool] = {}

        class Cooperative(HostedService):
            def stop(self, token: CancellationToken) -> None:
                tokens["first_waited"] = token.wait(30)  # waits until the shared budget runs out

        class Next(HostedService):
            def stop(self, token: CancellationToken) -> None:
                tokens["next_saw_cancelled"] = token.is_set()

        host = build(Next(), Cooperative(), shutdown_timeout=1.0)
        host.start()
        began = time.monotonic()
        host.stop()
        elapsed = time.monotonic() - began
        assert tokens == {"first_waited": True, "next_saw_cancelled": True}
        assert elapsed < 1.0 + 3.0  # budget plus a generous margin for a loaded machine, never 2 budgets

    def test_stop_timeout_argument_overrides_the_option(self) -> None:
        """host.stop(timeout=...) uses that budget instead of HostOptions.shutdown_timeout."""
        seen: list[bool] = []

        class Cooperative(HostedService):
            def stop(self, token: CancellationToken) -> None:
                seen.append(token.wait(30))

        host = build(Cooperative(), shutdown_timeout=60.0)
        host.start()
        began = time.monotonic()
        host.stop(timeout=1.0)
        assert seen == [True]
        assert time.monotonic() - began < 5.0

    @pytest.mark.parametrize(
        ("timeout", "error", "message"),
        [
            (-1, ConfigurationError, r"Host.stop\(timeout=...\) must be >= 0 seconds, not: -1 \(int\)"),
            (
                "5",
                ConfigurationTypeError,
                r"Host.stop\(timeout=...\) must be a number of seconds or a timedelta, not: '5'",
            ),
        ],
    )
    def test_bad_stop_timeout_is_refused_before_stopping(self, timeout: object, error: type, message: str) -> None:
        """A bad stop(timeout=...) fails at once and leaves the host running."""
        host = build(HostedService())
        host.start()
        with pytest.raises(error, match=message):
            host.stop(timeout=timeout)  # type: ignore[arg-type]
        assert host.state.value == "running"
        host.stop()


class TestStuckServices:
    def test_stubborn_thread_is_named_with_its_stack_at_the_deadline(self, logs) -> None:
        """A background service ignoring its token is logged at the deadline with where it is stuck, then abandoned."""
        release = threading.Event()
        stubborn = Stubborn(release)
        host = build(stubborn, shutdown_timeout=1.0)
        try:
            host.start()
            assert stubborn.running.wait(10)
            began = time.monotonic()
            host.stop()
            elapsed = time.monotonic() - began
            assert 0.5 < elapsed < 1.0 + 3.0
            records = logs.find("Background service 's0' did not stop within the shutdown budget (1.0 s)", "ERROR")
            assert len(records) == 1
            message = records[0]["message"]
            assert "its thread was abandoned" in message
            assert "hung_in_flush" in message  # the stack shows the stuck frame
            assert "thread hostkit-s0 is at:" in message
            status = host.status()["s0"]
            assert status.state is ServiceState.TIMED_OUT
            assert "shutdown budget" in (status.detail or "")
            assert host.lifetime.stopped.is_set()
        finally:
            release.set()

    def test_every_stuck_service_is_named(self, logs) -> None:
        """Two services stuck at the deadline are each named with their own stack; the budget is not doubled."""
        release = threading.Event()
        a, b = Stubborn(release), Stubborn(release)
        host = build(a, b, shutdown_timeout=1.0)
        try:
            host.start()
            assert a.running.wait(10) and b.running.wait(10)
            began = time.monotonic()
            host.stop()
            elapsed = time.monotonic() - began
        finally:
            release.set()
        for name in ("s0", "s1"):
            records = logs.find(f"Background service {name!r} did not stop within the shutdown budget", "ERROR")
            assert len(records) == 1
            assert records[0]["service"] == name
            assert "hung_in_flush" in records[0]["message"]
        assert elapsed < 1.0 + 3.0

    def test_abandoned_thread_that_ends_later_stays_timed_out(self, logs) -> None:
        """A service that ends after the deadline keeps TIMED_OUT in the snapshot: it did miss the deadline."""
        release = threading.Event()
        stubborn = Stubborn(release)
        host = build(stubborn, shutdown_timeout=0.5)
        host.start()
        assert stubborn.running.wait(10)
        host.stop()
        release.set()
        runner = host.service_records()[0].runner
        assert runner is not None
        assert runner.ended.wait(10)
        assert host.status()["s0"].state is ServiceState.TIMED_OUT

    def test_hung_stop_does_not_keep_the_others_from_being_attempted(self, logs) -> None:
        """A user stop() that never returns is left behind at the deadline; earlier-registered services still stop."""
        release = threading.Event()
        stopped: list[str] = []

        class HungStop(HostedService):
            def stop(self, token: CancellationToken) -> None:
                hung_in_flush(release)

        class Fine(HostedService):
            def stop(self, token: CancellationToken) -> None:
                stopped.append("fine")

        loop_release = threading.Event()
        loop = SlowToWindDown(0.0)
        host = build(Fine(), loop, HungStop(), shutdown_timeout=1.0)
        try:
            host.start()
            assert loop.running.wait(10)
            began = time.monotonic()
            host.stop()
            elapsed = time.monotonic() - began
            assert stopped == ["fine"]
            assert elapsed < 1.0 + 3.0
            records = logs.find("Hosted service 's2': stop() did not return within the shutdown budget", "ERROR")
            assert len(records) == 1
            assert "hung_in_flush" in records[0]["message"]
            status = host.status()
            assert status["s2"].state is ServiceState.TIMED_OUT
            assert status["s1"].state is ServiceState.STOPPED
            assert status["s0"].state is ServiceState.STOPPED
        finally:
            release.set()
            loop_release.set()

    def test_raising_stop_is_logged_and_the_rest_still_stop(self, logs) -> None:
        """A stop() that raises is logged with its traceback and service name; the others are still stopped."""
        stopped: list[str] = []

        class Raises(HostedService):
            def stop(self, token: CancellationToken) -> None:
                raise OSError("socket already closed")

        class Fine(HostedService):
            def stop(self, token: CancellationToken) -> None:
                stopped.append("fine")

        host = build(Fine(), Raises())
        host.start()
        host.stop()
        assert stopped == ["fine"]
        records = logs.find("Hosted service 's1': stop() raised; the other services still stop", "WARNING")
        assert len(records) == 1
        assert "OSError: socket already closed" in records[0]["message"]
        status = host.status()["s1"]
        assert status.state is ServiceState.FAULTED
        assert status.error == "OSError: socket already closed"
        assert "Traceback" in (status.traceback or "")

    def test_hung_stopping_hook_is_left_behind(self, logs) -> None:
        """A stopping() hook that hangs is left at the deadline; stop() and stopped() of others still run."""
        release = threading.Event()
        calls: list[str] = []

        class HungHook(HostedService):
            def stopping(self, token: CancellationToken) -> None:
                hung_in_flush(release)

        class Fine(HostedService):
            def stop(self, token: CancellationToken) -> None:
                calls.append("stop")

            def stopped(self, token: CancellationToken) -> None:
                calls.append("stopped")

        host = build(Fine(), HungHook(), shutdown_timeout=1.0)
        try:
            host.start()
            host.stop()
            assert calls == ["stop", "stopped"]
            assert logs.find("Hosted service 's1': stopping() did not return within the shutdown budget")
        finally:
            release.set()
