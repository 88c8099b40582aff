"""Restart policies (tenacity): the window, back-off and its reset, stop during back-off, giving up.

Most tests drive :class:`hostkit._supervisor.Supervisor` directly with an
injected clock and random source, so time-window rules are checked without
waiting; the last ones go through a host, over both placements.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from hostkit import (
    BackgroundService,
    CancellationToken,
    ExitCode,
    HostBuilder,
    HostOptions,
    RestartPolicy,
    ServiceState,
)
from hostkit._status import ServiceRecord
from hostkit._supervisor import Supervisor
from hostkit.exceptions import ConfigurationError
from tests.conftest import wait_until


class Idle(BackgroundService):
    def execute(self, stopping: CancellationToken) -> None:  # pragma: no cover - never run here
        stopping.wait()


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def supervisor(
    policy: RestartPolicy | None, run_once: Callable[[], None], clock: FakeClock | None = None
) -> tuple[Supervisor, ServiceRecord, CancellationToken]:
    record = ServiceRecord(Idle(), name="svc", placement="thread", restart=policy)
    stopping = CancellationToken(name="svc")
    sup = Supervisor(record, stopping, run_once, clock=clock or FakeClock(), rng=lambda: 0.5)
    return sup, record, stopping


class Done(BaseException):
    """Ends a test's run: not an Exception, so no policy retries it."""


def record_waits(sup: Supervisor) -> list[float]:
    """Record every back-off the supervisor computes."""
    seen: list[float] = []
    original = sup.wait

    def wait(state: object) -> float:
        seen.append(original(state))  # type: ignore[arg-type]
        return seen[-1]

    sup.wait = wait
    return seen


class TestWindow:
    def test_at_most_n_restarts_within_the_window(self, logs) -> None:
        """max_restarts=3: three restarts, the fourth failure is final and re-raised."""
        runs = []

        def fail() -> None:
            runs.append(1)
            raise RuntimeError(f"failure {len(runs)}")

        policy = RestartPolicy(max_restarts=3, window=60, backoff=0.001, jitter=0)
        sup, record, _ = supervisor(policy, fail)
        with pytest.raises(RuntimeError, match="failure 4"):
            sup.run()
        assert len(runs) == 4
        assert record.restarts == 3
        assert record.error == "RuntimeError: failure 3"  # the last failure that was restarted
        assert len(logs.find("failed; restarting it in", level="ERROR")) == 3

    def test_failures_older_than_the_window_do_not_count(self) -> None:
        """Failures spaced wider than the window never exhaust max_restarts."""
        clock = FakeClock()
        runs = []

        def fail_then_succeed() -> None:
            runs.append(1)
            clock.now += 100  # each run lasts longer than the 60 s window
            if len(runs) < 6:
                raise RuntimeError("again")

        policy = RestartPolicy(max_restarts=1, window=60, backoff=0.001, jitter=0, reset_after=1000)
        sup, record, _ = supervisor(policy, fail_then_succeed, clock)
        sup.run()
        assert len(runs) == 6
        assert record.restarts == 5

    def test_no_policy_means_no_restart(self) -> None:
        """Without restart= the first failure is final."""
        runs = []

        def fail() -> None:
            runs.append(1)
            raise ValueError("once")

        sup, record, _ = supervisor(None, fail)
        with pytest.raises(ValueError, match="once"):
            sup.run()
        assert runs == [1] and record.restarts == 0


class TestBackoff:
    def test_exponential_backoff_with_jitter(self) -> None:
        """Delays grow by the multiplier, capped at backoff_max, plus jitter * the random fraction."""

        def fail() -> None:
            raise RuntimeError("x")

        policy = RestartPolicy(max_restarts=4, backoff=0.002, multiplier=3, backoff_max=0.03, jitter=0.01)
        sup, _, _ = supervisor(policy, fail)
        seen = record_waits(sup)
        with pytest.raises(RuntimeError):
            sup.run()
        # rng is 0.5: jitter adds 0.005 to 0.002, 0.006, 0.018, then the 0.03 cap. (tenacity also
        # computes a wait for the final failure, before its stop check gives up; it is never slept.)
        assert seen[:4] == pytest.approx([0.007, 0.011, 0.023, 0.035])

    def test_backoff_resets_after_a_healthy_run(self) -> None:
        """A run that lasted reset_after seconds resets the back-off to its first step."""
        clock = FakeClock()
        policy = RestartPolicy(max_restarts=None, backoff=0.001, multiplier=10, jitter=0, reset_after=30)
        durations = [0, 0, 31, 0]

        def fail() -> None:
            if not durations:
                raise Done
            clock.now += durations.pop(0)
            raise RuntimeError("x")

        sup, _, _ = supervisor(policy, fail, clock)
        seen = record_waits(sup)
        with pytest.raises(Done):
            sup.run()
        assert seen == pytest.approx([0.001, 0.01, 0.001, 0.01])

    def test_policy_values_are_validated(self) -> None:
        """A wrong policy value fails when the policy is made, naming the field."""
        with pytest.raises(ConfigurationError, match=r"RestartPolicy.max_restarts must be an int >= 0 or None"):
            RestartPolicy(max_restarts=-1)
        with pytest.raises(ConfigurationError, match=r"RestartPolicy.multiplier must be a finite number >= 1"):
            RestartPolicy(multiplier=0.5)

    @pytest.mark.parametrize(
        ("changes", "message"),
        [
            (
                {"multiplier": float("inf")},
                "RestartPolicy.multiplier must be a finite number >= 1, not: inf (float)",
            ),
            (
                {"multiplier": float("nan")},
                "RestartPolicy.multiplier must be a finite number >= 1, not: nan (float)",
            ),
            ({"multiplier": True}, "RestartPolicy.multiplier must be a finite number >= 1, not: True (bool)"),
            (
                {"backoff": float("inf")},
                "RestartPolicy.backoff must be a finite number of seconds, at most 31536000 (365 days), "
                "not: inf (float)",
            ),
            (
                {"backoff_max": float("inf")},
                "RestartPolicy.backoff_max must be a finite number of seconds, at most 31536000 (365 days), "
                "not: inf (float)",
            ),
            (
                {"backoff_max": 1e12},
                "RestartPolicy.backoff_max must be a finite number of seconds, at most 31536000 (365 days), "
                "not: 1000000000000.0 (float)",
            ),
            (
                {"window": float("inf")},
                "RestartPolicy.window must be a finite number of seconds, at most 31536000 (365 days), "
                "not: inf (float)",
            ),
            ({"window": float("nan")}, "RestartPolicy.window must be >= 0 seconds, not: nan (float)"),
            (
                {"backoff": 60},
                "RestartPolicy.backoff (60 s) is longer than backoff_max (30 s), so it could never be used; "
                "raise backoff_max too, e.g. RestartPolicy(backoff=60, backoff_max=60)",
            ),
        ],
    )
    def test_non_finite_and_absurd_values_are_refused(self, changes: dict[str, float], message: str) -> None:
        """inf, NaN, durations past a year and a first back-off above the cap fail when the policy is made.

        Each of them used to be accepted and then broke the supervising thread at the first
        failure (an overflow, or a wait too long for the platform), far from the mistake.
        """
        with pytest.raises(ConfigurationError) as info:
            RestartPolicy(**changes)  # type: ignore[arg-type]
        assert str(info.value) == message
        assert isinstance(info.value, ValueError)


class TestStopDuringBackoff:
    def test_stop_interrupts_the_backoff_and_no_restart_begins(self) -> None:
        """A stop during a 30 s back-off ends the wait at once; the service is not run again."""
        runs = []
        failed = threading.Event()

        def fail() -> None:
            runs.append(1)
            failed.set()
            raise RuntimeError("down")

        policy = RestartPolicy(max_restarts=5, backoff=30, jitter=0)
        sup, record, stopping = supervisor(policy, fail)
        outcome: list[BaseException | None] = []

        def run() -> None:
            try:
                sup.run()
                outcome.append(None)
            except BaseException as exc:
                outcome.append(exc)

        thread = threading.Thread(target=run, name="test-supervisor")
        thread.start()
        assert failed.wait(10)
        assert wait_until(lambda: record.state is ServiceState.RESTARTING, timeout=10)
        began = time.monotonic()
        stopping.set()
        thread.join(10)
        assert not thread.is_alive()
        assert time.monotonic() - began < 5, "the back-off was not interrupted"
        assert runs == [1], "a restart began after the stop"
        assert len(outcome) == 1

    def test_host_stop_during_backoff(self, logs) -> None:
        """Through a host: stopping during the back-off stops at once and never runs execute again."""

        class Crashes(BackgroundService):
            runs = 0

            def execute(self, stopping: CancellationToken) -> None:
                type(self).runs += 1
                raise RuntimeError("crash")

        builder = HostBuilder(options=HostOptions(shutdown_timeout=10))
        builder.services.add_hosted_service(Crashes(), restart=RestartPolicy(backoff=30, jitter=0))
        host = builder.build()
        host.start()
        assert wait_until(lambda: host.status()["Crashes"].state is ServiceState.RESTARTING, timeout=10)
        began = time.monotonic()
        host.stop()
        assert time.monotonic() - began < 5
        assert Crashes.runs == 1
        assert host.exit_code == ExitCode.OK


class TestThroughTheHost:
    @pytest.mark.parametrize("placement", ["thread", "process"])
    def test_exhausted_policy_under_ignore_leaves_it_faulted_and_the_host_running(self, placement, tmp_path) -> None:
        """When the policy gives up, on_background_error applies: 'ignore' marks it faulted, the host runs on."""
        from tests.test_placement_contract import FailsTwice

        builder = HostBuilder(options=HostOptions(shutdown_timeout=10, on_background_error="ignore"))
        policy = RestartPolicy(max_restarts=0, backoff=0.01, jitter=0)
        builder.services.add_hosted_service(FailsTwice(str(tmp_path)), restart=policy, placement=placement)
        host = builder.build()
        with host:
            assert wait_until(lambda: host.status()["FailsTwice"].state is ServiceState.FAULTED, timeout=30)
            assert not host.lifetime.stopping.is_set()
            status = host.status()["FailsTwice"]
        assert status.restarts == 0
        assert status.error == "RuntimeError: run 1 failed"
        assert host.exit_code == ExitCode.OK


class TestRestartForever:
    def test_backoff_is_capped_without_overflow_however_many_failures(self) -> None:
        """The back-off reaches backoff_max and stays there, at failure 10 or failure 10**18."""
        policy = RestartPolicy(max_restarts=None, backoff=0.5, multiplier=2, backoff_max=30, jitter=0.25)
        assert policy.delay(1, 0.0) == 0.5
        assert policy.delay(2, 0.0) == 1.0
        assert policy.delay(7, 0.0) == 30.0
        for failures in (1_025, 5_000, 10**6, 10**18):
            assert policy.delay(failures, 0.0) == 30.0
            assert policy.delay(failures, 1.0) == 30.25
        huge = RestartPolicy(max_restarts=None, backoff=1e-9, multiplier=1e300, backoff_max=60, jitter=0)
        assert huge.delay(10**9, 0.0) == 60.0
        zero = RestartPolicy(max_restarts=None, backoff=0, backoff_max=0, jitter=0)
        assert zero.delay(10**9, 0.5) == 0.0

    def test_backoff_never_decreases_as_failures_add_up(self) -> None:
        """Each further consecutive failure waits at least as long as the one before."""
        policy = RestartPolicy(max_restarts=None, backoff=0.001, multiplier=1.5, backoff_max=45, jitter=0)
        delays = [policy.delay(n, 0.0) for n in range(1, 3_000)]
        assert delays == sorted(delays)
        assert delays[-1] == 45.0

    @pytest.mark.timeout(120)
    def test_five_thousand_consecutive_failures_keep_restarting_and_the_host_stops_cleanly(self) -> None:
        """max_restarts=None restarts at every failure, at 5,000 and beyond; the host then stops with exit 0."""
        failures = 5_000
        healthy = threading.Event()

        class Flaps(BackgroundService):
            runs = 0

            def execute(self, stopping: CancellationToken) -> None:
                type(self).runs += 1
                if type(self).runs <= failures:
                    raise RuntimeError(f"failure {type(self).runs}")
                healthy.set()
                stopping.wait()

        builder = HostBuilder(options=HostOptions(shutdown_timeout=10))
        policy = RestartPolicy(max_restarts=None, backoff=0, backoff_max=0, jitter=0)
        builder.services.add_hosted_service(Flaps(), restart=policy)
        host = builder.build()
        host.start()
        try:
            assert wait_until(lambda: healthy.is_set() or host.lifetime.stopping.is_set(), timeout=100)
            assert healthy.is_set(), f"stopped restarting after {Flaps.runs} runs: {host.status()['Flaps']}"
            status = host.status()["Flaps"]
            assert status.state is ServiceState.RUNNING
            assert status.restarts == failures
            assert not host.lifetime.stopping.is_set()
        finally:
            host.stop()
        assert host.status()["Flaps"].state is ServiceState.STOPPED
        assert host.exit_code == ExitCode.OK
        assert Flaps.runs == failures + 1


class TestSupervisorBug:
    def test_a_failing_supervisor_is_logged_as_a_hostkit_bug_and_surfaced(self, logs) -> None:
        """An error in the restart machinery itself is not passed off as the service's failure.

        It is logged at CRITICAL as hostkit's own failure with its traceback, the service is
        faulted with a SupervisorError that names the original error, and the host applies
        on_background_error: under "stop_host" it stops with exit code 1.
        """
        from hostkit.exceptions import SupervisorError

        def broken(retry_state: object) -> float:
            raise ZeroDivisionError("bug in the back-off")

        class BrokenPolicy(RestartPolicy):
            def strategy(self, rng: object = None) -> Callable[[object], float]:  # type: ignore[override]
                return broken

        class Crashes(BackgroundService):
            def execute(self, stopping: CancellationToken) -> None:
                raise RuntimeError("service failure")

        builder = HostBuilder(options=HostOptions(shutdown_timeout=10))
        builder.services.add_hosted_service(Crashes(), restart=BrokenPolicy(max_restarts=None, jitter=0))
        host = builder.build()
        host.start()
        try:
            assert host.lifetime.stopped.wait(20)
        finally:
            host.stop()
        status = host.status()["Crashes"]
        assert status.state is ServiceState.FAULTED
        assert status.error is not None and status.error.startswith(f"{SupervisorError.__name__}: ")
        assert "ZeroDivisionError: bug in the back-off" in status.error
        assert status.traceback is not None and "raise ZeroDivisionError" in status.traceback
        assert host.exit_code == ExitCode.SERVICE_FAILED
        critical = logs.find("restart supervisor of background service 'Crashes' failed", level="CRITICAL")
        assert len(critical) == 1
        assert "a bug in hostkit" in critical[0]["message"]
        assert "ZeroDivisionError: bug in the back-off" in critical[0]["message"]
        assert not logs.find("Background service 'Crashes' failed:", level="CRITICAL")

    @pytest.mark.parametrize("restart", [None, RestartPolicy(max_restarts=2, backoff=0, backoff_max=0, jitter=0)])
    def test_a_failure_that_cannot_be_printed_still_faults_the_service(self, logs, restart) -> None:
        """An exception whose __str__ raises is reported and restarted like any other failure.

        It used to end the supervising thread in the middle of reporting it: the thread died
        with a traceback on stderr only, and the service showed as running for good.
        """

        class Unprintable(Exception):
            def __str__(self) -> str:
                raise ValueError("no text")

        class Crashes(BackgroundService):
            runs = 0

            def execute(self, stopping: CancellationToken) -> None:
                type(self).runs += 1
                raise Unprintable

        builder = HostBuilder(options=HostOptions(shutdown_timeout=10))
        builder.services.add_hosted_service(Crashes(), restart=restart)
        host = builder.build()
        host.start()
        try:
            assert host.lifetime.stopped.wait(20), host.status()["Crashes"]
        finally:
            host.stop()
        status = host.status()["Crashes"]
        assert status.state is ServiceState.FAULTED
        assert status.error == "Unprintable: <exception str() failed>"
        assert status.restarts == (0 if restart is None else 2)
        assert Crashes.runs == (1 if restart is None else 3)
        assert host.exit_code == ExitCode.SERVICE_FAILED
        assert logs.find("Background service 'Crashes' failed: Unprintable", level="CRITICAL")
