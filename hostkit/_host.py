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
"""

from __future__ import annotations

import contextlib
import enum
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta

from loguru import logger

from ._di import ServiceProvider
from ._hostaware import HostAware
from ._lifetime import ApplicationLifetime
from ._logging import attach_embedded_logging, configure_logging, detach_embedded_logging, logging_configured
from ._options import HostOptions, seconds_option
from ._registration import HostedServiceRegistration
from ._runners import Runner, create_runner
from ._services import BackgroundService, HostedService, is_overridden
from ._signals import FORCED_EXIT_CODE, SignalWatch
from ._status import HostState, HostStatus, ServiceRecord, ServiceState
from ._supervisor import format_failure
from ._token import CancellationToken, CancellationTokenSource
from ._util import thread_stack
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


def _warn_own_singletons(registration: HostedServiceRegistration, services: ServiceProvider) -> None:
    """One WARNING if a process-placed class depends on singletons: its child builds its own.

    The mistake it catches: a hosted service warms a singleton cache in the host,
    and a loop moved to ``placement="process"`` reads an empty one in its child.
    Singletons registered ``per_process=True`` are meant to be one per process,
    and are not named.
    """
    chains = services.singleton_chains(registration)
    if not chains:
        return
    names = [chain[-1] for chain in chains]
    if len(names) == 1:
        what, built, inside = "a singleton", "of it, not the one", "in it"
        fix = f"register it with add_singleton({names[0]}, per_process=True)"
    else:
        what, built, inside = "singletons", "of each, not the ones", "in them"
        fix = f"register each with add_singleton(..., per_process=True): {', '.join(names)}"
    message = (
        f"{registration.name} runs in a child process (placement='process') and depends on {what}: "
        f"{', '.join(' -> '.join(c) for c in chains)}. The child builds its own instance {built} this process "
        f"uses: what this process puts {inside} (a warm-up, a cache) is not there, and what the child changes "
        f"does not come back. Pass what the child needs as constructor arguments of a registered instance "
        f"(pickled at start), or share it through a queue or a store both processes open; if one instance per "
        f"process is what you want, {fix}"
    )
    # Attributed to the code that called build() (as warnings.warn(stacklevel=...) would):
    # the mistake is in its registrations, and a record from outside the "hostkit"
    # package reaches loguru's sinks although the library's own logger is disabled
    # until run() or configure_logging(), which come after build().
    logger.opt(depth=_depth_outside_hostkit()).bind(service=registration.name).warning(message)


def _depth_outside_hostkit() -> int:
    """The loguru ``depth`` (seen from the caller) of the first frame outside the hostkit package."""
    frame = sys._getframe(1)
    depth = 0
    while frame.f_back is not None and str(frame.f_globals.get("__name__", "")).partition(".")[0] == "hostkit":
        frame = frame.f_back
        depth += 1
    return depth


class _Call:
    """One lifecycle call on a helper thread, so a hung call can be left behind."""

    def __init__(self, fn: Callable[[CancellationToken], None], token: CancellationToken, name: str) -> None:
        self.error: BaseException | None = None
        self._fn = fn
        self._token = token
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self._fn(self._token)
        except BaseException as exc:
            self.error = exc

    def join(self, timeout: float) -> bool:
        self.thread.join(max(timeout, 0.0))
        return not self.thread.is_alive()


class _Hung(Exception):
    def __init__(self, call: _Call) -> None:
        super().__init__(call.thread.name)
        self.call = call


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
        # Marks the threads that run this host's own lifecycle calls (start/stop and the
        # hooks): a stop() from one of them must not wait for the start or stop it is part of.
        self._local = threading.local()
        self._started: list[ServiceRecord] = []
        self._records: list[ServiceRecord] = []
        # Whether this host holds the embedded logging route open (see start()).
        self._logging_route = False
        for reg in registrations:
            service: HostedService
            if isinstance(reg.service, HostedService):
                service = reg.service
            elif reg.placement == "process":
                # Built in its child by the child's own container (singletons are per
                # process): the host never constructs it nor holds what it opens.
                from ._process.deferred import DeferredService

                service = DeferredService(reg, services)
                _warn_own_singletons(reg, services)
            else:
                service = services.get(reg)
            record = ServiceRecord(
                service,
                name=reg.name,
                placement=reg.placement,
                restart=reg.restart,
                process_options=reg.process_options.with_default_start_method(options.start_method),
                heartbeat_timeout=reg.heartbeat_timeout,
            )
            if isinstance(service, BackgroundService):
                runner = create_runner(service, record)
                runner.on_end = self._on_service_end
                runner.host_stopping = lifetime.stopping
                service.__dict__["_hostkit_runner"] = runner
            self._records.append(record)
        lifetime._on_stop_requested = self._on_stop_requested
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
        """Every registered service's record, in registration order (read-only view)."""
        return tuple(self._records)

    def run(self) -> int:
        """Start, wait for a stop request, stop; return the exit code.

        On the main thread, SIGINT and SIGTERM request the stop (a second SIGINT
        during the stop exits at once with 130); elsewhere no handler is installed
        and the host waits for ``lifetime.stop_application()``.

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
                    with self._signals_during_start(watch):
                        self.start()
                except HostStartupError:
                    return self.exit_code
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
        if not signals:
            return
        names = ", ".join(signal.Signals(s).name for s in signals)
        _log.info("Received {}{}; stopping the host (budget {:.1f} s)", names, during, self.options.shutdown_seconds)
        # From here a second SIGINT exits at once, also when the first one came during start-up.
        watch.stopping = True
        self.lifetime.stop_application()

    @contextlib.contextmanager
    def _signals_during_start(self, watch: SignalWatch) -> Iterator[None]:
        """Read the signal pipe on a helper thread while the main thread is busy starting.

        Without it, SIGTERM during a slow start (a database that is not up yet) would
        wait for every start() to finish. The helper turns the signal into
        ``stop_application()``, which cancels the start-up token: cooperative start()
        calls return, the remaining ones are skipped, and run() stops what started.
        The main thread cannot do this itself: it is inside start().

        Skipped when no start-up code can block: every service is a thread-placed
        background service whose ``starting``/``start``/``started`` are hostkit's
        own (they only start a thread). Then start-up takes microseconds, a signal
        waits in the pipe until it is over, and no helper thread is worth starting.
        """
        if not watch.installed or not self._start_can_block():
            yield
            return
        done = threading.Event()

        def read() -> None:
            # Handle what was read before looking at `done`, so that no signal read here is
            # lost; bytes not read yet stay in the pipe for _wait_for_stop_request.
            while True:
                self._handle_signals(watch, watch.wait(), during=" during start-up")
                if done.is_set():
                    return

        reader = threading.Thread(target=read, name="hostkit-host-signals", daemon=True)
        reader.start()
        try:
            yield
        finally:
            done.set()
            watch.wake()
            reader.join()

    def _start_can_block(self) -> bool:
        """``True`` if some service's start-up runs code that may take a while.

        User code (an overridden ``starting``/``start``/``started``) can wait on
        anything; a process-placed service starts a child (tens of milliseconds each).
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
        try:
            try:
                with CancellationTokenSource(self.lifetime.stopping, cancel_after=timeout, name="startup") as source:
                    self._start_all(source.token, deadline)
            except BaseException as exc:
                self._start_failed(exc, deadline)
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

    def _inside_own_call(self) -> bool:
        """``True`` on a thread that runs one of this host's lifecycle calls, a service's ``execute``,
        or the ``lifetime.stopping`` callbacks (which the stop waits for)."""
        if getattr(self._local, "in_call", False):
            return True
        current = threading.current_thread()
        if self.lifetime.stopping._running_callbacks() is current:
            return True
        return any(
            runner is not None and runner._thread is current for runner in (self._runner(r) for r in self._records)
        )

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

    def _start_all(self, token: CancellationToken, deadline: float | None) -> None:
        for phase in ("starting", "start", "started"):
            if self.options.start_concurrently:
                self._start_phase_concurrently(phase, token, deadline)
                continue
            for record in self._records:
                if self._stop_requested_early():
                    return
                self._start_one(record, phase, token, deadline)

    def _start_one(self, record: ServiceRecord, phase: str, token: CancellationToken, deadline: float | None) -> None:
        if phase == "start":
            record.mark(ServiceState.STARTING)
        try:
            self._invoke(record, phase, token, deadline)
        except BaseException as exc:
            exc.__dict__.setdefault("_hostkit_service", record)
            raise
        if phase == "start":
            self._started.append(record)
            if record.kind == "hosted":
                record.mark(ServiceState.RUNNING, pid=os.getpid())

    def _start_phase_concurrently(self, phase: str, token: CancellationToken, deadline: float | None) -> None:
        errors: list[BaseException] = []
        lock = threading.Lock()

        def one(record: ServiceRecord) -> None:
            try:
                self._start_one(record, phase, token, deadline)
            except BaseException as exc:
                with lock:
                    errors.append(exc)

        threads = [
            threading.Thread(target=one, args=(r,), name=f"hostkit-{r.name}-{phase}", daemon=True)
            for r in self._records
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]

    def _start_failed(self, exc: BaseException, deadline: float | None) -> None:
        record: ServiceRecord | None = exc.__dict__.get("_hostkit_service") if hasattr(exc, "__dict__") else None
        name = record.name if record else "?"
        self._exit_code = ExitCode.START_FAILED
        if isinstance(exc, _Hung):
            where = thread_stack(exc.call.thread)
            summary = f"start-up did not finish within startup_timeout={self.options.startup_seconds} s"
            if record is not None:
                record.mark(ServiceState.TIMED_OUT, error=summary, detail="start() did not return in time")
            _log.bind(service=name).critical(
                "Hosted service {!r} did not finish starting within startup_timeout ({} s); it is stuck at:\n{}",
                name,
                self.options.startup_seconds,
                where.rstrip(),
            )
        else:
            summary, text = format_failure(exc)
            if record is not None:
                record.mark(ServiceState.FAULTED, error=summary, traceback=text, exception=exc)
            _log.bind(service=name).critical(
                "Hosted service {!r} failed to start: {}\n{}", name, summary, text.rstrip()
            )
        started = len(self._started)
        _log.info("Rolling back start-up: stopping the {} service(s) already started", started)
        with self._lock:
            self._stopper = threading.current_thread()
        self._stop_started(self.options.shutdown_seconds, reason="start-up failed")
        if not isinstance(exc, Exception):
            return  # KeyboardInterrupt, SystemExit: rolled back; start() re-raises it unchanged
        if isinstance(exc, _Hung):
            err: HostStartupError = StartupTimeoutError(
                f"hosted service {name!r} did not finish starting within startup_timeout="
                f"{self.options.startup_seconds} s; the {started} service(s) already started were stopped. "
                f"Make its start() return promptly (move long work to a BackgroundService) or raise startup_timeout",
                service=name,
            )
        else:
            err = HostStartupError(
                f"hosted service {name!r} failed to start: {summary}; "
                f"the {started} service(s) already started were stopped",
                service=name,
            )
        raise err from (None if isinstance(exc, _Hung) else exc)

    # -- invoking lifecycle methods ----------------------------------------------------

    def _invoke(self, record: ServiceRecord, method: str, token: CancellationToken, deadline: float | None) -> None:
        """Call ``record.service.<method>(token)``, bounded by ``deadline`` when it is user code.

        Raises what the call raised, or ``_Hung`` if it was still running at the deadline.
        """
        service = record.service
        if method in ("starting", "started", "stopping", "stopped") and not is_overridden(service, method):
            return
        fn: Callable[[CancellationToken], None] = getattr(service, method)

        def bound(token: CancellationToken) -> None:
            previous = getattr(self._local, "in_call", False)
            self._local.in_call = True
            try:
                with logger.contextualize(service=record.name):
                    fn(token)
            finally:
                self._local.in_call = previous

        if deadline is None or not is_overridden(service, method):
            bound(token)
            return
        try:
            call = _Call(bound, token, f"hostkit-{record.name}-{method}")
        except RuntimeError:
            # No new threads at interpreter shutdown (Python 3.12), where an embedded
            # host stops: run the call here, unbounded, rather than not at all.
            _log.bind(service=record.name).warning(
                "{}() of {!r} runs without its deadline: no thread can start at interpreter shutdown",
                method,
                record.name,
            )
            bound(token)
            return
        if not call.join(deadline - time.monotonic()):
            raise _Hung(call)
        if call.error is not None:
            raise call.error

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
        self._await_stopping_callbacks(began, cancel_at)
        # Signal every background service first, before the rest of the bookkeeping: they
        # wind down in parallel with each other and with this stop, and no service's stop
        # adds to another's.
        for record in started:
            runner = self._runner(record)
            if runner is not None:
                runner.request_stop()
        with CancellationTokenSource(cancel_after=max(cancel_at - time.monotonic(), 0.0), name="shutdown") as src:
            for phase in ("stopping", "stop", "stopped"):
                if self.options.stop_concurrently:
                    self._stop_phase_concurrently(started, phase, src.token, wait_end)
                else:
                    for record in started:
                        self._stop_one(record, phase, src.token, wait_end)
        for record in started:
            runner = self._runner(record)
            # A background service's default stop() returns when the token fires; give its
            # thread or child the rest of the waiting slice before escalating.
            if runner is not None and not runner.join(max(wait_end - time.monotonic(), 0.0)):
                self._escalate(record, runner, budget, deadline)
            elif record.kind == "hosted" and record.state in (ServiceState.RUNNING, ServiceState.STOPPING):
                record.mark(ServiceState.STOPPED)
                _log.bind(service=record.name).info("Hosted service {!r} stopped", record.name)
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

    def _await_stopping_callbacks(self, began: float, until: float) -> None:
        """Let the ``lifetime.stopping`` callbacks finish before any service is stopped (.NET's order).

        They run on the thread that set ``stopping``: when that was another thread
        (``stop_application()`` from a service or a request handler), this one was woken
        as the token was set, and would otherwise stop the services, fire ``stopped``
        and let ``run()`` return while a callback is still at work. The wait is part of
        the one budget: a callback still running when the shutdown token is due is
        named with its stack, and the stop goes on without it.
        """
        stopping = self.lifetime.stopping
        if stopping._callbacks_finished(max(until - time.monotonic(), 0.0)):
            return
        thread = stopping._running_callbacks()
        if thread is None:
            return  # it returned just as the wait ended
        _log.error(
            "A lifetime.stopping callback was still running {:.1f} s into the stop (on thread {}); the services "
            "are stopped without waiting for it any longer. It is at:\n{}",
            time.monotonic() - began,
            thread.name,
            thread_stack(thread).rstrip(),
        )

    @staticmethod
    def _runner(record: ServiceRecord) -> Runner | None:
        runner: Runner | None = record.service.__dict__.get("_hostkit_runner")
        return runner

    def _stop_one(self, record: ServiceRecord, phase: str, token: CancellationToken, deadline: float) -> None:
        if phase == "stop" and record.kind == "hosted" and record.state is ServiceState.RUNNING:
            record.mark(ServiceState.STOPPING)
        try:
            self._invoke(record, phase, token, deadline)
        except _Hung as hung:
            record.mark(ServiceState.TIMED_OUT, detail=f"{phase}() did not return within the shutdown budget")
            _log.bind(service=record.name).error(
                "Hosted service {!r}: {}() did not return within the shutdown budget; moving on. It is stuck at:\n{}",
                record.name,
                phase,
                thread_stack(hung.call.thread).rstrip(),
            )
        except Exception as exc:
            summary, text = format_failure(exc)
            record.mark(ServiceState.FAULTED, error=summary, traceback=text, exception=exc)
            _log.bind(service=record.name).warning(
                "Hosted service {!r}: {}() raised; the other services still stop: {}\n{}",
                record.name,
                phase,
                summary,
                text.rstrip(),
            )

    def _stop_phase_concurrently(
        self, records: list[ServiceRecord], phase: str, token: CancellationToken, deadline: float
    ) -> None:
        threads = [
            threading.Thread(
                target=self._stop_one, args=(r, phase, token, deadline), name=f"hostkit-{r.name}-{phase}", daemon=True
            )
            for r in records
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(max(deadline - time.monotonic(), 0.0))

    def _escalate(self, record: ServiceRecord, runner: Runner, budget: float, deadline: float) -> None:
        where = runner.where()
        grace = max(deadline - time.monotonic(), 0.05)
        action = runner.escalate(grace)
        _log.bind(service=record.name).error(
            "Background service {!r} did not stop within the shutdown budget ({:.1f} s): {}; {}",
            record.name,
            budget,
            action,
            where.rstrip(),
        )
