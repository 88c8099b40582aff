"""One contract for every placement: the same services behave the same in a thread and in a child.

Each test runs over ``placement="thread"`` and ``placement="process"`` under the
``forkserver`` and ``spawn`` start methods (CPython's ``create_executor_tests``
pattern). The services below are module-level so every start method can import
them; they report through log lines (which a child forwards to the host) and
files, never through shared memory, so the same assertions hold in both places.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
from loguru import logger

from hostkit import (
    BackgroundService,
    CancellationToken,
    ExitCode,
    HostBuilder,
    HostOptions,
    RestartPolicy,
    ServiceState,
)
from tests.conftest import wait_until

PLACEMENTS = [
    pytest.param(("thread", None), id="thread"),
    pytest.param(("process", "forkserver"), id="process-forkserver"),
    pytest.param(("process", "spawn"), id="process-spawn"),
]


class Waiter(BackgroundService):
    """Runs until asked to stop."""

    def execute(self, stopping: CancellationToken) -> None:
        logger.info("waiter running in {}", os.getpid())
        stopping.wait()
        logger.info("waiter saw the stop")


class Returner(BackgroundService):
    """Returns on its own."""

    def execute(self, stopping: CancellationToken) -> None:
        logger.info("returner done")


class Raiser(BackgroundService):
    """Raises at once."""

    def __init__(self, message: str) -> None:
        self.message = message

    def execute(self, stopping: CancellationToken) -> None:
        raise ValueError(self.message)


class FailsTwice(BackgroundService):
    """Fails on its first two runs (counted in files), then runs until stopped."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def execute(self, stopping: CancellationToken) -> None:
        runs = len(os.listdir(self.folder)) + 1
        Path(self.folder, f"run-{runs}").touch()
        if runs <= 2:
            raise RuntimeError(f"run {runs} failed")
        logger.info("run {} is healthy", runs)
        stopping.wait()


class Stubborn(BackgroundService):
    """Ignores its token for a while (bounded, so an abandoned thread still ends)."""

    def execute(self, stopping: CancellationToken) -> None:
        logger.info("stubborn running")
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            time.sleep(0.05)


@pytest.fixture(params=PLACEMENTS)
def place(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Registration arguments for one placement."""
    placement, method = request.param
    kwargs: dict[str, Any] = {"placement": placement}
    if method is not None:
        kwargs["start_method"] = method
    return kwargs


def build(service: BackgroundService, place: dict[str, Any], **options: Any) -> Any:
    builder = HostBuilder(options=HostOptions(shutdown_timeout=options.pop("shutdown_timeout", 10.0), **options))
    builder.services.add_hosted_service(service, **place)
    return builder.build()


class TestStartAndStop:
    def test_execute_runs_and_stops_when_asked(self, place, logs) -> None:
        """execute runs after start(); stop() sets its token, it returns, the service is STOPPED."""
        host = build(Waiter(), place)
        host.start()
        try:
            assert wait_until(lambda: logs.find("waiter running"), timeout=30)
            assert host.status()["Waiter"].state is ServiceState.RUNNING
        finally:
            host.stop()
        assert logs.find("waiter saw the stop"), logs.text()
        status = host.status()["Waiter"]
        assert status.state is ServiceState.STOPPED
        assert host.exit_code == 0
        assert status.stopped_at is not None and status.started_at is not None

    def test_lines_are_tagged_with_service_and_the_pid_that_ran_execute(self, place, logs) -> None:
        """Lines from execute carry the service name, and the pid of the process that ran it."""
        host = build(Waiter(), place)
        with host:
            assert wait_until(lambda: logs.find("waiter running"), timeout=30)
        record = logs.find("waiter running")[0]
        assert record["service"] == "Waiter"
        ran_in = int(record["message"].rsplit(" ", 1)[1])
        assert record["process"] == ran_in
        assert (ran_in != os.getpid()) is (place["placement"] == "process")
        assert host.status()["Waiter"].pid == ran_in

    def test_stop_immediately_after_start_stops_cleanly(self, place) -> None:
        """A service stopped right after it started still ends STOPPED, exit code 0."""
        host = build(Waiter(), place)
        host.start()
        host.stop()
        assert host.status()["Waiter"].state is ServiceState.STOPPED
        assert host.exit_code == 0

    def test_returning_on_its_own_is_completed_and_the_host_runs_on(self, place, logs) -> None:
        """execute returning before any stop marks the service COMPLETED; the host stays running."""
        host = build(Returner(), place)
        with host:
            assert wait_until(lambda: host.status()["Returner"].state is ServiceState.COMPLETED, timeout=30)
            assert not host.lifetime.stopping.is_set()
        assert host.status()["Returner"].state is ServiceState.COMPLETED  # the host's stop leaves it so
        assert logs.find("Background service 'Returner' completed")


class TestErrors:
    def test_failure_stops_the_host_with_type_message_and_traceback(self, place, logs) -> None:
        """An exception from execute faults the service; under stop_host the host stops with exit code 1."""
        host = build(Raiser("disk is full"), place)
        host.start()
        try:
            assert host.lifetime.stopped.wait(30), "the host did not stop after the service failed"
        finally:
            host.stop()
        status = host.status()["Raiser"]
        assert status.state is ServiceState.FAULTED
        assert status.error == "ValueError: disk is full"
        assert "raise ValueError(self.message)" in (status.traceback or "")
        assert host.exit_code == ExitCode.SERVICE_FAILED
        failed = logs.find("Background service 'Raiser' failed: ValueError: disk is full", level="CRITICAL")
        assert failed and "raise ValueError(self.message)" in failed[0]["message"]

    def test_failure_under_ignore_keeps_the_host_running(self, place) -> None:
        """Under on_background_error='ignore' a failed service is FAULTED and the host runs on."""
        host = build(Raiser("ignored"), place, on_background_error="ignore")
        with host:
            assert wait_until(lambda: host.status()["Raiser"].state is ServiceState.FAULTED, timeout=30)
            assert not host.lifetime.stopping.is_set()
        assert host.exit_code == 0


class TestRestart:
    def test_restarted_under_policy_with_counts_in_status(self, place, tmp_path, logs) -> None:
        """Two failures are restarted under the policy; status counts them and keeps the last failure."""
        policy = RestartPolicy(max_restarts=3, window=60, backoff=0.01, jitter=0.0)
        builder = HostBuilder(options=HostOptions(shutdown_timeout=10))
        builder.services.add_hosted_service(FailsTwice(str(tmp_path)), restart=policy, **place)
        host = builder.build()
        with host:
            assert wait_until(
                lambda: (s := host.status()["FailsTwice"]).restarts == 2 and s.state is ServiceState.RUNNING, timeout=40
            ), logs.text()
            status = host.status()["FailsTwice"]
            assert status.state is ServiceState.RUNNING
            assert status.restarts == 2
            assert status.error == "RuntimeError: run 2 failed"
            assert status.last_failure_at is not None
        assert host.status()["FailsTwice"].state is ServiceState.STOPPED
        assert len(logs.find("failed; restarting it in", level="ERROR")) == 2

    def test_exhausted_policy_falls_back_to_on_background_error(self, place, tmp_path) -> None:
        """With max_restarts=1 the second failure is final: FAULTED, and the host stops (stop_host)."""
        policy = RestartPolicy(max_restarts=1, window=60, backoff=0.01, jitter=0.0)
        builder = HostBuilder(options=HostOptions(shutdown_timeout=10))
        builder.services.add_hosted_service(FailsTwice(str(tmp_path)), restart=policy, **place)
        host = builder.build()
        host.start()
        try:
            assert host.lifetime.stopped.wait(40)
        finally:
            host.stop()
        status = host.status()["FailsTwice"]
        assert status.state is ServiceState.FAULTED
        assert status.restarts == 1
        assert status.error == "RuntimeError: run 2 failed"
        assert host.exit_code == ExitCode.SERVICE_FAILED
        assert sorted(os.listdir(tmp_path)) == ["run-1", "run-2"]


class TestDeadline:
    @pytest.mark.timeout(90)
    def test_service_ignoring_its_token_is_timed_out_within_the_budget(self, place, logs) -> None:
        """A service that ignores its token is escalated at the deadline; the stop keeps to the budget + 1 s."""
        budget = 1.0
        host = build(Stubborn(), place, shutdown_timeout=budget)
        host.start()
        assert wait_until(lambda: logs.find("stubborn running"), timeout=30)
        began = time.monotonic()
        host.stop()
        took = time.monotonic() - began
        assert took < budget + 1.0, f"stop took {took:.2f} s with a budget of {budget} s"
        status = host.status()["Stubborn"]
        assert status.state is ServiceState.TIMED_OUT
        assert logs.find("did not stop within the shutdown budget", level="ERROR")
