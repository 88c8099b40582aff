"""One back-off vocabulary on tenacity, one place for durations, one exception summary.

Restart policies and queue retries are tenacity wait strategies: a user passes any
tenacity wait where a back-off is accepted, and the defaults keep their numbers.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import tenacity

from hostkit import BackgroundService, CancellationToken, HostBuilder, HostOptions, RestartPolicy, ServiceState
from hostkit.exceptions import ConfigurationError
from tests.conftest import wait_until


def restart_delays(policy: RestartPolicy, logs, failures: int = 4) -> list[float]:
    """The back-offs a host logs for a service that fails ``failures`` times, then runs."""
    running = threading.Event()

    class Flaps(BackgroundService):
        runs = 0

        def execute(self, stopping: CancellationToken) -> None:
            type(self).runs += 1
            if type(self).runs <= failures:
                raise RuntimeError(f"failure {type(self).runs}")
            running.set()
            stopping.wait()

    builder = HostBuilder(options=HostOptions(shutdown_timeout=10))
    builder.services.add_hosted_service(Flaps(), restart=policy)
    host = builder.build()
    host.start()
    try:
        assert wait_until(lambda: running.is_set() or host.lifetime.stopping.is_set(), timeout=20)
        status = host.status()["Flaps"]
        assert status.state is ServiceState.RUNNING and status.restarts == failures
    finally:
        host.stop()
    lines = logs.find("failed; restarting it in", level="ERROR")
    return [float(line["message"].split("restarting it in ")[1].split(" s")[0]) for line in lines]


class TestRestartPolicyWait:
    def test_any_tenacity_wait_is_the_restart_back_off(self, logs) -> None:
        """RestartPolicy(wait=tenacity.wait_fixed(...)): every restart waits that long, through a host."""
        assert restart_delays(RestartPolicy(max_restarts=None, wait=tenacity.wait_fixed(0.03)), logs) == [0.03] * 4

    def test_a_combination_of_tenacity_waits_sets_every_delay(self, logs) -> None:
        """wait_exponential + wait_random: the delays logged are the combination's, not the defaults."""
        strategy = tenacity.wait_exponential(multiplier=0.01, max=0.04) + tenacity.wait_random(0, 0.005)
        delays = restart_delays(RestartPolicy(max_restarts=None, wait=strategy), logs)
        # 0.01, 0.02, 0.04, 0.04 (the max), each plus up to 0.005 of jitter, shown to 2 decimals.
        for delay, low in zip(delays, (0.01, 0.02, 0.04, 0.04), strict=True):
            assert low - 0.005 <= delay <= low + 0.01, delays

    def test_the_default_is_built_from_tenacity_strategies_with_the_same_numbers(self) -> None:
        """The default back-off is a tenacity strategy a user can run in their own Retrying."""
        policy = RestartPolicy(backoff=0.5, multiplier=2, backoff_max=30, jitter=0)
        strategy = policy.strategy()
        assert isinstance(strategy, tenacity.wait.wait_base)
        seen: list[float] = []
        attempts = iter(range(8))

        def flaky() -> None:
            if next(attempts) < 7:
                raise RuntimeError("again")

        tenacity.Retrying(wait=strategy, sleep=seen.append, reraise=True)(flaky)
        assert seen == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0]
        assert [policy.delay(n, 0.0) for n in range(1, 8)] == seen

    def test_wait_with_back_off_numbers_or_not_a_strategy_is_refused(self) -> None:
        """wait= replaces the numbers: both at once, or a wait that cannot be called, is a clear error."""
        with pytest.raises(ConfigurationError, match=r"RestartPolicy.wait replaces backoff, jitter: give either"):
            RestartPolicy(wait=tenacity.wait_fixed(1), backoff=2, jitter=0)
        with pytest.raises(ConfigurationError, match=r"RestartPolicy.wait must be a tenacity wait strategy"):
            RestartPolicy(wait=5)  # type: ignore[arg-type]


class TestQueueRetryWait:
    def test_a_strategy_that_reads_its_retry_loop_works(self, tmp_path: Path) -> None:
        """The call state a consumer's retry strategy gets belongs to a real tenacity loop, not a stand-in."""
        from hostkit.queues import QueueConsumer, SQLiteQueue

        def per_loop(retry_state: tenacity.RetryCallState) -> float:
            # A strategy may read the loop it runs in (its statistics, its other strategies).
            assert isinstance(retry_state.retry_object, tenacity.BaseRetrying)
            return 0.5 * retry_state.attempt_number

        with SQLiteQueue(tmp_path / "q.db") as queue:
            consumer = QueueConsumer(queue, lambda m, s: None, backoff=per_loop)
            assert [consumer.backoff_for(n) for n in (1, 2, 3)] == [0.5, 1.0, 1.5]


class TestOnePlaceForDurations:
    def test_a_negative_lease_time_names_the_rule_it_breaks(self, tmp_path: Path) -> None:
        """An option that must be > 0 says so for -1 as for 0 (it said ">= 0" for -1)."""
        from hostkit.queues import SQLiteQueue

        for value in (0, -1):
            with pytest.raises(ConfigurationError, match=rf"lease_time must be > 0 seconds, not: {value} \(int\)"):
                SQLiteQueue(tmp_path / "q.db", lease_time=value)

    def test_the_contention_interval_refuses_negative_with_the_same_rule(self) -> None:
        from hostkit.contention import LagProbe

        with pytest.raises(ConfigurationError, match=r"interval must be > 0 seconds, not: -0.5 \(float\)"):
            LagProbe(interval=-0.5)

    def test_util_keeps_its_names(self) -> None:
        """Modules that import the duration helpers from _util get the one implementation."""
        from hostkit import _util, _validate

        assert _util.to_seconds is _validate.to_seconds and _util.describe is _validate.describe


class TestOneSummary:
    def test_summary_of_an_exception(self) -> None:
        """ "Type: message", or the type alone, and never an error from the exception's own __str__."""

        from hostkit._summary import summarize_exception

        class Unprintable(Exception):
            def __str__(self) -> str:
                raise ValueError("no text")

        assert summarize_exception(ConnectionError("refused")) == "ConnectionError: refused"
        assert summarize_exception(ConnectionError()) == "ConnectionError"
        assert summarize_exception(Unprintable()) == "Unprintable: <exception str() failed>"

    def test_heartbeat_age(self) -> None:
        """Seconds since the last beat, else since the run began; unknown when neither is known."""
        from hostkit._summary import heartbeat_age

        assert heartbeat_age(100.0, 50.0, now=103.5) == 3.5
        assert heartbeat_age(None, 50.0, now=53.0) == 3.0
        assert heartbeat_age(0.0, 50.0, now=53.0) == 3.0
        assert heartbeat_age(None, None, now=53.0) is None
