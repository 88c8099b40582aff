"""PeriodicTimer: fixed rate without drift, skipped ticks after an overrun, at once out on cancellation."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest

from hostkit import BackgroundService, CancellationToken, HostBuilder, HostOptions, PeriodicTimer
from hostkit.exceptions import ConfigurationError, ConfigurationTypeError


class FakeTime:
    """A manual clock; ``ClockToken.wait`` advances it instead of sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class ClockToken(CancellationToken):
    """A token whose wait() moves the fake clock forward: the timer's sleeps become exact and instant."""

    def __init__(self, clock: FakeTime) -> None:
        super().__init__(name="fake")
        self.clock = clock
        self.waits: list[float] = []

    def wait(self, timeout: float | None = None) -> bool:
        assert timeout is not None
        self.waits.append(timeout)
        self.clock.now += timeout
        return self.is_set()


class TestSchedule:
    def test_ticks_follow_a_fixed_rate_despite_body_time(self) -> None:
        """Ticks land at start + n * interval: the body's own time does not accumulate as drift."""
        clock = FakeTime()
        token = ClockToken(clock)
        timer = PeriodicTimer(1.0, token, clock=clock)
        start = clock.now
        tick_times = []
        for _ in timer:
            tick_times.append(clock.now - start)
            clock.now += 0.3  # the loop body takes 0.3 s
            if len(tick_times) == 5:
                break
        assert tick_times == [0.0, 1.0, 2.0, 3.0, 4.0]
        assert timer.missed == 0
        assert timer.ticks == 5

    def test_first_tick_after_one_interval_when_not_immediate(self) -> None:
        """immediate=False waits one interval before the first tick."""
        clock = FakeTime()
        timer = PeriodicTimer(2.0, ClockToken(clock), immediate=False, clock=clock)
        start = clock.now
        assert timer.wait_for_next_tick() is True
        assert clock.now - start == 2.0

    def test_overrun_skips_missed_ticks_without_a_burst(self) -> None:
        """A body that overruns several intervals gets one late tick at once, then the schedule resumes."""
        clock = FakeTime()
        token = ClockToken(clock)
        timer = PeriodicTimer(1.0, token, clock=clock)
        start = clock.now
        assert timer.wait_for_next_tick()  # t=0
        clock.now += 3.5  # overran ticks 1, 2 and 3
        assert timer.wait_for_next_tick()
        assert clock.now - start == pytest.approx(3.5)  # the late tick fires at once
        assert timer.missed == 2
        assert timer.wait_for_next_tick()
        assert clock.now - start == 4.0  # back on the original grid
        assert repr(timer) == "<PeriodicTimer interval=1.0 ticks=3 missed=2>"

    def test_small_overrun_fires_at_once_and_keeps_the_grid(self) -> None:
        """An overrun shorter than an interval fires the next tick at once, no tick skipped."""
        clock = FakeTime()
        timer = PeriodicTimer(1.0, ClockToken(clock), clock=clock)
        start = clock.now
        timer.wait_for_next_tick()
        clock.now += 1.4
        timer.wait_for_next_tick()
        assert clock.now - start == pytest.approx(1.4)
        timer.wait_for_next_tick()
        assert clock.now - start == 2.0
        assert timer.missed == 0

    def test_timedelta_interval(self) -> None:
        """The interval may be a timedelta."""
        clock = FakeTime()
        timer = PeriodicTimer(timedelta(milliseconds=250), ClockToken(clock), clock=clock)
        assert timer.interval == 0.25


class TestCancellation:
    def test_cancelled_token_ends_iteration_before_the_first_tick(self) -> None:
        """An already-cancelled token yields no tick at all."""
        token = CancellationToken()
        token.set()
        assert list(PeriodicTimer(1.0, token)) == []

    def test_cancel_wakes_a_long_wait_at_once(self) -> None:
        """Cancelling during a long interval ends the iteration promptly, not at the next tick."""
        token = CancellationToken()
        timer = PeriodicTimer(3600, token, immediate=False)
        waiting = threading.Event()
        results: list[bool] = []

        def loop() -> None:
            waiting.set()
            results.append(timer.wait_for_next_tick())

        thread = threading.Thread(target=loop)
        thread.start()
        assert waiting.wait(10)
        began = time.monotonic()
        token.set()
        thread.join(10)
        assert not thread.is_alive()
        assert results == [False]
        assert time.monotonic() - began < 5  # an hour-long interval, left within seconds
        assert timer.ticks == 0

    def test_real_time_loop_in_a_background_service(self) -> None:
        """In a service, the timer drives the loop and the host's stop ends it at once."""
        ticks: list[int] = []
        enough = threading.Event()

        class Flusher(BackgroundService):
            def execute(self, stopping: CancellationToken) -> None:
                for n in PeriodicTimer(0.02, stopping):
                    ticks.append(n)
                    if n == 3:
                        enough.set()

        builder = HostBuilder(options=HostOptions(shutdown_timeout=5))
        builder.services.add_hosted_service(Flusher)
        host = builder.build()
        with host:
            assert enough.wait(10)
        assert ticks[:3] == [1, 2, 3]
        assert host.status()["Flusher"].state.value == "stopped"


class TestValidation:
    @pytest.mark.parametrize("interval", [0, -1, float("nan")])
    def test_interval_must_be_positive(self, interval: float) -> None:
        """Zero, negative and NaN intervals are refused, saying the rule."""
        with pytest.raises(ConfigurationError, match=r"PeriodicTimer interval must be > 0 seconds, not: "):
            PeriodicTimer(interval, CancellationToken())

    def test_interval_must_be_a_number(self) -> None:
        """A string interval is a type error naming the accepted kinds."""
        with pytest.raises(
            ConfigurationTypeError, match="PeriodicTimer interval must be a number of seconds or a timedelta, not: '5'"
        ):
            PeriodicTimer("5", CancellationToken())  # type: ignore[arg-type]

    def test_token_must_be_a_token(self) -> None:
        """Passing something that is not a token fails at once."""
        with pytest.raises(
            ConfigurationTypeError, match="PeriodicTimer needs a CancellationToken to end the iteration, not: None"
        ):
            PeriodicTimer(1.0, None)  # type: ignore[arg-type]
