"""``ProcessRunner``: runs one service's ``execute`` in a child process, supervised by a host thread.

The data flow is drawn in :mod:`hostkit._process`; this module holds the runner's
side of it: pickling the payload, one run (launch, supervise, outcome) and the
escalation at the stop deadline.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import signal
import threading
import time
from typing import TYPE_CHECKING, Any

import dill
import multiprocess
import multiprocess.connection as mpc
import psutil

from .._fastadd import fill_memo
from .._runners._base import Runner
from .._status import ServiceState
from .._util import pid_alive
from ..exceptions import ChildProcessDiedError, ConfigurationError, RemoteServiceError
from .deferred import DeferredService
from .entry import run_child
from .logbridge import prepare_for_fork, reemit
from .mainguard import explain_main_reimport
from .pickling import dumps, pickling_error
from .protocol import (
    STOP,
    ChildSettings,
    EndedBySigterm,
    Executing,
    Failed,
    Finished,
    Instance,
    LockReport,
    LogRecord,
    Reload,
    Reloaded,
    Result,
    SharedState,
    StopApplication,
)
from .supervise import KILL_GRACE, Watchdog, launch, preload_in_fork_server, sweep, terminate

if TYPE_CHECKING:
    from .._services import BackgroundService
    from .._status import ServiceRecord
    from .._token import CancellationToken

__all__ = ["ProcessRunner", "ReloadRefused"]

#: Messages read from a child's pipe before the wait loop checks RSS and heartbeat again.
DRAIN_BATCH = 500
#: How long the runner waits, after a child stopped on a SIGTERM the host did not send, for the
#: host's own stop (the same signal usually reached it) before it logs that the host runs on.
OUTSIDE_STOP_GRACE = 2.0


class _RemoteTraceback(Exception):
    """The child's traceback, chained as ``__cause__`` of the re-raised exception."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return f'\n"""\n{self.text.rstrip()}\n"""'


class ReloadRefused(Exception):
    """The child did not call ``reload()``, for the reason given (no traceback: nothing ran)."""


class _ReloadWait:
    """One reload request sent to the child, until its answer (or the child's end) comes."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.answer: Reloaded | None = None
        self.child_ended = False


class ProcessRunner(Runner):
    """``execute(stopping)`` in a child process named ``hostkit-<service>-<n>``."""

    _counter = itertools.count(1)

    def __init__(self, service: BackgroundService, record: ServiceRecord) -> None:
        super().__init__(service, record)
        self.options = record.process_options
        self.start_method: str = self.options.start_method or "forkserver"
        self.memory_limit: int | None = self.options.memory_limit
        self._payload: bytes | None = None
        self._process: Any = None
        self._shared: SharedState | None = None
        self._control: Any = None
        self._control_lock = threading.Lock()
        self._kill_reason: BaseException | None = None
        self._runs = 0
        self._reload_numbers = itertools.count(1)
        # Reload requests waiting for the child's answer, by number (under _control_lock).
        self._reload_waits: dict[int, _ReloadWait] = {}
        self._affinity: tuple[int, ...] | None = self.options.cpu_affinity

    # -- start: everything that can be checked before a child exists ---------------

    def start(self) -> None:
        self._affinity = self._cpus()
        self.record.update(cpu_affinity=self._affinity)
        self._payload = self._pickle()
        super().start()

    def _cpus(self) -> tuple[int, ...] | None:
        """The child's CPUs: ``cpu_affinity=``, or the host's own less ``keep_cores=`` of them."""
        keep = self.options.keep_cores
        if keep is None:
            return self.options.cpu_affinity
        # The host's CPUs now, at start: a server may pin its worker to fewer CPUs than
        # the machine has, and the ones it may use are the ones to share.
        host_cpus = sorted(os.sched_getaffinity(0))
        if keep >= len(host_cpus):
            msg = (
                f"{self.record.name!r}: keep_cores={keep} leaves no CPU for its child: the host may use "
                f"{len(host_cpus)} CPU(s) ({', '.join(map(str, host_cpus))}); keep at most {len(host_cpus) - 1}"
            )
            raise ConfigurationError(msg)
        # The host keeps the lowest-numbered CPUs; the child gets the rest.
        return tuple(host_cpus[keep:])

    def _pickle(self) -> bytes:
        service = self.service
        if isinstance(service, DeferredService):
            payload = service.payload()
            try:
                return dumps(payload)
            except Exception as err:
                raise pickling_error(self.record.name, dependencies=payload.collection, err=err) from err
        try:
            return dumps(Instance(service))
        except Exception as err:
            raise pickling_error(self.record.name, attributes=service.__getstate__(), err=err) from err

    def _settings(self, process_name: str) -> ChildSettings:
        policy, nice = self.options.scheduling()
        return ChildSettings(
            name=self.record.name,
            process_name=process_name,
            start_method=self.start_method,
            parent_pid=os.getpid(),
            stdlib_level=logging.getLogger().getEffectiveLevel(),
            nice=nice,
            cpu_affinity=self._affinity,
            sched_policy=policy,
            replica=self.record.replica,
        )

    # -- one run --------------------------------------------------------------------

    def _mark_started(self) -> None:
        # No child yet: STARTING, and no pid (the host's own pid would say "running here").
        self.record.mark(ServiceState.STARTING, pid=None)

    def _run_once(self) -> None:
        if self.stopping.is_set():
            return  # stopped before the child was started: nothing to run
        assert self._payload is not None
        self._runs += 1
        self._kill_reason = None
        ctx = multiprocess.get_context(self.start_method)
        if self.start_method == "forkserver":
            preload_in_fork_server(ctx)
        elif self.start_method == "fork":
            # The child's log bridge adds a loguru sink: paid here once per host process,
            # inherited paid by every fork (the fork server does the same for its children).
            fill_memo()
            # And its forwarding handler, built here once: each fork only puts it in place.
            prepare_for_fork()
            # The child side, imported once here so that no forked child imports it
            # (run_child imports it where it runs; the fork server preloads it).
            from . import child  # noqa: F401
        results_r, results_w = ctx.Pipe(duplex=False)
        control_r, control_w = ctx.Pipe(duplex=False)
        # Kept referenced here until the child is joined: a collected RawArray breaks the
        # child's unpickling under forkserver.
        shared_array = ctx.RawArray("d", SharedState.SLOTS)
        shared = SharedState(shared_array)
        name = f"hostkit-{self.record.name}-{next(self._counter)}"
        process = ctx.Process(
            target=run_child,
            args=(self._payload, self._settings(name), results_w, control_r, shared_array),
            name=name,
            daemon=False,
        )
        try:
            launch(process, self.start_method)
        except BaseException as err:
            for conn in (results_r, results_w, control_r, control_w):
                conn.close()
            message = explain_main_reimport(err)
            if message is None:
                raise
            # The hint leads the message, multiprocessing's own text follows: one record, in order.
            raise RuntimeError(message).with_traceback(err.__traceback__) from None
        # Our copies of the child's ends: closed so only the child holds them.
        results_w.close()
        control_r.close()
        with self._control_lock:
            self._process = process
            self._shared = shared
            self._control = control_w
        # STARTING with the child's pid until the child reports that execute began (a stop
        # already under way keeps its STOPPING).
        if self.record.state is ServiceState.RUNNING:
            self.record.mark(ServiceState.STARTING, pid=process.pid, detail=None)
        else:
            self.record.update(pid=process.pid, detail=None)
        self._log.debug("Started child process {} ({}, {})", process.pid, name, self.start_method)
        registration = self.stopping.register(self._send_stop)
        result: Result | None = None
        try:
            result = self._supervise(process, results_r, shared)
        finally:
            registration.unregister()
            process.join()  # reaped: never a zombie
            # However the child ended, the kernel released any lock it held.
            self.record.update(lock=None)
            with self._control_lock:
                self._control = None
                with contextlib.suppress(OSError):
                    control_w.close()
                waits, self._reload_waits = self._reload_waits, {}
            for wait in waits.values():
                # The child ended before it answered: whoever waits hears it now, not at its deadline.
                wait.child_ended = True
                wait.event.set()
            results_r.close()
            sweep(process.pid, self._log, self.record.name)
        self._outcome(process, result, shared)

    def _send_stop(self) -> None:
        with self._control_lock:
            control = self._control
            if control is None:
                return
            try:
                control.send_bytes(STOP)
            except OSError:
                pass  # the child already ended; its sentinel tells the supervising thread

    def _supervise(self, process: Any, results: Any, shared: SharedState) -> Result | None:
        """Wait for the child to end, re-emitting its logs and watching RSS and heartbeat."""
        watchdog = Watchdog(process.pid, self.record.name, shared, self.memory_limit, self.record.heartbeat_timeout)
        waitables: list[Any] = [results, process.sentinel]
        result: Result | None = None
        while True:
            ready = mpc.wait(waitables, timeout=watchdog.tick)
            if results in ready:
                result, eof = self._drain(results, process.pid, result)
                if eof:
                    waitables.remove(results)
            if process.sentinel in ready:
                break
            if self._kill_reason is None:
                self._check(process, watchdog)
        # The child has exited, so everything it wrote is in the pipe already: read it
        # all (batch after batch) so no line is lost at a clean stop.
        eof = results not in waitables
        while not eof:
            result, eof = self._drain(results, process.pid, result)
            try:
                eof = eof or not results.poll(0)
            except (EOFError, OSError):
                eof = True
        return result

    def _check(self, process: Any, watchdog: Watchdog) -> None:
        """Record a new heartbeat; stop the child if it is over its memory limit or hung."""
        problem: BaseException | None = watchdog.over_memory()
        if problem is None:
            beat = watchdog.new_beat()
            if beat is not None:
                self.record.update(last_heartbeat_at=beat)
            problem = watchdog.hung()
        if problem is not None:
            self._stop_child(process, problem)

    def _drain(self, results: Any, pid: int, result: Result | None) -> tuple[Result | None, bool]:
        """Read what is waiting on the result pipe: ``(the result, or the one given; EOF seen)``.

        At most ``DRAIN_BATCH`` messages per call, so a child that logs without pause
        cannot starve the RSS and heartbeat checks of the wait loop.
        """
        for _ in range(DRAIN_BATCH):
            try:
                if not results.poll(0):
                    return result, False
                blob = results.recv_bytes()
            except (EOFError, OSError):
                return result, True
            try:
                message = dill.loads(blob)
            except Exception:
                self._log.opt(exception=True).error("A message from child {} could not be read", pid)
                continue
            if isinstance(message, LogRecord):
                try:
                    reemit(message, pid, self.record.name)
                except Exception:
                    self._log.opt(exception=True).error("A log record from child {} could not be re-emitted", pid)
            elif isinstance(message, Executing):
                # Until now the service was STARTING: its child was starting up, importing,
                # unpickling or building the service. Not while a stop is already under way.
                if self.record.state is ServiceState.STARTING:
                    self.record.mark(ServiceState.RUNNING)
            elif isinstance(message, StopApplication):
                self._stop_application(pid)
            elif isinstance(message, LockReport):
                self.record.update(lock=message.status)
            elif isinstance(message, Reloaded):
                self._reload_answered(message, pid)
            elif isinstance(message, (Finished, Failed, EndedBySigterm)):
                result = message
            else:
                self._log.error("Child {} sent a message hostkit does not know: {!r}", pid, message)
        return result, False

    def _stop_application(self, pid: int) -> None:
        """The child called ``ApplicationLifetime.stop_application()``: ask the host to stop."""
        if not isinstance(self.service, DeferredService):
            return
        from .._lifetime import ApplicationLifetime

        self._log.info("Child process {} of {!r} asked the host to stop", pid, self.record.name)
        self.service.provider.get(ApplicationLifetime).stop_application()

    def reload(self, token: CancellationToken) -> bool:
        """Have the child call its service's ``reload``; wait for the answer until ``token`` is set.

        The child's call gets a token set at the same deadline (``token.remaining()``).

        Returns:
            ``True`` once ``reload`` returned in the child; ``False`` if no answer came
            before ``token`` was set (the call overran its deadline).

        Raises:
            BaseException: what ``reload`` raised in the child (its traceback as ``__cause__``).
            ChildProcessDiedError: no child is running, or it ended before it answered.
            ReloadRefused: the child did not call ``reload`` (its previous call is still running).
        """
        wait = _ReloadWait()
        remaining = token.remaining()
        with self._control_lock:
            control = self._control
            if control is None:
                msg = f"{self.record.name!r} has no child process running to reload"
                raise ChildProcessDiedError(msg, exitcode=None)
            number = next(self._reload_numbers)
            self._reload_waits[number] = wait
            try:
                control.send_bytes(dill.dumps(Reload(number, 3600.0 if remaining is None else remaining)))
            except OSError:
                del self._reload_waits[number]
                msg = f"the child process of {self.record.name!r} ended before it could be asked to reload"
                raise ChildProcessDiedError(msg, exitcode=None) from None
        # watch, not register: the wait is bounded by the token's own deadline, so no
        # timer thread is needed to end it.
        with token.watch(wait.event.set):
            wait.event.wait(remaining)
        with self._control_lock:
            self._reload_waits.pop(number, None)
        answer = wait.answer
        if answer is not None:
            if answer.refused is not None:
                raise ReloadRefused(answer.refused)
            if answer.error is not None:
                raise _rebuild(answer.error)
            return True
        if wait.child_ended:
            msg = f"the child process of {self.record.name!r} ended before its reload() returned"
            raise ChildProcessDiedError(msg, exitcode=None)
        return False

    def _reload_answered(self, message: Reloaded, pid: int) -> None:
        with self._control_lock:
            wait = self._reload_waits.pop(message.number, None)
        if wait is not None:
            wait.answer = message
            wait.event.set()
            return
        # The host stopped waiting at the deadline and reported the overrun: say how it ended.
        if message.refused is not None:
            self._log.debug(
                "Child process {} of {!r} refused a late reload: {}", pid, self.record.name, message.refused
            )
        elif message.error is None:
            self._log.info(
                "reload() of {!r} in child process {} returned after all, {:.2f} s after it began",
                self.record.name,
                pid,
                message.seconds,
            )
        else:
            self._log.error(
                "reload() of {!r} in child process {} failed after its deadline: {}\n{}",
                self.record.name,
                pid,
                message.error.summary,
                message.error.traceback.rstrip(),
            )

    def _stop_child(self, process: Any, reason: BaseException) -> None:
        """Stop a child that is hung or too big: the restart policy decides what comes next."""
        self._kill_reason = reason
        self._log.error("Background service {!r}: {}", self.record.name, reason)
        self.record.update(detail=str(reason))
        terminate(process, self._shared, KILL_GRACE)

    def _outcome(self, process: Any, result: Result | None, shared: SharedState) -> None:
        """Return if the run ended well, else raise what the host should know."""
        code = process.exitcode
        if self.timed_out_detail is not None:
            return  # escalated at the deadline; the base marks it timed out
        if self._kill_reason is not None:
            raise self._kill_reason
        if isinstance(result, Failed):
            raise _rebuild(result)
        if isinstance(result, Finished) and not shared.outside_sigterm:
            return
        if shared.outside_sigterm or code == -signal.SIGTERM:
            self._stopped_from_outside(process.pid)
            return
        if isinstance(result, EndedBySigterm):
            msg = f"child process {process.pid} of {self.record.name!r} was terminated by SIGTERM"
            raise ChildProcessDiedError(msg, exitcode=code)
        if code is not None and code < 0:
            try:
                signame = signal.Signals(-code).name
            except ValueError:
                signame = f"signal {-code}"
            msg = f"child process {process.pid} of {self.record.name!r} was killed by {signame} (exit code {code})"
        else:
            msg = (
                f"child process {process.pid} of {self.record.name!r} exited with code {code} without reporting "
                f"a result (os._exit() or a crash in native code)"
            )
        raise ChildProcessDiedError(msg, exitcode=code)

    def _stopped_from_outside(self, pid: int) -> None:
        """The child ended on a SIGTERM the host did not send: the service stopped, it did not fail.

        SIGTERM is how systemd, ``timeout`` and ``kill`` ask for a stop, and systemd
        counts an end by SIGTERM as clean; so does the host, whoever else it reached.
        Usually it reached every process of the unit, the host too, whose own stop may
        begin a moment after the child has ended: the log waits a little for it, so that
        it does not say the host runs on when it is about to stop.
        """
        if self._host_stops(OUTSIDE_STOP_GRACE):
            self._log.debug("Child process {} of {!r} ended on a SIGTERM as the host stops", pid, self.record.name)
            return
        self._log.warning(
            "Background service {!r}: its child process {} was stopped by a SIGTERM that the host did not send; "
            "the service is stopped and the host runs on without it",
            self.record.name,
            pid,
        )
        self.request_stop()

    def _host_stops(self, grace: float) -> bool:
        """``True`` if this service or the whole host is asked to stop within ``grace`` seconds."""
        gate = threading.Event()
        tokens = [self.stopping] if self.host_stopping is None else [self.stopping, self.host_stopping]
        with contextlib.ExitStack() as stack:
            for token in tokens:
                stack.enter_context(token.register(gate.set))
            gate.wait(grace)
        return any(token.is_set() for token in tokens)

    # -- the contract ---------------------------------------------------------------

    def where(self) -> str:
        process = self._process
        if process is None:
            return "no child process was started"
        # Only the supervising thread may poll the Process object: under forkserver,
        # polling reads the exit status from a socket, and a second reader would make
        # one of them see EOF (reported by multiprocess as exit code 255). Ask the OS.
        try:
            status: str = psutil.Process(process.pid).status()
        except psutil.Error:
            status = "gone"
        return f"child process {process.pid} ({process.name}) is {status}"

    def escalate(self, grace: float) -> str:
        process = self._process
        if process is None or self.ended.is_set() or not pid_alive(process.pid):
            self.timed_out_detail = "did not stop within the shutdown budget"
            self.ended.wait(max(grace, 0.0))
            return "its supervisor was still ending"
        began = time.monotonic()

        def note(action: str) -> None:
            self.timed_out_detail = f"did not stop within the shutdown budget; {action}"

        # Half of what is left for SIGTERM (the child's finally blocks run), the rest
        # for SIGKILL and reaping: the whole escalation fits in the host's reserve.
        action = terminate(process, self._shared, grace / 2, note)
        # The child is gone; give the supervising thread a moment to reap it and record
        # the end (at least 0.5 s on a loaded machine: still within the 1 s allowance).
        self.ended.wait(max(grace - (time.monotonic() - began), 0.5))
        return action

    def __repr__(self) -> str:
        pid = self._process.pid if self._process is not None else None
        return f"<ProcessRunner {self.record.name!r} {self.record.state.value} pid={pid} runs={self._runs}>"


def _rebuild(result: Failed) -> BaseException:
    """The child's exception (or a :class:`RemoteServiceError` standing in for it), its traceback as the cause."""
    exc: BaseException | None = None
    if result.blob is not None:
        try:
            loaded = dill.loads(result.blob)
        except Exception:
            loaded = None
        if isinstance(loaded, BaseException):
            exc = loaded
    if exc is None:
        exc = RemoteServiceError(
            f"{result.summary} (raised in the child as {result.type_name}; it could not be sent back)"
        )
    exc.__cause__ = _RemoteTraceback(result.traceback)
    return exc
