"""The host's life: start order, hooks, rollback, completion, lifetime events, status, stop callers."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from hostkit import (
    ApplicationLifetime,
    BackgroundService,
    CancellationToken,
    CancellationTokenSource,
    HostBuilder,
    HostedService,
    HostOptions,
    HostState,
    ServiceState,
)
from hostkit._runners import Runner
from hostkit._runners._base import runner_for
from hostkit.exceptions import ConfigurationError, HostStartupError, HostStateError
from tests.conftest import wait_until


class Journal:
    """A thread-safe list of what happened, in order."""

    def __init__(self) -> None:
        self._items: list[str] = []
        self._lock = threading.Lock()

    def add(self, item: str) -> None:
        with self._lock:
            self._items.append(item)

    @property
    def items(self) -> list[str]:
        with self._lock:
            return list(self._items)


def recording_service(journal: Journal, name: str, *, hooks: bool = False) -> HostedService:
    """A hosted service that records its calls as '<name>.<method>'."""

    class Recording(HostedService):
        def start(self, token: CancellationToken) -> None:
            journal.add(f"{name}.start")

        def stop(self, token: CancellationToken) -> None:
            journal.add(f"{name}.stop")

    if hooks:

        class WithHooks(Recording):
            def starting(self, token: CancellationToken) -> None:
                journal.add(f"{name}.starting")

            def started(self, token: CancellationToken) -> None:
                journal.add(f"{name}.started")

            def stopping(self, token: CancellationToken) -> None:
                journal.add(f"{name}.stopping")

            def stopped(self, token: CancellationToken) -> None:
                journal.add(f"{name}.stopped")

        return WithHooks()
    return Recording()


class Loop(BackgroundService):
    """A background loop that records its start and end and waits on its token."""

    def __init__(self, journal: Journal, name: str) -> None:
        self.journal = journal
        self.label = name
        self.running = threading.Event()

    def execute(self, stopping: CancellationToken) -> None:
        self.journal.add(f"{self.label}.execute")
        self.running.set()
        stopping.wait()
        self.journal.add(f"{self.label}.end")


def build(*services: HostedService, **options: object):  # type: ignore[no-untyped-def]
    opts = {"shutdown_timeout": 10.0, **options}
    builder = HostBuilder(options=HostOptions(**opts))  # type: ignore[arg-type]
    for i, service in enumerate(services):
        builder.services.add_hosted_service(service, name=f"s{i}")
    return builder.build()


class TestOrder:
    def test_services_start_in_registration_order_and_stop_in_reverse(self) -> None:
        """start() calls follow registration order; stop() calls the reverse."""
        journal = Journal()
        host = build(*(recording_service(journal, n) for n in "abc"))
        host.start()
        assert journal.items == ["a.start", "b.start", "c.start"]
        host.stop()
        assert journal.items[3:] == ["c.stop", "b.stop", "a.stop"]

    def test_hooks_follow_the_dotnet_lifecycle_order(self) -> None:
        """Every starting, then every start, then every started; at stop every stopping, stop, stopped in reverse."""
        journal = Journal()
        host = build(recording_service(journal, "a", hooks=True), recording_service(journal, "b", hooks=True))
        with host:
            pass
        assert journal.items == [
            "a.starting",
            "b.starting",
            "a.start",
            "b.start",
            "a.started",
            "b.started",
            "b.stopping",
            "a.stopping",
            "b.stop",
            "a.stop",
            "b.stopped",
            "a.stopped",
        ]

    def test_lifetime_started_fires_after_every_start_returned(self) -> None:
        """lifetime.started is set only once every start() has returned."""
        journal = Journal()
        seen_started: list[bool] = []

        class Probe(HostedService):
            def start(self, token: CancellationToken) -> None:
                seen_started.append(host.lifetime.started.is_set())

        host = build(Probe(), recording_service(journal, "b"))
        host.lifetime.started.register(lambda: journal.add("lifetime.started"))
        with host:
            assert host.lifetime.started.is_set()
        assert seen_started == [False]
        assert journal.items[:2] == ["b.start", "lifetime.started"]

    def test_lifetime_events_in_order(self) -> None:
        """started, then stopping, then stopped fire in that order, each once."""
        journal = Journal()
        host = build(recording_service(journal, "a"))
        for event in ("started", "stopping", "stopped"):
            getattr(host.lifetime, event).register(lambda event=event: journal.add(event))
        with host:
            assert journal.items == ["a.start", "started"]
        assert journal.items == ["a.start", "started", "stopping", "a.stop", "stopped"]

    def test_background_services_are_all_signalled_before_any_stop_waits(self) -> None:
        """At stop every background service's token is set before the host waits on the first one."""
        journal = Journal()
        seen: dict[str, dict[str, bool]] = {}

        class Observed(Loop):
            def stop(self, token: CancellationToken) -> None:
                # What the host has told the others by the time it waits on this one.
                seen[self.label] = {loop.label: loop.execute_token.is_set() for loop in loops}
                super().stop(token)

            def execute(self, stopping: CancellationToken) -> None:
                self.execute_token = stopping
                super().execute(stopping)

        loops = [Observed(journal, n) for n in ("x", "y", "z")]
        host = build(*loops)
        with host:
            for loop in loops:
                assert loop.running.wait(10)
        # z is waited on first (reverse order); x and y had been told already.
        assert seen["z"] == {"x": True, "y": True, "z": True}
        assert sorted(journal.items[3:]) == ["x.end", "y.end", "z.end"]
        assert all(host.status()[f"s{i}"].state is ServiceState.STOPPED for i in range(3))


class TestStartFailure:
    def test_failed_start_rolls_back_and_names_the_service(self, logs) -> None:
        """A start() that raises stops the services already started (reverse order) and names the failing one."""
        journal = Journal()

        class Broken(HostedService):
            def start(self, token: CancellationToken) -> None:
                raise ConnectionError("database unreachable")

            def stop(self, token: CancellationToken) -> None:
                journal.add("broken.stop")

        host = build(
            recording_service(journal, "a"), recording_service(journal, "b"), Broken(), recording_service(journal, "d")
        )
        with pytest.raises(
            HostStartupError,
            match=r"hosted service 's2' failed to start: ConnectionError: database unreachable; "
            r"the 2 service\(s\) already started were stopped",
        ) as info:
            host.start()
        assert info.value.service == "s2"
        assert isinstance(info.value.__cause__, ConnectionError)
        assert journal.items == ["a.start", "b.start", "b.stop", "a.stop"]
        assert host.state is HostState.STOPPED
        assert host.exit_code == 3
        assert host.lifetime.stopped.is_set() and not host.lifetime.started.is_set()
        status = host.status()
        assert status["s2"].state is ServiceState.FAULTED
        assert status["s2"].error == "ConnectionError: database unreachable"
        assert "database unreachable" in (status["s2"].traceback or "")
        assert status["s3"].state is ServiceState.CREATED
        assert status["s0"].state is ServiceState.STOPPED
        assert logs.find("Hosted service 's2' failed to start: ConnectionError: database unreachable", "CRITICAL")

    def test_failed_start_stops_started_background_services(self) -> None:
        """A background service already running is stopped when a later start() fails."""
        journal = Journal()
        loop = Loop(journal, "loop")

        class Broken(HostedService):
            def start(self, token: CancellationToken) -> None:
                assert loop.running.wait(10)
                raise RuntimeError("nope")

        host = build(loop, Broken())
        with pytest.raises(HostStartupError, match="'s1' failed to start: RuntimeError: nope"):
            host.start()
        assert journal.items == ["loop.execute", "loop.end"]
        assert host.status()["s0"].state is ServiceState.STOPPED

    def test_failing_starting_hook_aborts_start_up(self) -> None:
        """A lifecycle hook that raises aborts start-up like start() does, before any start() ran."""
        journal = Journal()

        class BadHook(HostedService):
            def starting(self, token: CancellationToken) -> None:
                raise ValueError("bad config")

        host = build(recording_service(journal, "a", hooks=True), BadHook())
        with pytest.raises(HostStartupError, match="'s1' failed to start: ValueError: bad config"):
            host.start()
        assert journal.items == ["a.starting"]


class TestCompletion:
    def test_execute_returning_marks_completed_and_host_runs_on(self, logs) -> None:
        """A background service whose execute returns is COMPLETED, logged, and the others keep running."""
        journal = Journal()
        done = threading.Event()

        class OneShot(BackgroundService):
            def execute(self, stopping: CancellationToken) -> None:
                journal.add("oneshot")
                done.set()

        loop = Loop(journal, "loop")
        host = build(OneShot(), loop)
        with host:
            assert done.wait(10)
            assert wait_until(lambda: host.status()["s0"].state is ServiceState.COMPLETED)
            assert host.state is HostState.RUNNING
            assert not host.lifetime.stopping.is_set()
            assert host.status()["s1"].state is ServiceState.RUNNING
            assert host.status()["s0"].stopped_at is not None
        assert host.exit_code == 0
        assert logs.find("Background service 's0' completed", "INFO")[0]["service"] == "s0"


class TestStartThenStop:
    def test_stop_immediately_after_start_stops_cleanly(self) -> None:
        """A worker stopped right after start() still stops cleanly: execute sees a set token and returns."""
        for _ in range(20):
            journal = Journal()
            host = build(Loop(journal, "loop"))
            host.start()
            host.stop()
            assert host.state is HostState.STOPPED
            assert host.status()["s0"].state is ServiceState.STOPPED
            assert host.exit_code == 0
            assert journal.items in (["loop.execute", "loop.end"], [])

    def test_stop_application_before_start_ends_start_up_early(self) -> None:
        """stop_application() before start(): start returns, starting nothing more, and the host stops."""
        journal = Journal()
        host = build(recording_service(journal, "a"))
        host.lifetime.stop_application()
        host.start()
        host.stop()
        assert host.state is HostState.STOPPED
        assert journal.items == []
        assert not host.lifetime.started.is_set()

    def test_stop_during_a_slow_start_waits_then_stops(self) -> None:
        """stop() from another thread while start() is running: the start finishes, then everything stops."""
        journal = Journal()
        entered, release = threading.Event(), threading.Event()

        class SlowStart(HostedService):
            def start(self, token: CancellationToken) -> None:
                entered.set()
                release.wait(10)
                journal.add("slow.start")

            def stop(self, token: CancellationToken) -> None:
                journal.add("slow.stop")

        host = build(SlowStart(), recording_service(journal, "b"))
        starter = threading.Thread(target=host.start)
        starter.start()
        assert entered.wait(10)
        stopper = threading.Thread(target=host.stop)
        stopper.start()
        assert wait_until(lambda: host.lifetime.stopping.is_set())
        release.set()
        starter.join(10)
        stopper.join(10)
        assert not stopper.is_alive()
        # b never started: the stop request ended start-up after the slow start returned.
        assert journal.items == ["slow.start", "slow.stop"]
        assert host.state is HostState.STOPPED

    def test_stop_during_a_start_that_then_fails_stops_once(self) -> None:
        """stop() waiting for a start-up that then fails returns after the rollback, stopping nothing twice."""
        journal = Journal()
        entered, release = threading.Event(), threading.Event()

        class FailsLate(HostedService):
            def start(self, token: CancellationToken) -> None:
                entered.set()
                release.wait(10)
                raise RuntimeError("late failure")

        host = build(recording_service(journal, "a"), FailsLate())
        errors: list[BaseException] = []

        def starter() -> None:
            try:
                host.start()
            except HostStartupError as err:
                errors.append(err)

        start_thread = threading.Thread(target=starter)
        start_thread.start()
        assert entered.wait(10)
        stop_thread = threading.Thread(target=host.stop)
        stop_thread.start()
        assert wait_until(lambda: host.lifetime.stopping.is_set())
        release.set()
        start_thread.join(10)
        stop_thread.join(10)
        assert not stop_thread.is_alive()
        assert len(errors) == 1 and "late failure" in str(errors[0])
        assert journal.items == ["a.start", "a.stop"]
        assert host.exit_code == 3


class TestStopCallers:
    def test_stop_before_start_is_a_no_op(self) -> None:
        """stop() on a host that never started does nothing and raises nothing."""
        journal = Journal()
        host = build(recording_service(journal, "a"))
        host.stop()
        assert host.state is HostState.CREATED
        assert journal.items == []
        host.start()
        host.stop()
        assert journal.items == ["a.start", "a.stop"]

    def test_stop_is_idempotent(self) -> None:
        """A second stop() after the first finished does nothing more."""
        journal = Journal()
        host = build(recording_service(journal, "a"))
        host.start()
        host.stop()
        host.stop()
        assert journal.items == ["a.start", "a.stop"]

    def test_concurrent_stop_callers_all_wait_for_one_stop(self) -> None:
        """Many threads calling stop() at once: the services stop once, and every caller returns after it finished."""
        journal = Journal()
        release = threading.Event()

        class SlowStop(HostedService):
            def stop(self, token: CancellationToken) -> None:
                journal.add("stop")
                release.wait(10)

        host = build(SlowStop())
        host.start()
        returned: list[bool] = []
        barrier = threading.Barrier(5)

        def caller() -> None:
            barrier.wait()
            host.stop()
            returned.append(host.lifetime.stopped.is_set())

        threads = [threading.Thread(target=caller) for _ in range(5)]
        for t in threads:
            t.start()
        assert wait_until(lambda: journal.items == ["stop"])
        assert returned == []  # nobody returns while the stop is in progress
        assert host.status()["s0"].state is ServiceState.STOPPING
        release.set()
        for t in threads:
            t.join(10)
        assert returned == [True] * 5
        assert journal.items == ["stop"]

    def test_stop_application_is_idempotent_and_works_from_any_thread(self) -> None:
        """stop_application() from a service's own thread stops the host; calling it again is harmless."""
        journal = Journal()

        class Quitter(BackgroundService):
            def execute(self, stopping: CancellationToken) -> None:
                assert host.lifetime.started.wait(10)
                host.lifetime.stop_application()
                host.lifetime.stop_application()
                stopping.wait(10)
                journal.add("quitter.end")

        host = build(Quitter(), recording_service(journal, "b"))
        host.start()
        assert host.lifetime.stopped.wait(10)
        host.stop()  # joins the stop already done
        # b.stop and quitter.end overlap: the quitter was signalled before any stop() ran.
        assert journal.items[0] == "b.start"
        assert sorted(journal.items[1:]) == ["b.stop", "quitter.end"]
        assert host.state is HostState.STOPPED
        assert host.exit_code == 0

    @pytest.mark.timeout(30)
    def test_stop_from_another_thread_ends_run_on_the_main_thread(self) -> None:
        """host.stop() from any thread while run() waits for signals on the main thread makes run() return."""
        journal = Journal()
        host = build(recording_service(journal, "a"))

        def stopper() -> None:
            assert host.lifetime.started.wait(10)
            host.stop()

        thread = threading.Thread(target=stopper)
        thread.start()
        assert host.run() == 0
        thread.join(10)
        assert journal.items == ["a.start", "a.stop"]

    @pytest.mark.timeout(30)
    def test_setting_the_stopping_token_directly_ends_run(self) -> None:
        """Code that sets lifetime.stopping itself (instead of stop_application()) still ends run()."""
        host = build(recording_service(Journal(), "a"))
        thread = threading.Thread(target=lambda: host.lifetime.started.wait(10) and host.lifetime.stopping.set())
        thread.start()
        assert host.run() == 0
        thread.join(10)
        assert host.state is HostState.STOPPED

    def test_stop_from_inside_execute_stops_the_host(self) -> None:
        """host.stop() called by a service's own execute asks for the stop instead of waiting for itself."""
        returned = threading.Event()

        class SelfStopper(BackgroundService):
            def execute(self, stopping: CancellationToken) -> None:
                assert host.lifetime.started.wait(10)
                host.stop()  # returns at once: the stop runs on another thread
                returned.set()
                stopping.wait(10)

        host = build(SelfStopper())
        host.start()
        assert returned.wait(10)
        assert host.lifetime.stopped.wait(10)
        host.stop()
        assert host.status()["s0"].state is ServiceState.STOPPED

    def test_stop_from_inside_a_start_does_not_deadlock(self) -> None:
        """A start() that calls host.stop() (a fatal condition found at start) does not hang the host."""
        journal = Journal()

        class Abort(HostedService):
            def start(self, token: CancellationToken) -> None:
                host.stop()
                journal.add("abort.start")

        host = build(Abort(), recording_service(journal, "b"))
        finished = threading.Event()

        def run_start() -> None:
            host.start()
            finished.set()

        thread = threading.Thread(target=run_start)
        thread.start()
        assert finished.wait(10), "start() hung after a service called host.stop() from start()"
        thread.join(10)
        assert host.lifetime.stopped.wait(10)
        assert "b.start" not in journal.items
        host.stop()
        assert host.state is HostState.STOPPED


class TestRunOnce:
    def test_start_twice_is_refused(self) -> None:
        """A host starts once: a second start() names the state and the fix."""
        host = build()
        host.start()
        with pytest.raises(
            HostStateError, match=r"Host.start\(\) was called on a host that is already running; a Host starts once"
        ):
            host.start()
        host.stop()
        with pytest.raises(HostStateError, match=r"already stopped.*Build a new Host with HostBuilder\.build"):
            host.start()


class TestContextManager:
    def test_context_manager_starts_and_stops(self) -> None:
        """with host: starts it on entry and stops it on exit, even when the block raises."""
        journal = Journal()
        host = build(recording_service(journal, "a"))
        with pytest.raises(KeyError), host as entered:
            assert entered is host
            assert host.state is HostState.RUNNING
            raise KeyError("in block")
        assert host.state is HostState.STOPPED
        assert journal.items == ["a.start", "a.stop"]


class TestInjection:
    def test_services_get_the_hosts_lifetime_injected(self) -> None:
        """A service class asking for ApplicationLifetime in its constructor gets the host's own."""
        seen: list[ApplicationLifetime] = []

        class Watcher(BackgroundService):
            def __init__(self, lifetime: ApplicationLifetime) -> None:
                self.lifetime = lifetime

            def execute(self, stopping: CancellationToken) -> None:
                seen.append(self.lifetime)
                self.lifetime.stopping.wait(10)  # winds down on the host's stopping event

        builder = HostBuilder(options=HostOptions(shutdown_timeout=5))
        builder.services.add_hosted_service(Watcher)
        host = builder.build()
        with host:
            assert wait_until(lambda: seen)
        assert seen == [host.lifetime]
        assert host.status()["Watcher"].state is ServiceState.STOPPED


class TestGarbage:
    def test_running_host_collected_warns(self) -> None:
        """A host garbage-collected while running warns with ResourceWarning, saying how to avoid it."""
        import gc

        host = build()
        host.start()
        with pytest.warns(ResourceWarning, match="was garbage-collected while still running; call stop"):
            del host
            gc.collect()


class TestStatus:
    def test_snapshot_of_every_service(self) -> None:
        """The status snapshot names each service with placement, state and times."""
        journal = Journal()
        loop = Loop(journal, "loop")
        host = build(recording_service(journal, "a"), loop)
        before = time.time()
        status = host.status()
        assert status.state is HostState.CREATED
        assert [s.state for s in status.services] == [ServiceState.CREATED, ServiceState.CREATED]
        with host:
            assert loop.running.wait(10)
            status = host.status()
            assert status.state is HostState.RUNNING
            a, b = status["s0"], status["s1"]
            assert (a.kind, a.placement, a.state) == ("hosted", None, ServiceState.RUNNING)
            assert (b.kind, b.placement, b.state) == ("background", "thread", ServiceState.RUNNING)
            assert b.started_at is not None and b.started_at >= before
            assert b.stopped_at is None
            assert b.thread_id is not None
        status = host.status()
        assert status.state is HostState.STOPPED
        assert status["s1"].state is ServiceState.STOPPED
        assert status["s1"].stopped_at is not None and status["s1"].stopped_at >= status["s1"].started_at
        data = status.to_dict()
        assert data["state"] == "stopped" and data["exit_code"] == 0
        assert data["services"][1]["state"] == "stopped"
        assert data["services"][1]["started_at"].endswith("+00:00")

    def test_unknown_name_lists_the_known_ones(self) -> None:
        """Looking up a missing service name says which names exist."""
        host = build(recording_service(Journal(), "a"))
        with pytest.raises(KeyError, match="no service named 'nope'; the host has: s0"):
            host.status()["nope"]

    def test_repr_shows_state_and_counts(self) -> None:
        """repr(host) shows its state, the number of services and how many run."""
        host = build(recording_service(Journal(), "a"))
        assert repr(host) == "<Host created services=1 running=0 exit_code=0>"
        with host:
            assert repr(host) == "<Host running services=1 running=1 exit_code=0>"


class TestConcurrentOptions:
    def _barrier_service(self, barrier: threading.Barrier, method: str, journal: Journal) -> HostedService:
        class Meet(HostedService):
            def start(self, token: CancellationToken) -> None:
                if method == "start":
                    barrier.wait(10)
                journal.add("start")

            def stop(self, token: CancellationToken) -> None:
                if method == "stop":
                    barrier.wait(10)
                journal.add("stop")

        return Meet()

    def test_start_concurrently_runs_every_start_at_once(self) -> None:
        """With start_concurrently, every start() runs at the same time (they meet at a barrier)."""
        barrier = threading.Barrier(3)
        journal = Journal()
        host = build(*(self._barrier_service(barrier, "start", journal) for _ in range(3)), start_concurrently=True)
        with host:
            assert journal.items == ["start"] * 3
        assert not barrier.broken

    def test_stop_concurrently_runs_every_stop_at_once(self) -> None:
        """With stop_concurrently, every stop() runs at the same time (they meet at a barrier)."""
        barrier = threading.Barrier(3)
        journal = Journal()
        host = build(*(self._barrier_service(barrier, "stop", journal) for _ in range(3)), stop_concurrently=True)
        with host:
            pass
        assert journal.items.count("stop") == 3
        assert not barrier.broken

    def test_start_concurrently_failure_rolls_back(self) -> None:
        """A failing start among concurrent ones still rolls back the ones that started."""
        journal = Journal()

        class Broken(HostedService):
            def start(self, token: CancellationToken) -> None:
                raise OSError("port in use")

        host = build(recording_service(journal, "a"), Broken(), start_concurrently=True)
        with pytest.raises(HostStartupError, match="'s1' failed to start: OSError: port in use"):
            host.start()
        assert journal.items == ["a.start", "a.stop"]


def _noop(_: Callable[[], None]) -> None:  # keeps the Callable import used by type checkers
    return None


class NotesStoppingCallback(HostedService):
    """Registers a slow callback on lifetime.stopping, as a service watching for the stop does.

    The callback gives a host that does not wait for it a whole second to finish its stop
    meanwhile: it notes whether ``lifetime.stopped`` fired while it was still running.
    """

    def __init__(self, lifetime: ApplicationLifetime, journal: Journal) -> None:
        self.lifetime = lifetime
        self.journal = journal

    def start(self, token: CancellationToken) -> None:
        self.lifetime.stopping.register(self.on_stopping)

    def on_stopping(self) -> None:
        self.journal.add("callback.begin")
        if self.lifetime.stopped.wait(1.0):
            self.journal.add("lifetime.stopped fired during the callback")
        self.journal.add("callback.end")

    def stopping(self, token: CancellationToken) -> None:
        self.journal.add("stopping hook")

    def stop(self, token: CancellationToken) -> None:
        self.journal.add("stop")


class TestLifetimeOrder:
    """.NET's order: the stopping callbacks finish, then the stop phase, then lifetime.stopped, then run() returns."""

    @staticmethod
    def _host(journal: Journal, **options: object):  # type: ignore[no-untyped-def]
        builder = HostBuilder(options=HostOptions(**{"shutdown_timeout": 10.0, **options}))  # type: ignore[arg-type]
        builder.services.add_singleton(Journal, instance=journal)
        builder.services.add_hosted_service(NotesStoppingCallback)
        host = builder.build()
        host.lifetime.stopped.register(lambda: journal.add("lifetime.stopped"))
        return host

    @staticmethod
    def _stop_from_another_thread(host) -> threading.Thread:  # type: ignore[no-untyped-def]
        def stop() -> None:
            if host.lifetime.started.wait(10):
                host.lifetime.stop_application()  # runs the stopping callbacks on this thread

        thread = threading.Thread(target=stop, name="test-stopper")
        thread.start()
        return thread

    EXPECTED = ["callback.begin", "callback.end", "stopping hook", "stop", "lifetime.stopped"]

    @pytest.mark.timeout(30)
    def test_run_on_the_main_thread_waits_for_the_callbacks(self) -> None:
        """run() (signals on the main thread) stops only after a callback run by the stopping thread returned."""
        journal = Journal()
        host = self._host(journal)
        stopper = self._stop_from_another_thread(host)
        assert host.run() == 0
        journal.add("run returned")
        stopper.join(10)
        assert journal.items == [*self.EXPECTED, "run returned"]

    @pytest.mark.timeout(30)
    def test_run_off_the_main_thread_waits_for_the_callbacks(self) -> None:
        """The same when run() waits on another thread, without signal handling."""
        journal = Journal()
        host = self._host(journal)
        codes: list[int] = []

        def run() -> None:
            codes.append(host.run())
            journal.add("run returned")

        runner = threading.Thread(target=run, name="test-run")
        runner.start()
        stopper = self._stop_from_another_thread(host)
        runner.join(20)
        stopper.join(10)
        assert codes == [0]
        assert journal.items == [*self.EXPECTED, "run returned"]

    @pytest.mark.timeout(30)
    def test_started_host_stopped_through_the_lifetime_waits_for_the_callbacks(self) -> None:
        """After start(), stop_application() from another thread: lifetime.stopped fires after the callbacks."""
        journal = Journal()
        host = self._host(journal)
        host.start()
        stopper = self._stop_from_another_thread(host)
        assert host.lifetime.stopped.wait(20)
        journal.add("stopped seen")
        stopper.join(10)
        host.stop()
        assert journal.items == [*self.EXPECTED, "stopped seen"]

    @pytest.mark.timeout(30)
    def test_a_callback_past_the_budget_is_named_and_the_stop_goes_on(self, logs) -> None:
        """A stopping callback that does not return is waited for within the budget only, then named with its stack."""
        release = threading.Event()
        journal = Journal()

        def stuck_in_stopping_callback() -> None:
            release.wait(20)

        host = self._host(journal, shutdown_timeout=1.0)
        host.lifetime.stopping.register(stuck_in_stopping_callback)
        stopper = self._stop_from_another_thread(host)
        try:
            began = time.monotonic()
            assert host.run() == 0
            took = time.monotonic() - began
        finally:
            release.set()
            stopper.join(10)
        assert "stop" in journal.items and "lifetime.stopped" in journal.items
        errors = logs.find("A lifetime.stopping callback was still running", level="ERROR")
        assert len(errors) == 1
        assert "stuck_in_stopping_callback" in errors[0]["message"]
        assert took < 8, f"the stop took {took:.1f} s with a 1 s budget"

    @pytest.mark.timeout(30)
    def test_a_callback_that_stops_the_host_does_not_wait_for_itself(self, logs) -> None:
        """host.stop() called from a stopping callback asks for the stop and returns; nothing waits out the budget."""
        journal = Journal()
        host = self._host(journal)
        host.lifetime.stopping.register(host.stop)
        stopper = self._stop_from_another_thread(host)
        began = time.monotonic()
        assert host.run() == 0
        took = time.monotonic() - began
        stopper.join(10)
        assert journal.items == self.EXPECTED
        assert not logs.find("still running", level="ERROR")
        assert took < 6, f"run() took {took:.1f} s: the stop waited for the callback that waited for the stop"


class TestOwnLifetimeAndOptions:
    def test_registering_an_application_lifetime_is_refused_at_build(self) -> None:
        """The host always uses its own lifetime: registering another one fails at build(), saying what to do."""
        builder = HostBuilder()
        builder.services.add_singleton(ApplicationLifetime, instance=ApplicationLifetime())
        with pytest.raises(ConfigurationError) as info:
            builder.build()
        assert str(info.value) == (
            "ApplicationLifetime is registered in the services, but a host always uses its own lifetime and would "
            "ignore this one. Remove the registration: a service that needs the lifetime takes an "
            "ApplicationLifetime parameter and gets the host's own injected (or use host.lifetime)"
        )

    def test_registering_host_options_is_refused_at_build(self) -> None:
        """The host takes its options from the builder: registering HostOptions fails at build(), saying where."""
        builder = HostBuilder()
        builder.services.add_singleton(HostOptions, factory=lambda: HostOptions(shutdown_timeout=5))
        with pytest.raises(ConfigurationError) as info:
            builder.build()
        assert str(info.value) == (
            "HostOptions is registered in the services, but a host takes its options from the builder and would "
            "ignore this registration. Remove it and set the options on the builder: "
            "HostBuilder(options=HostOptions(...)) or builder.configure_options(...); a service that needs them "
            "takes a HostOptions parameter and gets the builder's injected"
        )

    def test_the_builders_options_are_injected(self) -> None:
        """A service asking for HostOptions gets the very options the host runs with."""
        seen: list[HostOptions] = []

        class Reads(HostedService):
            def __init__(self, options: HostOptions) -> None:
                seen.append(options)

        builder = HostBuilder(options=HostOptions(shutdown_timeout=7))
        builder.services.add_hosted_service(Reads)
        host = builder.build()
        with host:
            pass
        assert seen == [host.options]
        assert host.options.shutdown_seconds == 7.0


class MarksItsToken(BackgroundService):
    """Notes in files (readable from a child process too) that it ran and that its token was cancelled."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def execute(self, stopping: CancellationToken) -> None:
        Path(self.folder, "cancelled-at-entry" if stopping.is_set() else "running").touch()
        if stopping.wait(30):
            Path(self.folder, "cancelled").touch()


class TestStartToken:
    """As in .NET, the token given to BackgroundService.start() is linked into execute's stopping token."""

    def test_an_already_cancelled_start_token_cancels_execute_from_its_first_line(self, tmp_path: Path) -> None:
        """start() with a cancelled token: execute gets a cancelled token and the run ends as stopped."""
        service = MarksItsToken(str(tmp_path))
        source = CancellationTokenSource()
        source.cancel()
        service.start(source.token)
        runner = runner_for(service)
        assert isinstance(runner, Runner)
        ended = runner.ended
        try:
            assert ended.wait(10), "execute ignored the cancelled start token"
        finally:
            service.stop(CancellationTokenSource(cancel_after=10).token)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["cancelled", "cancelled-at-entry"]

    def test_cancelling_the_start_token_later_cancels_execute(self, tmp_path: Path) -> None:
        """start() returns; cancelling its token afterwards sets execute's stopping token."""
        service = MarksItsToken(str(tmp_path))
        with CancellationTokenSource(name="start") as source:
            service.start(source.token)
            try:
                assert wait_until(lambda: (tmp_path / "running").exists())
                source.cancel()
                assert wait_until(lambda: (tmp_path / "cancelled").exists()), "execute ignored the start token"
            finally:
                service.stop(CancellationTokenSource(cancel_after=10).token)

    def test_a_plain_event_is_refused_as_the_start_token(self) -> None:
        """A threading.Event cannot tell anyone it was set: start() refuses it rather than ignore it."""
        service = MarksItsToken("/nonexistent")
        with pytest.raises(TypeError, match=r"start\(\) needs a CancellationToken"):
            service.start(threading.Event())  # type: ignore[arg-type]

    @pytest.mark.timeout(60)
    @pytest.mark.parametrize("placement", ["thread", "process"])
    def test_start_token_cancelled_during_start_up_cancels_execute_in_every_placement(
        self, placement: str, tmp_path: Path
    ) -> None:
        """Through the host: a stop asked during start-up cancels the start token, and so a started service's execute.

        The service registered after it sees the cancellation reach execute (in its thread, or
        in its child process) before its own start() returns, that is before the host's stop.
        """
        seen: list[bool] = []

        class AbortsStartUp(HostedService):
            def start(self, token: CancellationToken) -> None:
                assert wait_until(lambda: (tmp_path / "running").exists(), timeout=30)
                host.lifetime.stop_application()
                seen.append(wait_until(lambda: (tmp_path / "cancelled").exists(), timeout=10))

        builder = HostBuilder(options=HostOptions(shutdown_timeout=10))
        builder.services.add_hosted_service(MarksItsToken(str(tmp_path)), placement=placement)
        builder.services.add_hosted_service(AbortsStartUp())
        host = builder.build()
        host.start()
        host.stop()
        assert seen == [True], "execute was cancelled only by the stop, not by the start token"
        assert host.status()["MarksItsToken"].state is ServiceState.STOPPED
        assert host.exit_code == 0

    def test_process_placement_with_a_cancelled_start_token_starts_no_child(self, tmp_path: Path) -> None:
        """A process-placed service started with a cancelled token never starts its child, and counts as stopped."""
        service = MarksItsToken(str(tmp_path))
        builder = HostBuilder(options=HostOptions(shutdown_timeout=10))
        builder.services.add_hosted_service(service, placement="process")
        host = builder.build()
        source = CancellationTokenSource()
        source.cancel()
        service.start(source.token)  # the service's own API, as a .NET test calls StartAsync
        service.stop(CancellationTokenSource(cancel_after=10).token)
        assert host.status()["MarksItsToken"].state is ServiceState.STOPPED
        assert list(tmp_path.iterdir()) == [], "execute ran in a child"
