"""placement="process": failures crossing back, child deaths, escalation, logs, pickling, DI, resources.

Services are module-level so forkserver and spawn children can import them. They
talk to the test through log lines (forwarded by the child) and files.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from loguru import logger

from hostkit import (
    ApplicationLifetime,
    BackgroundService,
    CancellationToken,
    HostBuilder,
    HostOptions,
    HostState,
    RestartPolicy,
    ServiceState,
)
from hostkit.exceptions import ConfigurationError, HostStartupError, ServicePicklingError
from tests.conftest import wait_until
from tests.subproc import python


class QuotaError(Exception):
    """A user's own exception type."""


class Unsendable(Exception):
    """An exception whose constructor needs two arguments: it pickles but cannot be rebuilt."""

    def __init__(self, a: str, b: str) -> None:
        super().__init__(f"{a}/{b}")


class RaisesQuota(BackgroundService):
    def execute(self, stopping: CancellationToken) -> None:
        raise QuotaError("tenant 7 is over quota")


class RaisesUnsendable(BackgroundService):
    def execute(self, stopping: CancellationToken) -> None:
        raise Unsendable("left", "right")


class Dies(BackgroundService):
    """Ends its own process the way a crash would."""

    def __init__(self, how: str) -> None:
        self.how = how

    def execute(self, stopping: CancellationToken) -> None:
        logger.info("about to die by {}", self.how)
        if self.how == "exit3":
            os._exit(3)
        os.kill(os.getpid(), getattr(signal, self.how))
        stopping.wait(30)


class Sleeper(BackgroundService):
    """Logs its pid and waits for the stop."""

    def execute(self, stopping: CancellationToken) -> None:
        logger.info("sleeper pid {}", os.getpid())
        stopping.wait()


class DefaultSigterm(BackgroundService):
    """Gives SIGTERM its default action back (as some libraries do): a SIGTERM kills it outright."""

    def execute(self, stopping: CancellationToken) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        logger.info("sleeper pid {}", os.getpid())
        stopping.wait()


class IgnoresEverything(BackgroundService):
    """Ignores its token and SIGTERM: only SIGKILL ends it."""

    def execute(self, stopping: CancellationToken) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        logger.info("ignoring pid {}", os.getpid())
        while True:
            time.sleep(0.05)


class Chatty(BackgroundService):
    """Logs many lines through loguru and the stdlib, then waits for the stop and logs once more."""

    def execute(self, stopping: CancellationToken) -> None:
        for i in range(300):
            logger.info("line {}", i)
        logging.getLogger("chatty.stdlib").warning("from the stdlib %s", "logger")
        try:
            1 / 0
        except ZeroDivisionError:
            logger.exception("caught in the child")
        stopping.wait()
        for i in range(1200):  # more than the host reads per batch, all after the stop
            logger.info("closing line {}", i)


class HoldsLock(BackgroundService):
    """Guards a shared counter with a thread lock: in a child that lock would guard nothing."""

    def __init__(self) -> None:
        self.guard = threading.Lock()

    def execute(self, stopping: CancellationToken) -> None:  # pragma: no cover - never runs
        with self.guard:
            stopping.wait()


class HoldsSocket(BackgroundService):
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def execute(self, stopping: CancellationToken) -> None:  # pragma: no cover - never runs
        stopping.wait()


class Registry:
    """A singleton with a lock inside (as many caches have)."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.items: dict[str, int] = {}


class NeedsRegistry(BackgroundService):
    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def execute(self, stopping: CancellationToken) -> None:  # pragma: no cover - never runs
        stopping.wait()


class HoldsGenerator(BackgroundService):
    def __init__(self) -> None:
        self.name = "fine"
        self.cursor = (row for row in range(3))

    def execute(self, stopping: CancellationToken) -> None:  # pragma: no cover - never runs
        stopping.wait()


class PidBook:
    """A singleton dependency that records the pid that built it."""

    def __init__(self, path: Path) -> None:
        with open(path, "a") as f:
            f.write(f"{os.getpid()}\n")


class NeedsBook(BackgroundService):
    def __init__(self, book: PidBook) -> None:
        self.book = book

    def execute(self, stopping: CancellationToken) -> None:
        logger.info("built in {} with {}", os.getpid(), type(self.book).__name__)
        stopping.wait()


class Greedy(BackgroundService):
    """Holds 150 MB while it runs."""

    def execute(self, stopping: CancellationToken) -> None:
        hoard = bytearray(150 * 1024 * 1024)
        for i in range(0, len(hoard), 4096):
            hoard[i] = 1
        logger.info("hoarding")
        stopping.wait(30)


class BeatsThenHangs(BackgroundService):
    """Beats three times, then stops beating (a hang)."""

    def execute(self, stopping: CancellationToken) -> None:
        for _ in range(3):
            self.heartbeat()
            stopping.wait(0.05)
        logger.info("now hanging")
        stopping.wait(30)


class SlowToBuild(BackgroundService):
    """Takes 1.5 s to be built (as a service that connects to something in __init__), then beats steadily."""

    def __init__(self) -> None:
        time.sleep(1.5)

    def execute(self, stopping: CancellationToken) -> None:
        self.heartbeat()
        while not stopping.wait(0.05):
            self.heartbeat()


class ReportsResources(BackgroundService):
    def execute(self, stopping: CancellationToken) -> None:
        me = psutil.Process()
        logger.info("nice={} affinity={}", me.nice(), me.cpu_affinity())
        stopping.wait()


def host_with(service: Any, *, budget: float = 10.0, options: dict[str, Any] | None = None, **kwargs: Any) -> Any:
    builder = HostBuilder(options=HostOptions(shutdown_timeout=budget, **(options or {})))
    kwargs.setdefault("placement", "process")
    builder.services.add_hosted_service(service, **kwargs)
    return builder.build()


def run_until_faulted(host: Any, name: str) -> Any:
    host.start()
    try:
        assert wait_until(lambda: host.status()[name].state is ServiceState.FAULTED, timeout=30)
    finally:
        host.stop()
    return host.status()[name]


class TestFailuresCrossBack:
    def test_exception_type_message_and_child_traceback(self, logs) -> None:
        """The child's exception comes back as its own type, with the child's traceback chained."""
        status = run_until_faulted(host_with(RaisesQuota(), options={"on_background_error": "ignore"}), "RaisesQuota")
        assert status.error == "QuotaError: tenant 7 is over quota"
        text = status.traceback or ""
        assert 'raise QuotaError("tenant 7 is over quota")' in text
        assert "The above exception was the direct cause of the following exception" in text
        assert "hostkit._process" not in text.split("The above exception")[1].splitlines()[0]
        assert logs.find("Background service 'RaisesQuota' failed: QuotaError: tenant 7 is over quota", "CRITICAL")

    def test_exception_that_cannot_be_rebuilt_is_reported_by_name(self) -> None:
        """An exception the host cannot rebuild becomes RemoteServiceError naming the original type."""
        status = run_until_faulted(
            host_with(RaisesUnsendable(), options={"on_background_error": "ignore"}), "RaisesUnsendable"
        )
        assert status.error is not None
        assert status.error.startswith("RemoteServiceError: Unsendable: left/right (raised in the child as ")
        assert "test_process_placement.Unsendable" in status.error
        assert 'raise Unsendable("left", "right")' in (status.traceback or "")

    @pytest.mark.parametrize(
        ("how", "expected"),
        [
            ("SIGKILL", "was killed by SIGKILL (exit code -9)"),
            ("SIGSEGV", "was killed by SIGSEGV (exit code -11)"),
            ("exit3", "exited with code 3 without reporting a result"),
        ],
    )
    def test_child_ended_by_signal_or_exit_is_named(self, how, expected, logs) -> None:
        """A child that dies by a signal or os._exit is reported with the signal's name or its exit code."""
        status = run_until_faulted(host_with(Dies(how), options={"on_background_error": "ignore"}), "Dies")
        assert status.error is not None
        assert status.error.startswith("ChildProcessDiedError: child process ")
        assert expected in status.error
        assert logs.find(f"about to die by {how}")


class TestSigtermFromOutside:
    @pytest.mark.parametrize("service", [Sleeper, DefaultSigterm])
    def test_sigterm_to_one_child_stops_its_service_and_the_host_runs_on(self, service, logs) -> None:
        """A SIGTERM the host did not send stops that service (stopped, not failed, not restarted), whether the
        child handles it or dies of it; the host runs on and later exits 0."""
        policy = RestartPolicy(max_restarts=5, backoff=0.05, jitter=0.0)
        host = host_with(service(), restart=policy)
        name = service.__name__
        with host:
            assert wait_until(lambda: logs.find("sleeper pid"), timeout=30), logs.text()
            pid = int(logs.find("sleeper pid")[0]["message"].split()[-1])
            os.kill(pid, signal.SIGTERM)
            assert wait_until(lambda: host.status()[name].state is ServiceState.STOPPED, timeout=30), logs.text()
            status = host.status()[name]
            assert (status.restarts, status.error) == (0, None)
            assert host.state is HostState.RUNNING and not host.lifetime.stopping.is_set()
            assert logs.find(
                f"its child process {pid} was stopped by a SIGTERM that the host did not send; the service is "
                f"stopped and the host runs on without it",
                level="WARNING",
            ), logs.text()
        assert host.exit_code == 0
        assert not [r for r in logs.records if r["level"] in ("ERROR", "CRITICAL")], logs.text()


class TestEscalation:
    @pytest.mark.timeout(60)
    def test_child_ignoring_token_and_sigterm_is_killed_within_budget_and_reaped(self, logs) -> None:
        """SIGTERM then SIGKILL, inside shutdown_timeout + 1 s; the child is reaped (no zombie)."""
        host = host_with(IgnoresEverything(), budget=1.5)
        host.start()
        assert wait_until(lambda: logs.find("ignoring pid"), timeout=30)
        pid = int(logs.find("ignoring pid")[0]["message"].split()[-1])
        began = time.monotonic()
        host.stop()
        took = time.monotonic() - began
        assert took < 1.5 + 1.0, f"the stop took {took:.2f} s"
        assert not psutil.pid_exists(pid), "the child is still there (running or a zombie)"
        status = host.status()["IgnoresEverything"]
        assert status.state is ServiceState.TIMED_OUT
        assert "killed (SIGKILL)" in (status.detail or "")
        assert logs.find("did not stop within the shutdown budget", level="ERROR")

    @pytest.mark.timeout(60)
    def test_a_deaf_child_is_one_error_line(self, logs) -> None:
        """A child escalated at the deadline is logged once at ERROR, saying what was done and where it was."""
        host = host_with(IgnoresEverything(), budget=1.5)
        host.start()
        assert wait_until(lambda: logs.find("ignoring pid"), timeout=30)
        host.stop()
        errors = [r["message"] for r in logs.records if r["level"] in ("ERROR", "CRITICAL")]
        assert len(errors) == 1, errors
        assert "Background service 'IgnoresEverything' did not stop within the shutdown budget (1.5 s)" in errors[0]
        assert "was killed (SIGKILL)" in errors[0]


class TestLogs:
    def test_child_records_arrive_in_order_tagged_and_none_lost(self, logs) -> None:
        """Every loguru and stdlib record of the child reaches the host's sinks, in order, with service and pid."""
        host = host_with(Chatty())
        with host:
            assert wait_until(lambda: logs.find("caught in the child"), timeout=30)
        lines = [
            r for r in logs.records if r["service"] == "Chatty" and r["message"].startswith(("line ", "closing line "))
        ]
        assert [r["message"] for r in lines] == [f"line {i}" for i in range(300)] + [
            f"closing line {i}" for i in range(1200)
        ]
        pids = {r["process"] for r in lines}
        assert len(pids) == 1 and pids != {os.getpid()}
        assert logs.find("from the stdlib logger", level="WARNING")
        caught = logs.find("caught in the child", level="ERROR")[0]["message"]
        assert "ZeroDivisionError: division by zero" in caught

    def test_a_forked_child_leaves_the_hosts_log_file_alone(self, tmp_path, logs) -> None:
        """A forked child does not close the host's file sink: loguru would compress it, and the host's lines be lost.

        A file sink with ``compression`` and no ``rotation`` is compressed (moved into an
        archive, the file removed) when its handler stops. The host's copy of that sink
        must stay the host's: its file keeps every line, the host's and the child's
        (re-emitted by the host), and no archive appears while the host runs.
        """
        path = tmp_path / "host.log"
        sink_id = logger.add(path, compression="gz", format="{message}", level="INFO")
        try:
            host = host_with(Sleeper(), start_method="fork")
            with host:
                assert wait_until(lambda: logs.find("sleeper pid"), timeout=30)
                logger.info("the host writes on after its child started")
                assert sorted(p.name for p in tmp_path.iterdir()) == ["host.log"]
                text = path.read_text()
        finally:
            logger.remove(sink_id)
        assert "sleeper pid" in text
        assert "the host writes on after its child started" in text


class LogsOnStop(BackgroundService):
    """Logs from a callback on its token: the child's stop watcher runs it when the stop comes."""

    def execute(self, stopping: CancellationToken) -> None:
        stopping.register(lambda: logger.info("stop seen by a callback"))
        logger.info("waiting for the stop")
        stopping.wait()


class TestStopWatcher:
    @pytest.mark.parametrize("method", ["fork", "forkserver"])
    def test_token_callbacks_run_on_the_named_watcher_thread(self, logs, method: str) -> None:
        """The child's stop watcher (started without waiting for it) runs the token's callbacks, under its name.

        Its thread is named ``hostkit-<service>-watch`` in the records the host gets, as
        any other thread of the child would be; and the stop it reads reaches ``execute``.
        """
        host = host_with(LogsOnStop(), start_method=method)
        with host:
            assert wait_until(lambda: logs.find("waiting for the stop"), timeout=30)
        (seen,) = logs.find("stop seen by a callback")
        assert seen["thread"] == "hostkit-LogsOnStop-watch"
        assert seen["process"] != os.getpid()
        assert host.status()["LogsOnStop"].state is ServiceState.STOPPED


class TestPickling:
    def test_unpicklable_attribute_fails_start_naming_it(self) -> None:
        """start() fails: HostStartupError names the service, its cause ServicePicklingError the attribute."""
        host = host_with(HoldsGenerator())
        with pytest.raises(HostStartupError) as info:
            host.start()
        assert "hosted service 'HoldsGenerator' failed to start" in str(info.value)
        cause = info.value.__cause__
        assert isinstance(cause, ServicePicklingError)
        assert "its attribute 'cursor' (generator) cannot be pickled, even with dill" in str(cause)
        assert "Create it inside execute()" in str(cause)

    def test_lock_attribute_is_refused_like_a_socket(self) -> None:
        """A threading.Lock attribute fails start() as a socket does: dill would send an unshared copy."""
        errors = {}
        with socket.socket() as sock:
            for service in (HoldsLock(), HoldsSocket(sock)):
                host = host_with(service)
                try:
                    with pytest.raises(HostStartupError) as info:
                        host.start()
                finally:
                    host.stop()
                assert isinstance(info.value.__cause__, ServicePicklingError)
                errors[type(service).__name__] = str(info.value.__cause__)
        head = "process-placed service {!r} cannot be sent to its child process: its attribute {!r} ({}) "
        assert errors["HoldsSocket"].startswith(head.format("HoldsSocket", "sock", "socket"))
        assert errors["HoldsLock"].startswith(head.format("HoldsLock", "guard", "lock"))
        assert "cannot pickle '_thread.lock' object (a copy in the child would not be shared" in errors["HoldsLock"]
        for text in errors.values():
            assert text.endswith(
                "Create it inside execute() (it then lives in the child), or register the class so the child builds it"
            )

    def test_lock_inside_a_singleton_instance_is_refused(self) -> None:
        """A lock deeper down, in a singleton instance the service depends on, is named by its dependency."""
        builder = HostBuilder(options=HostOptions(shutdown_timeout=10))
        builder.services.add_singleton(Registry, instance=Registry())
        builder.services.add_hosted_service(NeedsRegistry, placement="process")
        host = builder.build()
        try:
            with pytest.raises(HostStartupError) as info:
                host.start()
        finally:
            host.stop()
        cause = str(info.value.__cause__)
        assert "its dependency Registry (a singleton registration) cannot be pickled" in cause
        assert "cannot pickle '_thread.RLock' object" in cause

    def test_locally_defined_class_and_closure_work(self, logs) -> None:
        """A class defined in a function, holding a closure, runs in a spawn child."""
        word = "closure-value"

        class Local(BackgroundService):
            def __init__(self) -> None:
                self.get = lambda: word

            def execute(self, stopping: CancellationToken) -> None:
                logger.info("local says {}", self.get())

        host = host_with(Local(), start_method="spawn")
        with host:
            assert wait_until(lambda: logs.find("local says closure-value"), timeout=30)


class TestDependencyInjection:
    def test_class_registration_is_built_in_the_child_by_its_own_container(self, tmp_path, logs) -> None:
        """A process-placed class is built in its child; its singleton dependency too, never in the host."""
        book = tmp_path / "pids"
        builder = HostBuilder(options=HostOptions(shutdown_timeout=10))
        builder.services.add_singleton(PidBook, factory=lambda: PidBook(book))
        builder.services.add_hosted_service(NeedsBook, placement="process")
        host = builder.build()
        with host:
            assert wait_until(lambda: logs.find("with PidBook"), timeout=30)
        child = int(logs.find("with PidBook")[0]["message"].split()[2])
        assert child != os.getpid()
        assert book.read_text().split() == [str(child)]


class Ledger:
    """A singleton that cannot cross to a child: it holds a generator."""

    def __init__(self) -> None:
        self.rows = (row for row in range(3))


class NeedsLedger(BackgroundService):
    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    def execute(self, stopping: CancellationToken) -> None:  # pragma: no cover - never runs
        stopping.wait()


class StopsTheHost(BackgroundService):
    def __init__(self, lifetime: ApplicationLifetime) -> None:
        self.lifetime = lifetime

    def execute(self, stopping: CancellationToken) -> None:
        logger.info("asking the host to stop")
        self.lifetime.stop_application()
        stopping.wait(30)
        logger.info("stopped by the host: {}", stopping.is_set())


class TestDependencyInjectionInChild:
    def test_unpicklable_dependency_is_named_at_start(self) -> None:
        """A dependency instance that cannot cross fails start(), naming the dependency."""
        builder = HostBuilder(options=HostOptions(shutdown_timeout=10))
        builder.services.add_singleton(Ledger, instance=Ledger())
        builder.services.add_hosted_service(NeedsLedger, placement="process")
        host = builder.build()
        with pytest.raises(HostStartupError, match="hosted service 'NeedsLedger' failed to start") as info:
            host.start()
        assert isinstance(info.value.__cause__, ServicePicklingError)
        assert "its dependency Ledger (a singleton registration) cannot be pickled, even with dill" in str(
            info.value.__cause__
        )
        assert "Register it by class or factory= instead of instance=" in str(info.value.__cause__)

    def test_stop_application_in_the_child_stops_the_host(self, logs) -> None:
        """ApplicationLifetime.stop_application() called in the child asks the host to stop, gracefully."""
        builder = HostBuilder(options=HostOptions(shutdown_timeout=10))
        builder.services.add_hosted_service(StopsTheHost, placement="process")
        host = builder.build()
        host.start()
        try:
            assert host.lifetime.stopped.wait(30), logs.text()
        finally:
            host.stop()
        assert logs.find("stopped by the host: True")
        assert host.status()["StopsTheHost"].state is ServiceState.STOPPED
        assert host.exit_code == 0
        assert len(logs.find("asked the host to stop", level="INFO")) == 1, logs.text()

    def test_a_normal_stop_is_not_reported_as_the_child_asking_for_it(self, logs) -> None:
        """Stopping the host stops a class-registered child; the log does not claim the child asked for it."""
        builder = HostBuilder(options=HostOptions(shutdown_timeout=10))
        builder.services.add_hosted_service(Sleeper, placement="process")
        host = builder.build()
        with host:
            assert wait_until(lambda: logs.find("sleeper pid"), timeout=30), logs.text()
        assert host.status()["Sleeper"].state is ServiceState.STOPPED
        assert logs.find("Background service 'Sleeper' stopped"), logs.text()
        assert not logs.find("asked the host to stop"), logs.text()


class TestStartingState:
    @pytest.mark.timeout(90)
    def test_starting_until_the_child_reports_in(self) -> None:
        """A process-placed service is STARTING (never the host's pid) until its child begins execute, then RUNNING."""
        builder = HostBuilder(options=HostOptions(shutdown_timeout=10))
        builder.services.add_hosted_service(SlowToBuild, placement="process")
        host = builder.build()
        seen: list[tuple[ServiceState, int | None]] = []
        with host:
            status = host.status()["SlowToBuild"]
            seen.append((status.state, status.pid))
            # The child exists (its own pid) but is still building the service (1.5 s).
            assert wait_until(lambda: host.status()["SlowToBuild"].pid not in (None, os.getpid()), timeout=30)
            child = host.status()["SlowToBuild"].pid
            assert host.status()["SlowToBuild"].state is ServiceState.STARTING
            assert wait_until(lambda: host.status()["SlowToBuild"].state is ServiceState.RUNNING, timeout=30)
            assert host.status()["SlowToBuild"].pid == child
        assert seen[0][0] is ServiceState.STARTING
        assert seen[0][1] != os.getpid()
        assert host.status()["SlowToBuild"].state is ServiceState.STOPPED


class TestResources:
    def test_nice_and_cpu_affinity_are_applied_in_the_child(self, logs) -> None:
        """nice= and cpu_affinity= are the child's, and the host keeps its own."""
        host = host_with(ReportsResources(), nice=7, cpu_affinity={0})

        def child_resources() -> tuple[int, list[int]] | None:
            pid = host.status()["ReportsResources"].pid
            if pid in (None, os.getpid()):
                return None  # the child is not started yet
            try:
                child = psutil.Process(pid)
                return child.nice(), child.cpu_affinity()
            except psutil.Error:
                return None

        with host:
            assert wait_until(lambda: child_resources() == (7, [0]), timeout=30), (child_resources(), logs.text())
        assert psutil.Process().nice() != 7

    @pytest.mark.timeout(90)
    def test_memory_ceiling_stops_and_restarts_with_a_reason(self, logs) -> None:
        """Over memory_limit the child is stopped, the log says why, and the policy restarts it."""
        policy = RestartPolicy(max_restarts=5, backoff=0.05, jitter=0.0)
        host = host_with(Greedy(), memory_limit="100MB", restart=policy)
        with host:
            assert wait_until(lambda: host.status()["Greedy"].restarts >= 1, timeout=40), logs.text()
        over = logs.find("over its memory_limit of 100.0 MB; it was stopped", level="ERROR")
        assert over and "MB RSS" in over[0]["message"]
        assert "MemoryLimitError" in (host.status()["Greedy"].error or "")

    @pytest.mark.timeout(90)
    def test_stale_heartbeat_is_a_hang_and_is_restarted(self, logs) -> None:
        """A child that stops beating is stopped as hung and restarted; status keeps the last beat."""
        policy = RestartPolicy(max_restarts=5, backoff=0.05, jitter=0.0)
        host = host_with(BeatsThenHangs(), heartbeat_timeout=0.5, restart=policy)
        with host:
            # First the beats, then the hang they stop for: each waited for, not timed.
            assert wait_until(lambda: host.status()["BeatsThenHangs"].last_heartbeat_at is not None, timeout=40), (
                logs.text()
            )
            assert wait_until(lambda: host.status()["BeatsThenHangs"].restarts >= 1, timeout=40), logs.text()
            status = host.status()["BeatsThenHangs"]
        assert status.last_heartbeat_at is not None
        assert "ServiceHungError" in (status.error or "")
        assert logs.find("sent no heartbeat for", level="ERROR")
        assert "(heartbeat_timeout 0.5 s); treated as a hang" in logs.find("sent no heartbeat for")[0]["message"]

    @pytest.mark.timeout(90)
    def test_slow_start_up_of_a_child_is_no_hang(self, logs) -> None:
        """The hang clock starts when execute() begins: a child that takes longer than heartbeat_timeout to be
        built, and then beats, is not stopped as hung."""
        builder = HostBuilder(options=HostOptions(shutdown_timeout=10, on_background_error="ignore"))
        builder.services.add_hosted_service(SlowToBuild, placement="process", heartbeat_timeout=0.5)
        host = builder.build()
        with host:
            assert wait_until(lambda: host.status()["SlowToBuild"].last_heartbeat_at is not None, timeout=30), (
                logs.text()
            )
            status = host.status()["SlowToBuild"]
            assert status.state is ServiceState.RUNNING, status
        status = host.status()["SlowToBuild"]
        assert (status.state, status.restarts, status.error) == (ServiceState.STOPPED, 0, None), logs.text()

    def test_stale_heartbeat_of_a_thread_is_reported_unhealthy(self, logs) -> None:
        """A thread cannot be killed: a stale heartbeat marks it unhealthy in status and logs it."""
        host = host_with(BeatsThenHangs(), placement="thread", heartbeat_timeout=0.3)
        with host:
            assert wait_until(lambda: not host.status()["BeatsThenHangs"].healthy, timeout=20)
            status = host.status()["BeatsThenHangs"]
            assert status.state is ServiceState.RUNNING
            assert "no heartbeat for" in (status.detail or "")
        assert logs.find("A thread cannot be killed; it is reported unhealthy", level="ERROR")


class Formatted:
    """Every record the host re-emits, formatted with the fields a child's record carries."""

    FORMAT = "{time:YYYY-MM-DD HH:mm:ss.SSS}|{name}|{function}|{line}|{extra[service]}|{level}|{message}"

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._id = logger.add(self.lines.append, format=self.FORMAT, level="DEBUG", enqueue=False)

    def close(self) -> None:
        logger.remove(self._id)

    def find(self, message: str) -> list[list[str]]:
        return [line.rstrip("\n").split("|", 6) for line in self.lines if message in line]


class TestSpawnImportsLittle:
    """A child imports what its service imports, not all of hostkit, and loguru only once something logs (issue #3)."""

    def test_service_without_loguru_runs_without_it_and_its_stdlib_records_arrive(self, logs) -> None:
        """stdlib records, exception included, reach the host with time, module, function, service and pid."""
        from tests.light_services import ReportsImports

        formatted = Formatted()
        try:
            before = time.time()
            with host_with(ReportsImports(), start_method="spawn"):
                assert wait_until(lambda: logs.find("stdlib exception in the child"), timeout=30)
        finally:
            formatted.close()
        (report,) = logs.find("heavy modules in the child:")
        assert report["level"] == "WARNING" and report["service"] == "ReportsImports"
        assert report["process"] != os.getpid()
        (fields,) = formatted.find("heavy modules in the child:")
        stamp, name, function, line, service, level, _ = fields
        assert (name, function, service, level) == ("tests.light_services", "execute", "ReportsImports", "WARNING")
        assert int(line) > 0
        logged_at = time.mktime(time.strptime(stamp[:19], "%Y-%m-%d %H:%M:%S"))
        assert before - 2 <= logged_at <= time.time() + 1
        (caught,) = logs.find("stdlib exception in the child", level="ERROR")
        assert "KeyError: 'missing'" in caught["message"]
        heavy = report["message"].rsplit(": ", 1)[1]
        # Nothing of the host side is imported before the service logs: its first stdlib
        # record imports loguru, which then carries it (and every later one) to the host.
        assert heavy == "none"

    def test_loguru_imported_inside_execute_still_reaches_the_host(self, logs) -> None:
        """loguru imported again inside execute() is the child's bridged logger: no record lost, order kept."""
        from tests.light_services import ImportsLoguruLate

        with host_with(ImportsLoguruLate(), start_method="spawn"):
            assert wait_until(lambda: logs.find("stdlib after loguru"), timeout=30)
        mine = [r for r in logs.records if r["service"] == "ImportsLoguruLate" and r["process"] != os.getpid()]
        messages = [r["message"] for r in mine]
        assert messages[0].startswith("stdlib before loguru (loguru already imported: ")
        assert messages[1:] == ["loguru line 1", "stdlib after loguru", "loguru after the stop"]
        assert [r["level"] for r in mine] == ["WARNING", "INFO", "WARNING", "INFO"]
        assert len({r["process"] for r in mine}) == 1
        # The first stdlib record is what imports loguru: it was not there before.
        assert messages[0].endswith("already imported: False)")

    @pytest.mark.parametrize("method", ["forkserver", "spawn"])
    def test_a_service_that_never_logs_runs_without_loguru(self, tmp_path, method) -> None:
        """The child's log bridge does not import loguru: a service that never logs does not pay for it."""
        from tests.light_services import WritesImports

        report = tmp_path / "imports"
        with host_with(WritesImports(str(report)), start_method=method):
            assert wait_until(report.exists, timeout=30)
        assert report.read_text() == "none"

    @pytest.mark.parametrize("method", ["forkserver", "spawn"])
    def test_loguru_imported_only_inside_execute_reaches_the_host(self, logs, method) -> None:
        """A service module without loguru at its top logs through it inside execute(): the host gets the record."""
        from tests.light_services import LogsThroughLoguruLate

        with host_with(LogsThroughLoguruLate(), start_method=method):
            assert wait_until(lambda: logs.find("late loguru line"), timeout=30)
        (record,) = logs.find("late loguru line")
        assert record["message"] == "late loguru line (loguru imported before: False)"
        assert record["level"] == "WARNING" and record["service"] == "LogsThroughLoguruLate"
        assert record["process"] != os.getpid()

    def test_child_container_close_failure_reaches_the_host(self, logs) -> None:
        """A singleton failing to close in a spawned child is logged there and re-emitted by the host."""
        from tests.light_services import FailsToClose, UsesFailsToClose

        builder = HostBuilder(options=HostOptions(shutdown_timeout=10))
        builder.services.add_singleton(FailsToClose)
        builder.services.add_hosted_service(UsesFailsToClose, placement="process", start_method="spawn")
        with builder.build():
            assert wait_until(lambda: logs.find("running with FailsToClose"), timeout=30)
        (failed,) = logs.find("Closing the singleton service FailsToClose failed", level="WARNING")
        assert failed["process"] != os.getpid()
        assert "OSError: disk went away" in failed["message"]


class TestRecordsSentWithoutLoguru:
    def test_hostkit_own_line_from_a_child_is_reemitted_with_its_fields(self, logs) -> None:
        """hostkit's own child lines need no loguru in the child; the host re-emits them like any record."""
        from hostkit._process.logbridge import ChildLog, reemit
        from hostkit._process.protocol import LogRecord

        class Channel:
            def __init__(self) -> None:
                self.sent: list[Any] = []

            def send(self, message: Any) -> None:
                self.sent.append(message)

        channel = Channel()
        forwarder = ChildLog(channel, "svc", "hostkit-svc-1")
        try:
            raise OSError("closing failed")
        except OSError as exc:
            forwarder.warning("Closing the child's singletons failed", exc)
        (data,) = channel.sent
        assert isinstance(data, LogRecord) and isinstance(data.time, float)
        formatted = Formatted()
        try:
            reemit(data, 4242, "svc")
        finally:
            formatted.close()
        (fields,) = formatted.find("Closing the child's singletons failed")
        stamp, name, function, _line, service, level, _message = fields
        assert (name, service, level) == ("hostkit._process.logbridge", "svc", "WARNING")
        assert function == "test_hostkit_own_line_from_a_child_is_reemitted_with_its_fields"
        assert abs(time.mktime(time.strptime(stamp[:19], "%Y-%m-%d %H:%M:%S")) - data.time) < 2
        (record,) = logs.find("Closing the child's singletons failed")
        assert record["process"] == 4242 and "OSError: closing failed" in record["message"]


class TestStartMethod:
    @pytest.mark.parametrize("where", ["host", "service"])
    def test_start_method_set_per_host_or_per_service(self, where, logs) -> None:
        """HostOptions.start_method applies to every child; start_method= overrides it per service."""
        if where == "host":
            host = host_with(Sleeper(), options={"start_method": "spawn"})
        else:
            host = host_with(Sleeper(), start_method="spawn")
        with host:
            assert wait_until(lambda: host.status()["Sleeper"].pid not in (None, os.getpid()), timeout=30)
        assert logs.find(", spawn)", level="DEBUG")  # no state holds the start method: the log line says it


class TestBadInput:
    def test_unknown_start_method(self) -> None:
        """An unknown start method fails at registration, listing the known ones."""
        with pytest.raises(ConfigurationError, match=r"start_method must be one of 'forkserver', 'spawn', 'fork'"):
            HostBuilder().add_hosted_service(Sleeper, placement="process", start_method="vfork")
        with pytest.raises(ConfigurationError, match=r"HostOptions.start_method must be one of"):
            HostOptions(start_method="threads")

    def test_non_integer_nice(self) -> None:
        """A nice value that is not an int from -20 to 19 fails at registration."""
        with pytest.raises(ConfigurationError, match=r"nice must be an int from -20 to 19, not: 2.5 \(float\)"):
            HostBuilder().add_hosted_service(Sleeper, placement="process", nice=2.5)  # type: ignore[arg-type]

    def test_empty_affinity(self) -> None:
        """An empty CPU set fails at registration."""
        with pytest.raises(ConfigurationError, match=r"cpu_affinity must be a non-empty set of CPU numbers"):
            HostBuilder().add_hosted_service(Sleeper, placement="process", cpu_affinity=set())


class TestCpuHeavyExample:
    @pytest.mark.timeout(90)
    @pytest.mark.parametrize("placement", ["process", "thread"])
    def test_one_argument_moves_the_work_out_of_the_host(self, spawn, placement) -> None:
        """examples/cpu_heavy.py: the same class runs in a child or in the host; SIGTERM exits 0 either way."""
        proc = spawn(python("examples/cpu_heavy.py", "--placement", placement))
        proc.wait_for_output("primes below", timeout=60)
        proc.signal(signal.SIGTERM)
        code = proc.wait(30)
        text = proc.output
        assert code == 0, text
        worker = int(re.search(r"primes below [\d,]+ \(pid (\d+)\)", text).group(1))  # type: ignore[union-attr]
        assert (worker != proc.pid) is (placement == "process"), text
        assert "Background service 'PrimeCounter' stopped" in text
        assert "(exit code 0)" in text and "Traceback" not in text
