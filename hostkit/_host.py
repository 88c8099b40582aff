"""The Host: start in order, stop in reverse within one budget, report everything.

Start: every service's ``starting`` hook, then every ``start``, then every
``started`` (registration order, or all at once with ``start_concurrently``);
then ``lifetime.started``. A ``start`` that raises, or start-up passing
``startup_timeout``, stops what had started (reverse order) and raises
:class:`~hostkit.exceptions.HostStartupError` naming the service.

Stop: ``lifetime.stopping``; every background service's token is set *first*, so
they all wind down in parallel; then ``stopping``/``stop``/``stopped`` hooks in
reverse order, all sharing one deadline. A hook we did not write runs on a helper
thread so a hung one cannot keep the others from being attempted. At the
deadline, every service still running is logged with where it is stuck, and
escalated (a child process is terminated, then killed; a thread is abandoned).
Then ``lifetime.stopped``.
"""

from __future__ import annotations

import enum
import os
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from datetime import timedelta

from loguru import logger

from ._di import ServiceProvider
from ._lifetime import ApplicationLifetime
from ._logging import configure_logging, logging_configured
from ._options import HostOptions
from ._registration import HostedServiceRegistration
from ._runners import Runner, create_runner
from ._services import BackgroundService, HostedService, is_overridden
from ._signals import FORCED_EXIT_CODE, SignalWatch
from ._status import HostState, HostStatus, ServiceRecord, ServiceState
from ._supervisor import format_failure
from ._token import CancellationToken, CancellationTokenSource
from ._util import thread_stack, to_seconds
from .exceptions import HostStartupError, HostStateError, StartupTimeoutError

__all__ = ["ExitCode", "Host"]

_log = logger.bind(service="host")


class ExitCode(enum.IntEnum):
    """What ``Host.run()`` (and ``hostkit run``) returns.

    .. versionadded:: 0.1
    """

    #: Stopped on request (signal, ``stop_application()``, ``stop()``), or every service completed.
    OK = 0
    #: A background service failed for good under ``on_background_error="stop_host"``.
    SERVICE_FAILED = 1
    #: A service's ``start`` raised, or start-up passed ``startup_timeout``.
    START_FAILED = 3
    #: A second SIGINT arrived during the stop; the process exited at once.
    FORCED = FORCED_EXIT_CODE


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
        self._started: list[ServiceRecord] = []
        self._records: list[ServiceRecord] = []
        for reg in registrations:
            service: HostedService = reg.service if isinstance(reg.service, HostedService) else services.get(reg)
            record = ServiceRecord(
                service,
                name=reg.name,
                placement=reg.placement,
                restart=reg.restart,
                process_options=reg.process_options,
                heartbeat_timeout=reg.heartbeat_timeout,
            )
            if isinstance(service, BackgroundService):
                runner = create_runner(service, record)
                runner.on_end = self._on_service_end
                service.__dict__["_hostkit_runner"] = runner
            self._records.append(record)
        lifetime._on_stop_requested = self._on_stop_requested

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
            signals = watch.wait()
            if signals:
                import signal as _signal

                names = ", ".join(_signal.Signals(s).name for s in signals)
                _log.info("Received {}; stopping the host (budget {:.1f} s)", names, self.options.shutdown_seconds)
                self.lifetime.stop_application()

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
        began = time.monotonic()
        _log.info("Host starting {} service(s) (pid {})", len(self._records), os.getpid())
        timeout = self.options.startup_seconds
        deadline = None if timeout is None else began + timeout
        try:
            with CancellationTokenSource(self.lifetime.stopping, cancel_after=timeout, name="startup") as source:
                self._start_all(source.token, deadline)
        except BaseException as exc:
            self._start_failed(exc, deadline)
            raise
        finally:
            self._start_done.set()
        if self._stop_requested_early():
            with self._lock:
                self._state = HostState.RUNNING
            _log.info("Start-up ended early: a stop was requested")
            self._on_stop_requested()
            return
        with self._lock:
            self._state = HostState.RUNNING
        _log.info("Host started in {:.3f} s", time.monotonic() - began)
        self.lifetime.started.set()

    def stop(self, timeout: float | timedelta | None = None) -> None:
        """Stop every service within one budget (``HostOptions.shutdown_timeout`` by default).

        Safe to call many times and from any thread; before ``start()`` it does
        nothing. A second caller waits for the first caller's stop to finish.
        """
        budget = self.options.shutdown_seconds if timeout is None else to_seconds(timeout, "timeout")
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
        self._stop_started(budget, reason="stop requested")

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
            if record.placement is None:
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
            _log.critical(
                "Hosted service {!r} did not finish starting within startup_timeout ({} s); it is stuck at:\n{}",
                name,
                self.options.startup_seconds,
                where.rstrip(),
            )
        else:
            summary, text = format_failure(exc)
            if record is not None:
                record.mark(ServiceState.FAULTED, error=summary, traceback=text, exception=exc)
            _log.critical("Hosted service {!r} failed to start: {}\n{}", name, summary, text.rstrip())
        started = len(self._started)
        _log.info("Rolling back start-up: stopping the {} service(s) already started", started)
        with self._lock:
            self._stopper = threading.current_thread()
        self._stop_started(self.options.shutdown_seconds, reason="start-up failed")
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
        if deadline is None or not is_overridden(service, method):
            with logger.contextualize(service=record.name):
                fn(token)
            return

        def bound(token: CancellationToken) -> None:
            with logger.contextualize(service=record.name):
                fn(token)

        call = _Call(bound, token, f"hostkit-{record.name}-{method}")
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
        if record.state is not ServiceState.FAULTED or self.lifetime.stopping.is_set():
            return
        if self.options.on_background_error == "stop_host":
            self._exit_code = ExitCode.SERVICE_FAILED
            _log.error(
                "Stopping the host because background service {!r} failed (on_background_error='stop_host'); "
                "exit code {}",
                record.name,
                int(ExitCode.SERVICE_FAILED),
            )
            self.lifetime.stop_application()
        else:
            _log.warning(
                "Background service {!r} is faulted; the host runs on (on_background_error='ignore')", record.name
            )

    def _stop_started(self, budget: float, *, reason: str) -> None:
        began = time.monotonic()
        deadline = began + budget
        # Keep a slice of the budget for escalation (terminate, then kill a child),
        # so that escalation also fits in the budget.
        reserve = min(1.0, budget * 0.1)
        soft_deadline = deadline - reserve
        with self._lock:
            self._state = HostState.STOPPING
        if not self.lifetime.stopping.is_set():
            self.lifetime.stopping.set()
        started = list(reversed(self._started))
        _log.info("Host stopping {} service(s) ({}; budget {:.1f} s)", len(started), reason, budget)
        with CancellationTokenSource(cancel_after=max(soft_deadline - time.monotonic(), 0.0), name="shutdown") as src:
            # Signal every background service first: they wind down in parallel,
            # and no service's stop adds to another's.
            for record in started:
                runner = self._runner(record)
                if runner is not None:
                    runner.request_stop()
            for phase in ("stopping", "stop", "stopped"):
                if self.options.stop_concurrently:
                    self._stop_phase_concurrently(started, phase, src.token, soft_deadline)
                else:
                    for record in started:
                        self._stop_one(record, phase, src.token, soft_deadline)
        for record in started:
            runner = self._runner(record)
            if runner is not None and runner.running:
                self._escalate(record, runner, budget, deadline)
            elif record.placement is None and record.state is ServiceState.RUNNING:
                record.mark(ServiceState.STOPPED)
        try:
            self.services.close()
        except Exception:
            _log.opt(exception=True).warning("Closing the singletons failed")
        with self._lock:
            self._state = HostState.STOPPED
        _log.info("Host stopped in {:.3f} s (exit code {})", time.monotonic() - began, self.exit_code)
        self.lifetime.stopped.set()

    @staticmethod
    def _runner(record: ServiceRecord) -> Runner | None:
        runner: Runner | None = record.service.__dict__.get("_hostkit_runner")
        return runner

    def _stop_one(self, record: ServiceRecord, phase: str, token: CancellationToken, deadline: float) -> None:
        try:
            self._invoke(record, phase, token, deadline)
        except _Hung as hung:
            record.mark(ServiceState.TIMED_OUT, detail=f"{phase}() did not return within the shutdown budget")
            _log.error(
                "Hosted service {!r}: {}() did not return within the shutdown budget; moving on. It is stuck at:\n{}",
                record.name,
                phase,
                thread_stack(hung.call.thread).rstrip(),
            )
        except Exception as exc:
            summary, text = format_failure(exc)
            record.mark(ServiceState.FAULTED, error=summary, traceback=text, exception=exc)
            _log.warning(
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
        _log.error(
            "Background service {!r} did not stop within the shutdown budget ({:.1f} s): {}; {}",
            record.name,
            budget,
            action,
            where.rstrip(),
        )
