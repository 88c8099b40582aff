"""The Host: start in order, stop in reverse within one budget, report everything.

Start: every service's ``starting`` hook, then every ``start``, then every
``started`` (registration order, or all at once with ``start_concurrently``);
then ``lifetime.started``. A ``start`` that raises, or start-up passing
``startup_timeout``, stops what had started (reverse order) and raises
:class:`~hostkit.exceptions.HostStartupError` naming the service.

Stop: ``lifetime.stopping``, whose callbacks are let finish within the budget
(they may be running on the thread that asked for the stop); then every
background service's token is set, all *first*, so they wind down in parallel;
then ``stopping``/``stop``/``stopped`` hooks in reverse order, all sharing one
deadline. A hook we did not write runs on a helper thread so a hung one cannot
keep the others from being attempted. At the deadline, every service still
running is logged with where it is stuck, and escalated (a child process is
terminated, then killed; a thread is abandoned). Then ``lifetime.stopped``.

The Host holds the state and the order; each step has its own module::

    Host.__init__  records (+ runner per background service, in the runner table)
    Host.run       SignalWatch; signals_read_meanwhile() while start() may block  (_signals)
    Host.start     StartPhases: starting / start / started, the culprit of a failure (_starting)
                   every call through LifecycleCalls: deadline, helper thread         (_calls)
    Host.stop      await_stopping_callbacks, stop_services: the budget's slices     (_stopping)
    Host.reload    Reloader: every reload() at once, one deadline, coalesced         (_reloading)
                   (SIGHUP in run() asks for one; it never stops the host)
"""

from __future__ import annotations

import enum
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from datetime import timedelta

from loguru import logger

from ._calls import LifecycleCalls
from ._di import ServiceProvider
from ._hostaware import HostAware
from ._lifetime import ApplicationLifetime
from ._logging import attach_embedded_logging, configure_logging, detach_embedded_logging, logging_configured
from ._options import HostOptions, seconds_option
from ._registration import HostedServiceRegistration
from ._reloading import Reloader, ReloadReport
from ._runners import Runner, create_runner
from ._runners._base import attach_runner, detach_runner
from ._services import BackgroundService, HostedService, is_overridden
from ._signals import FORCED_EXIT_CODE, RELOAD_SIGNAL, SignalWatch, signals_read_meanwhile
from ._singleton_warning import warn_own_singletons
from ._starting import StartPhases, report_start_failure, startup_error
from ._status import HostState, HostStatus, ServiceRecord, ServiceState
from ._stopping import await_stopping_callbacks, stop_services
from ._token import CancellationTokenSource
from .exceptions import HostStartupError, HostStateError, StartupTimeoutError

__all__ = ["ExitCode", "Host"]

_log = logger.bind(service="host")


class ExitCode(enum.IntEnum):
    """What ``Host.run()`` (and ``hostkit run``) returns.

    .. versionadded:: 0.1
    """

    #: Stopped on request (signal, ``stop_application()``, ``stop()``); services that completed do not change it.
    OK = 0
    #: A background service failed for good under ``on_background_error="stop_host"``.
    SERVICE_FAILED = 1
    #: A service's ``start`` raised, or start-up passed ``startup_timeout``.
    START_FAILED = 3
    #: A second SIGINT arrived during the stop; the process exited at once.
    FORCED = FORCED_EXIT_CODE


def _budget(timeout: float | timedelta) -> float:
    return seconds_option(timeout, "Host.stop(timeout=...)")


class Host:
    """Runs hosted and background services; built by :class:`~hostkit.HostBuilder`.

    Attributes:
        services: the :class:`~hostkit.ServiceProvider` (resolve shared services from it).
        lifetime: the :class:`~hostkit.ApplicationLifetime`.
        options: the :class:`~hostkit.HostOptions` it was built with.

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        services: ServiceProvider,
        registrations: Sequence[HostedServiceRegistration],
        *,
        options: HostOptions,
        lifetime: ApplicationLifetime,
    ) -> None:
        self.services = services
        self.options = options
        self.lifetime = lifetime
        self._exit_code = ExitCode.OK
        self._state = HostState.CREATED
        self._lock = threading.Lock()
        self._ran = False
        self._stopper: threading.Thread | None = None
        self._stop_thread: threading.Thread | None = None
        self._signals: SignalWatch | None = None
        self._run_waiting = False
        self._start_done = threading.Event()
        # Runs the lifecycle calls, and marks the threads that run them (start/stop and the
        # hooks): a stop() from one of them must not wait for the start or stop it is part of.
        self._calls = LifecycleCalls()
        self._started: list[ServiceRecord] = []
        self._records: list[ServiceRecord] = []
        # Whether this host holds the embedded logging route open (see start()).
        self._logging_route = False
        # One record per service a registration runs: itself, or each of its replicas.
        slots = [(r, name, replica) for r in registrations for name, replica in r.slots()]
        for reg, name, replica in slots:
            service: HostedService
            if isinstance(reg.service, HostedService):
                service = reg.service
                if replica is not None and replica.index > 0:
                    # A process-placed instance (a thread-placed one is refused with replicas):
                    # every replica needs an object of its own, as the runner table and the
                    # host's calls go by object. Its child gets a pickled copy anyway.
                    from ._process.pickling import pickled_copy

                    service = pickled_copy(reg.service, name)
            elif reg.placement == "process":
                # Built in its child by the child's own container (singletons are per
                # process): the host never constructs it nor holds what it opens.
                from ._process.deferred import DeferredService

                service = DeferredService(reg, services)
                if replica is None or replica.index == 0:
                    warn_own_singletons(reg, services)
            else:
                service = services.get(reg.container_key(replica))
            record = ServiceRecord(
                service,
                name=name,
                placement=reg.placement,
                restart=reg.restart,
                process_options=reg.process_options.with_default_start_method(options.start_method),
                heartbeat_timeout=reg.heartbeat_timeout,
                replica=replica,
            )
            if isinstance(service, BackgroundService):
                runner = create_runner(service, record)
                runner.on_end = self._on_service_end
                runner.host_stopping = lifetime.stopping
                # The record owns the runner; the service finds it (for heartbeat(), or a
                # start() called on it directly) through the runner table.
                record.runner = runner
                attach_runner(service, runner)
            self._records.append(record)
        lifetime.set_stop_handler(self._on_stop_requested)
        self._reloader = Reloader(self._records, self._calls, options, lifetime)
        # SIGHUP read while run() was starting the services: one reload once they all have.
        self._reload_after_start = False
        # Services are registered before the host exists; those that want it (HostAware:
        # hostkit.health, hostkit.systemd, a queue consumer, a user's own) get it now.
        for record in self._records:
            if isinstance(record.service, HostAware):
                record.service.attach_host(self)

    # -- public surface -------------------------------------------------------------

    @property
    def state(self) -> HostState:
        """The host's :class:`~hostkit.HostState`."""
        return self._state

    @property
    def exit_code(self) -> int:
        """The exit code ``run()`` returns (see :class:`ExitCode`)."""
        return int(self._exit_code)

    def status(self) -> HostStatus:
        """A snapshot of the host and every service: state, times, errors, restarts."""
        return HostStatus(self._state, int(self._exit_code), tuple(r.snapshot() for r in self._records))

    def service_records(self) -> tuple[ServiceRecord, ...]:
        """The host's live record of every service, in registration order (for hostkit's integrations).

        Unlike :meth:`status`, the records change as the services run: read, never write.
        """
        return tuple(self._records)

    def run(self) -> int:
        """Start, wait for a stop request, stop; return the exit code.

        On the main thread, SIGINT and SIGTERM request the stop (a second SIGINT
        during the stop exits at once with 130) and SIGHUP a reload (see
        :meth:`reload`; one during start-up reloads once every service started, one
        during the stop is ignored); elsewhere no handler is installed and the host
        waits for ``lifetime.stop_application()``.

        Raises:
            HostStateError: ``run()`` or ``start()`` was called before on this host.
        """
        with self._lock:
            if self._ran or self._state is not HostState.CREATED:
                msg = (
                    f"Host.run() was called on a host that is already {self._state.value}; a Host runs once. "
                    f"Build a new Host with HostBuilder.build() to run again"
                )
                raise HostStateError(msg)
            self._ran = True
        if self.options.configure_logging and not logging_configured():
            configure_logging()
        with SignalWatch() as watch:
            self._signals = watch if watch.installed else None
            self._run_waiting = True
            try:
                try:
                    if watch.installed and self._start_can_block():
                        # The main thread is busy inside start(): a helper turns a signal into
                        # stop_application(), which cancels the start-up token, so that run()
                        # stops what started instead of waiting for every start() to finish.
                        with signals_read_meanwhile(watch, self._on_signals_during_start(watch)):
                            self.start()
                    else:
                        self.start()
                except HostStartupError:
                    return self.exit_code
                if self._reload_after_start and not self.lifetime.stopping.is_set():
                    self._reloader.request("SIGHUP during start-up")
                self._wait_for_stop_request(watch)
                watch.stopping = True
                self.stop()
            finally:
                self._signals = None
                self._run_waiting = False
        return self.exit_code

    def _wait_for_stop_request(self, watch: SignalWatch) -> None:
        if not watch.installed:
            self.lifetime.stopping.wait()
            return
        while not self.lifetime.stopping.is_set():
            self._handle_signals(watch, watch.wait(), during="")

    def _handle_signals(self, watch: SignalWatch, signals: list[int], *, during: str) -> None:
        if RELOAD_SIGNAL in signals:
            signals = [s for s in signals if s != RELOAD_SIGNAL]
            # Read together with a stop signal: the stop wins, a reload now would only be cut short.
            self._on_reload_signal(during, stopping=bool(signals))
        if not signals:
            return
        names = ", ".join(signal.Signals(s).name for s in signals)
        _log.info("Received {}{}; stopping the host (budget {:.1f} s)", names, during, self.options.shutdown_seconds)
        # From here a second SIGINT exits at once, also when the first one came during start-up.
        watch.stopping = True
        self.lifetime.stop_application()

    def _on_reload_signal(self, during: str, *, stopping: bool) -> None:
        # Any number of SIGHUPs read together are one request: a reload reads the newest configuration.
        if stopping or self.lifetime.stopping.is_set():
            _log.info("Received SIGHUP while the host is stopping; no reload")
        elif during:
            # Some services may have read their configuration already, others not yet: once
            # every one has started, one reload brings them all to the newest.
            self._reload_after_start = True
            _log.info("Received SIGHUP{}; reloading once every service has started", during)
        else:
            self._reloader.request("Received SIGHUP")

    def _on_signals_during_start(self, watch: SignalWatch) -> Callable[[list[int]], None]:
        return lambda signals: self._handle_signals(watch, signals, during=" during start-up")

    def _start_can_block(self) -> bool:
        """``True`` if some service's start-up runs code that may take a while.

        User code (an overridden ``starting``/``start``/``started``) can wait on
        anything; a process-placed service starts a child (tens of milliseconds each).
        When none can, start-up takes microseconds, a signal waits in the pipe until
        it is over, and no helper thread is worth starting to read it.
        """
        return any(
            record.placement == "process"
            or not isinstance(record.service, BackgroundService)
            or any(is_overridden(record.service, m) for m in ("starting", "start", "started"))
            for record in self._records
        )

    def start(self) -> None:
        """Start every service in registration order; return once all have started.

        Raises:
            HostStartupError: a service's ``start`` raised; those already started
                were stopped again. ``StartupTimeoutError`` if ``startup_timeout`` passed.
            HostStateError: the host was started before.
        """
        with self._lock:
            if self._state is not HostState.CREATED:
                msg = (
                    f"Host.start() was called on a host that is already {self._state.value}; a Host starts once. "
                    f"Build a new Host with HostBuilder.build()"
                )
                raise HostStateError(msg)
            self._state = HostState.STARTING
            embedded = not self._ran
        if embedded and self.options.embedded_logging:
            # Started without run(): the process's logging is the application's. Until the
            # stop ends, hostkit's lines go to its stdlib logging (or stderr), not nowhere.
            self._logging_route = attach_embedded_logging()
        began = time.monotonic()
        _log.info("Host starting {} service(s) (pid {})", len(self._records), os.getpid())
        timeout = self.options.startup_seconds
        deadline = None if timeout is None else began + timeout
        phases = StartPhases(
            self._records,
            self._calls,
            self._started,
            concurrently=self.options.start_concurrently,
            stop_requested=self._stop_requested_early,
        )
        try:
            try:
                with CancellationTokenSource(self.lifetime.stopping, cancel_after=timeout, name="startup") as source:
                    phases.run(source.token, deadline)
            except BaseException as exc:
                self._start_failed(exc, phases.culprit(exc))
                raise
            with self._lock:
                self._state = HostState.RUNNING
            # Checked after RUNNING is set, under no lock: a stop_application() that raced
            # with the state change either saw RUNNING (and started the stop itself) or set
            # `stopping` before we got here. Missing both would leave a host nobody stops.
            if self._stop_requested_early():
                _log.info("Start-up ended early: a stop was requested")
                self._on_stop_requested()
                return
            _log.info("Host started in {:.3f} s", time.monotonic() - began)
            self.lifetime.started.set()
        finally:
            # Only now may a stop() that waited for start-up go on: `started` fires before any stop.
            self._start_done.set()

    def stop(self, timeout: float | timedelta | None = None) -> None:
        """Stop every service within one budget (``HostOptions.shutdown_timeout`` by default).

        Safe to call many times and from any thread; before ``start()`` it does
        nothing. A second caller waits for the first caller's stop to finish. During
        start-up it ends the start-up early (no further service starts) and then
        stops what had started. Called from a service's own code (``start``,
        ``execute``, a hook) or from a ``lifetime.stopping`` callback, it only
        requests the stop, like ``lifetime.stop_application()``, and returns at
        once: waiting there would mean waiting for itself.

        Raises:
            ConfigurationError: ``timeout`` is negative (``ConfigurationTypeError``
                if it is not a number or a timedelta).
        """
        budget = self.options.shutdown_seconds if timeout is None else _budget(timeout)
        if self._inside_own_call():
            # Called from a service's own start/stop/hook or execute: waiting here for the
            # stop would wait for ourselves (deadlock until the budget ran out). Ask for the
            # stop instead; the thread driving the host carries it out once we return.
            self.lifetime.stop_application()
            return
        with self._lock:
            state = self._state
            if state is HostState.CREATED:
                _log.debug("Host.stop() before start(): nothing to stop")
                return
            if state is HostState.STOPPED:
                return
            owner = self._stopper
            if owner is None:
                self._stopper = threading.current_thread()
        if owner is not None:
            if owner is not threading.current_thread():
                self.lifetime.stopped.wait()
            return
        if state is HostState.STARTING:
            self.lifetime.stop_application()
            self._start_done.wait()
            if self._state is HostState.STOPPED:
                return  # the start failed and already rolled back everything
        self._stop_started(budget, reason="stop requested")

    def reload(self) -> ReloadReport:
        """Call every running service's ``reload()`` at once; wait for them and return the report.

        What SIGHUP does to ``run()``. Each call runs on a thread of its own (a
        process-placed service's in its child) while the services go on running,
        and gets a token set when ``HostOptions.reload_timeout`` passes or the host
        begins to stop. A ``reload()`` that raises, or is still running at the
        deadline, is logged at ERROR with the service's name (and its traceback, or
        where it is stuck) and counted in the report's ``failed``; neither stops its
        service or the host. Services without a ``reload()`` are not called and
        keep running untouched. Reloads never overlap: called while one runs, this
        waits for it and then for one more reload, which it shares with every other
        request made meanwhile.

        Returns:
            a :class:`~hostkit.ReloadReport`: which services reloaded, which failed or
            timed out (and why), which were skipped because they were not running.

        Raises:
            HostStateError: the host is not running (not started, starting, stopping
                or stopped), or began to stop before the reload could run.
            RuntimeError: called from a service's own ``reload()``, where it would
                wait for the reload it is part of.

        .. versionadded:: 0.2
        """
        if self._reloader.inside():
            msg = (
                "Host.reload() was called from a service's reload(): it would wait for the reload it is part of "
                "(deadlock avoided)"
            )
            raise RuntimeError(msg)
        state = self._state
        if state is not HostState.RUNNING or self.lifetime.stopping.is_set():
            msg = f"Host.reload() needs a running host; this one is {state.value}"
            raise HostStateError(msg)
        return self._reloader.request("Host.reload()").result()

    def add_reload_listener(
        self, began: Callable[[], None], ended: Callable[[ReloadReport], None]
    ) -> Callable[[], None]:
        """Call ``began()`` when a reload begins and ``ended(report)`` when it has ended (for integrations).

        Both run on the reload's thread; one that raises is logged and the reload goes
        on. ``hostkit.systemd`` sends ``RELOADING=1`` and ``READY=1`` this way.

        Returns:
            a function that removes the listener.

        .. versionadded:: 0.2
        """
        return self._reloader.add_listener(began, ended)

    def _inside_own_call(self) -> bool:
        """``True`` on a thread that runs one of this host's lifecycle calls, a service's ``execute``,
        or the ``lifetime.stopping`` callbacks (which the stop waits for)."""
        if self._calls.inside():
            return True
        current = threading.current_thread()
        if self.lifetime.stopping.running_callbacks() is current:
            return True
        return any(r.runner is not None and r.runner.runs_on(current) for r in self._records)

    def __enter__(self) -> Host:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __del__(self) -> None:
        if getattr(self, "_state", None) in (HostState.RUNNING, HostState.STARTING):
            warnings.warn(
                f"{self!r} was garbage-collected while still running; call stop() or use it as a context manager",
                ResourceWarning,
                stacklevel=1,
            )

    def __repr__(self) -> str:
        running = sum(r.state is ServiceState.RUNNING for r in self._records)
        return f"<Host {self._state.value} services={len(self._records)} running={running} exit_code={self.exit_code}>"

    # -- start ---------------------------------------------------------------------

    def _stop_requested_early(self) -> bool:
        return self.lifetime.stopping.is_set()

    def _start_failed(self, exc: BaseException, record: ServiceRecord | None) -> None:
        self._exit_code = ExitCode.START_FAILED
        summary = report_start_failure(exc, record, self.options.startup_seconds)
        started = len(self._started)
        _log.info("Rolling back start-up: stopping the {} service(s) already started", started)
        with self._lock:
            self._stopper = threading.current_thread()
        self._stop_started(self.options.shutdown_seconds, reason="start-up failed")
        if not isinstance(exc, Exception):
            return  # KeyboardInterrupt, SystemExit: rolled back; start() re-raises it unchanged
        err = startup_error(exc, record, summary, started, self.options.startup_seconds)
        raise err from (None if isinstance(err, StartupTimeoutError) else exc)

    # -- stop ----------------------------------------------------------------------

    def _on_stop_requested(self) -> None:
        """``stop_application()`` was called: wake whoever drives the stop."""
        if self._signals is not None:
            self._signals.wake()
            return
        if self._run_waiting:
            return  # run() off the main thread waits on lifetime.stopping itself
        with self._lock:
            if self._state is not HostState.RUNNING or self._stop_thread is not None or self._stopper is not None:
                return
            self._stop_thread = threading.Thread(target=self.stop, name="hostkit-host-stop", daemon=True)
        self._stop_thread.start()

    def _on_service_end(self, runner: Runner) -> None:
        record = runner.record
        if record.state is not ServiceState.FAULTED:
            return
        if self.lifetime.stopping.is_set():
            # It crashed while the host was stopping (or rolling back a failed start): the
            # stop goes on, but under "stop_host" the exit code still says a service failed,
            # since its work in flight was lost rather than finished.
            if self.options.on_background_error == "stop_host" and self._exit_code is ExitCode.OK:
                self._exit_code = ExitCode.SERVICE_FAILED
                _log.bind(service=record.name).error(
                    "Background service {!r} failed while the host was stopping; exit code {}",
                    record.name,
                    int(ExitCode.SERVICE_FAILED),
                )
            return
        if self.options.on_background_error == "stop_host":
            self._exit_code = ExitCode.SERVICE_FAILED
            _log.bind(service=record.name).error(
                "Stopping the host because background service {!r} failed (on_background_error='stop_host'); "
                "exit code {}",
                record.name,
                int(ExitCode.SERVICE_FAILED),
            )
            self.lifetime.stop_application()
        else:
            _log.bind(service=record.name).warning(
                "Background service {!r} is faulted; the host runs on (on_background_error='ignore')", record.name
            )

    def _stop_started(self, budget: float, *, reason: str) -> None:
        began = time.monotonic()
        deadline = began + budget
        # The budget is cut in three, so that everything fits in it:
        #   [began, cancel_at)     services wind down on their own;
        #   cancel_at              the shutdown token passed to stop()/hooks is set;
        #   [cancel_at, wait_end)  cooperative code reacts to that token and returns; a
        #                          call still running at wait_end is declared hung. Without
        #                          this slice, a stop() that returns the moment its token
        #                          fires would race the hang check and lose;
        #   [wait_end, deadline)   escalation (terminate, then kill a child).
        reserve = min(2.0, budget * 0.2)
        cancel_at = deadline - reserve
        wait_end = deadline - reserve / 2
        with self._lock:
            self._state = HostState.STOPPING
        if not self.lifetime.stopping.is_set():
            self.lifetime.stopping.set()
        # A stop() called from another thread while run() waits for a signal must wake
        # run()'s wait, or run() would block in select() forever after the stop.
        self._on_stop_requested()
        started = list(reversed(self._started))
        _log.info("Host stopping {} service(s) ({}; budget {:.1f} s)", len(started), reason, budget)
        await_stopping_callbacks(self.lifetime.stopping, began, cancel_at)
        stop_services(
            started,
            self._calls,
            concurrently=self.options.stop_concurrently,
            budget=budget,
            cancel_at=cancel_at,
            wait_end=wait_end,
            deadline=deadline,
        )
        for record in self._records:
            if record.runner is not None:
                detach_runner(record.service, record.runner)
        try:
            self.services.close()
        except Exception:
            _log.opt(exception=True).warning("Closing the singletons failed")
        with self._lock:
            self._state = HostState.STOPPED
        _log.info("Host stopped in {:.3f} s (exit code {})", time.monotonic() - began, self.exit_code)
        if self._logging_route:
            self._logging_route = False
            detach_embedded_logging()
        self.lifetime.stopped.set()
