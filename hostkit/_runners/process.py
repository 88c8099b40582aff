"""Process placement: ``execute`` runs in a dedicated child process, supervised.

Data flow for one run (one child; a restart makes a new child)::

    host process                                         child process (hostkit._child)
    ------------                                         ------------------------------
    ProcessRunner.start()
      payload = dill.dumps(service)  --- pickling error here: ServicePicklingError
    supervising thread hostkit-<svc>
      Supervisor -> _run_once()
        ctx.Process(child_main)   (SIGINT, SIGTERM      own process group, signals, log
          blocked while it starts) ------------------>  forwarding, watcher thread; unblock
        control pipe  ---- b"stop" / EOF ------------->  watcher: stopping.set()
        parent sentinel (host dies) ------------------>  watcher: stopping.set(), SIGTERM to the
                                                           group, then SIGKILL to it (itself too)
        SharedState   <--- heartbeat() time ----------   service.heartbeat()
                      <--- execute() began -----------   the hang clock starts here
                      <--- a SIGTERM not the host's --   its handler: stopping.set()
                      ---- escalating --------------->   its handler: SIGTERM raises Terminated
        result pipe   <--- ("log", record) -----------   loguru sink (stdlib routed into loguru)
                      <--- ("lock", fields) ----------   OncePerDeployment: holder or standby
                      <--- ("ok") / ("error", exc, tb)   after execute returns or raises
        wait([result pipe, child sentinel], tick)
          re-emit logs, sample RSS and heartbeat
        child exits -> drain pipe, join (reaped), sweep its group, raise or return
    Host._escalate -> escalate(grace): flag, SIGTERM to the group, wait, SIGKILL to it, join

Only the supervising thread reads the result pipe, so a child's records are
re-emitted in the order it wrote them, and the result is read after every one of
them: none is lost at a clean stop.

Each child leads its own process group, so what its service starts (a
``subprocess``, a fork of itself) is signalled with it: SIGTERM then SIGKILL at an
escalation, and, once the child has ended for any reason, a sweep: SIGTERM to
what is left in the group, SIGKILL after ``KILL_GRACE``. A process that leaves the
group (``setsid``, as daemons do) is beyond reach.

A SIGTERM the host did not send (systemd signals every process of a unit at once)
asks the child to stop gracefully, and the service then counts as stopped, never
as failed: also when it ended by SIGTERM's default action, and whether the host
got the same signal (the usual case) or not.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import dill
import multiprocess
import multiprocess.connection as mpc
import psutil
from loguru import logger

from .._child import LAUNCH_BLOCKED, SharedState, Terminated, child_main, restore_logger
from .._mainguard import explain_main_reimport
from .._services import BackgroundService
from .._status import LockStatus
from .._util import pid_alive
from ..exceptions import (
    ChildProcessDiedError,
    MemoryLimitError,
    RemoteServiceError,
    ServiceHungError,
    ServicePicklingError,
)
from ._base import Runner

if TYPE_CHECKING:
    from .._di import ServiceProvider
    from .._registration import HostedServiceRegistration
    from .._status import ServiceRecord
    from .._token import CancellationToken

__all__ = ["DeferredService", "ProcessRunner"]

_ = Terminated  # the child's escalation exception; named here for readers of the data flow

#: Seconds between RSS / heartbeat samples while a child runs (when either is watched).
SAMPLE_INTERVAL = 0.2
#: Messages read from a child's pipe before the wait loop checks RSS and heartbeat again.
DRAIN_BATCH = 500
#: Grace between SIGTERM and SIGKILL when the runner stops a hung or oversized child, and
#: for what a child left in its process group after it ended.
KILL_GRACE = 1.0
#: How long the runner waits, after a child stopped on a SIGTERM the host did not send, for the
#: host's own stop (the same signal usually reached it) before it logs that the host runs on.
OUTSIDE_STOP_GRACE = 2.0
#: Seconds between checks that a swept process group is empty.
_SWEEP_POLL = 0.02


class _RemoteTraceback(Exception):
    """The child's traceback, chained as ``__cause__`` of the re-raised exception."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return f'\n"""\n{self.text.rstrip()}\n"""'


class DeferredService(BackgroundService):
    """Stands in the host for a process-placed service registered as a class.

    The class is built in the child, by the child's own container (singletons are
    per process), so the host process never constructs it nor holds what its
    constructor opens.

    Its ``execute`` never runs in the host.
    """

    def __init__(self, registration: HostedServiceRegistration, provider: ServiceProvider) -> None:
        self.registration = registration
        self.provider = provider

    def execute(self, stopping: CancellationToken) -> None:  # pragma: no cover - never called
        msg = f"{self.registration.display_name} is built and run in its child process"
        raise RuntimeError(msg)

    def payload(self) -> tuple[Any, ...]:
        """What the child builds its own container from: this service's registrations and its dependencies'.

        The host's ``ApplicationLifetime`` stays here (it refers to the host itself);
        the child makes its own.
        """
        from .._lifetime import ApplicationLifetime

        collection = self.provider.registrations_for(self.registration)
        collection._descriptors.pop(ApplicationLifetime, None)
        return ("provider", collection, self.registration)

    def __repr__(self) -> str:
        return f"<DeferredService {self.registration.name!r} built in its child>"


def _save_logger(pickler: Any, obj: Any) -> None:
    pickler.save_reduce(restore_logger, (obj._options,), obj=obj)


def _refuse_lock(pickler: Any, obj: Any) -> None:
    # dill would send a fresh, unlocked lock: the child's copy guards nothing the parent
    # (or another child) holds, so code that relies on it is silently unsynchronised.
    kind = type(obj)
    msg = (
        f"cannot pickle '{kind.__module__}.{kind.__qualname__}' object "
        f"(a copy in the child would not be shared with this process)"
    )
    raise TypeError(msg)


class _Pickler(dill.Pickler):  # type: ignore[misc]
    """dill, plus two rules: a loguru logger crosses as the child's own logger; a thread lock does not cross.

    A service (or a function it closes over) usually refers to loguru's ``logger``;
    pickled by value it would drag the host's sinks (open files, pytest's capture)
    along, and fail. A ``threading.Lock``/``RLock`` (also inside an ``Event``, a
    ``Condition``, a ``queue.Queue``) is refused like a socket: dill would send an
    unshared copy. Our own dispatch table, so dill's global one is left alone.
    """

    dispatch = dill.Pickler.dispatch.copy()
    dispatch[type(logger)] = _save_logger
    dispatch[type(threading.Lock())] = _refuse_lock
    dispatch[type(threading.RLock())] = _refuse_lock


def dumps(obj: object) -> bytes:
    """dill with ``recurse=True`` (a function's globals are pickled by what it uses) and the logger rule."""
    buffer = io.BytesIO()
    _Pickler(buffer, recurse=True).dump(obj)
    return buffer.getvalue()


def _pickling_error(name: str, what: str, state: dict[Any, Any], err: Exception) -> ServicePicklingError:
    """Name the first attribute (or dependency) that dill cannot pickle."""
    from .._di import display_name

    head = f"process-placed service {name!r} cannot be sent to its child process"
    for attr, value in state.items():
        try:
            dumps(value)
        except Exception as inner:
            if what == "dependency":
                msg = (
                    f"{head}: its dependency {display_name(attr)} (a {value.lifetime} registration) cannot be pickled, "
                    f"even with dill: {inner}. Register it by class or factory= instead of instance=, so the child "
                    f"builds its own"
                )
            else:
                msg = (
                    f"{head}: its attribute {attr!r} ({type(value).__name__}) cannot be pickled, even with dill: "
                    f"{inner}. Create it inside execute() (it then lives in the child), or register the class so "
                    f"the child builds it"
                )
            return ServicePicklingError(msg)
    return ServicePicklingError(f"{head}, even with dill: {err}")


# -- re-emitting a child's log records in the host --------------------------------------

_EMIT_SOURCE = "def emit(log, level, message):\n    log.log(level, message)\n"
_emitters: dict[str, Callable[[Any, Any, str], None]] = {}


def _emitter(module_name: str) -> Callable[[Any, Any, str], None]:
    """A function whose module is ``module_name``.

    loguru's ``enable``/``disable`` filter on the calling frame's ``__name__``; calling
    ``logger.log`` from a function with the child's module name keeps those settings
    working for a child's records exactly as for the host's own.
    """
    fn = _emitters.get(module_name)
    if fn is None:
        namespace: dict[str, Any] = {"__name__": module_name}
        exec(compile(_EMIT_SOURCE, f"<hostkit child {module_name}>", "exec"), namespace)
        fn = namespace["emit"]
        _emitters[module_name] = fn
    return fn


def _reemit(data: dict[str, Any], pid: int, service: str) -> None:
    when = data["time"]

    def patch(record: Any) -> None:
        if isinstance(when, float):  # sent without loguru (a stdlib record): a timestamp
            record["time"] = type(record["time"]).fromtimestamp(when, tz=record["time"].tzinfo)
        else:
            record["time"] = when
        record["function"] = data["function"]
        record["line"] = data["line"]
        record["module"] = data["module"]
        record["name"] = data["name"]
        record["file"] = type(record["file"])(data["file_name"], data["file_path"])
        record["thread"] = type(record["thread"])(data["thread_id"], data["thread_name"])
        record["process"] = type(record["process"])(pid, data["process_name"])

    extra = dict(data["extra"])
    extra.setdefault("service", service)
    extra["pid"] = pid
    try:
        level: Any = logger.level(data["level"]).name
    except ValueError:
        level = data["levelno"]
    message = data["message"]
    if data["exception"]:
        message = f"{message}\n{data['exception'].rstrip()}"
    _emitter(data["name"] or "__main__")(logger.patch(patch).bind(**extra), level, message)


_preload_lock = threading.Lock()


def _preload_in_forkserver(ctx: Any) -> None:
    """Have the fork server import hostkit's child side and loguru once, so each child need not.

    Without it every forkserver child imports hostkit's child side and dill on its
    own, and loguru when its service logs through it (~40 ms here, most of a child's
    start). Only effective if the fork server is not running yet; modules the user
    asked to preload are kept.
    """
    from multiprocess import forkserver

    with _preload_lock:
        server = forkserver._forkserver
        current = list(getattr(server, "_preload_modules", ["__main__"]))
        wanted = [m for m in ("hostkit._forkserver", "hostkit._child", "loguru") if m not in current]
        if wanted:
            ctx.set_forkserver_preload([*current, *wanted])


def _start_shielded(process: Any, start_method: str) -> None:
    """``process.start()`` with SIGINT and SIGTERM blocked in this thread; the child inherits the mask.

    Until the child has installed its own handlers, a SIGINT or SIGTERM sent to it
    (to the whole group, as systemd does) would kill it (spawn: Python's defaults),
    or run the host's handler in it (fork). Blocked, the signal waits, and the child
    handles it once it is ready (``child_main`` unblocks). The fork server, if this
    call starts it, inherits the mask too and ignores both before it unblocks them.

    multiprocess's resource tracker unblocks both signals in the calling thread after
    it starts, so it is started first, outside the shielded part.
    """
    if start_method in ("spawn", "forkserver"):
        from multiprocess import resource_tracker

        resource_tracker.ensure_running()
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, LAUNCH_BLOCKED)
    try:
        process.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _signal_group(pid: int, signum: int) -> None:
    """Send ``signum`` to the process group a child leads (it and what it started), else to the child alone.

    A child that has not made its group yet (it is still starting) has none: then
    the signal goes to its pid.
    """
    try:
        os.killpg(pid, signum)
        return
    except (ProcessLookupError, PermissionError):
        pass  # no such group (yet): the child alone
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signum)


def _group_members(pgid: int) -> list[int]:
    """The live pids of process group ``pgid``, for the log."""
    found = []
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(proc.pid)
        except OSError:
            continue
    return found


class ProcessRunner(Runner):
    """``execute(stopping)`` in a child process named ``hostkit-<service>-<n>``."""

    _counter = itertools.count(1)

    def __init__(self, service: BackgroundService, record: ServiceRecord) -> None:
        super().__init__(service, record)
        options = record.process_options
        self.start_method: str = options.get("start_method", "forkserver")
        self.memory_limit: int | None = options.get("memory_limit")
        self._payload: bytes | None = None
        self._process: Any = None
        self._shared: SharedState | None = None
        self._control: Any = None
        self._control_lock = threading.Lock()
        self._kill_reason: BaseException | None = None
        self._runs = 0

    # -- start: everything that can be checked before a child exists ---------------

    def start(self) -> None:
        self._payload = self._pickle()
        super().start()

    def _pickle(self) -> bytes:
        service = self.service
        if isinstance(service, DeferredService):
            payload = service.payload()
            try:
                return dumps(payload)
            except Exception as err:
                raise _pickling_error(self.record.name, "dependency", payload[1]._descriptors, err) from err
        try:
            return dumps(("instance", service))
        except Exception as err:
            raise _pickling_error(self.record.name, "attribute", service.__getstate__(), err) from err

    def _settings(self, process_name: str) -> dict[str, Any]:
        options = self.record.process_options
        return {
            "name": self.record.name,
            "process_name": process_name,
            "start_method": self.start_method,
            "parent_pid": os.getpid(),
            "nice": options.get("nice"),
            "cpu_affinity": options.get("cpu_affinity"),
            "stdlib_level": logging.getLogger().getEffectiveLevel(),
        }

    # -- one run --------------------------------------------------------------------

    def _run_once(self) -> None:
        if self.stopping.is_set():
            return  # stopped before the child was started: nothing to run
        assert self._payload is not None
        self._runs += 1
        self._kill_reason = None
        ctx = multiprocess.get_context(self.start_method)
        if self.start_method == "forkserver":
            _preload_in_forkserver(ctx)
        results_r, results_w = ctx.Pipe(duplex=False)
        control_r, control_w = ctx.Pipe(duplex=False)
        # Kept referenced here until the child is joined: a collected RawArray breaks the
        # child's unpickling under forkserver.
        shared_array = ctx.RawArray("d", SharedState.SLOTS)
        shared = SharedState(shared_array)
        name = f"hostkit-{self.record.name}-{next(self._counter)}"
        process = ctx.Process(
            target=child_main,
            args=(self._payload, self._settings(name), results_w, control_r, shared_array),
            name=name,
            daemon=False,
        )
        try:
            _start_shielded(process, self.start_method)
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
        self.record.update(pid=process.pid, detail=None)
        self._log.debug("Started child process {} ({}, {})", process.pid, name, self.start_method)
        registration = self.stopping.register(self._send_stop)
        result: tuple[Any, ...] | None = None
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
            results_r.close()
            self._sweep(process.pid)
        self._outcome(process, result, shared)

    def _send_stop(self) -> None:
        with self._control_lock:
            control = self._control
            if control is None:
                return
            try:
                control.send_bytes(b"stop")
            except OSError:
                pass  # the child already ended; its sentinel tells the supervising thread

    def _supervise(self, process: Any, results: Any, shared: SharedState) -> tuple[Any, ...] | None:
        """Wait for the child to end, re-emitting its logs and watching RSS and heartbeat."""
        watch = self.memory_limit is not None or self.record.heartbeat_timeout is not None
        tick = SAMPLE_INTERVAL if watch else None
        if self.record.heartbeat_timeout is not None:
            tick = min(SAMPLE_INTERVAL, self.record.heartbeat_timeout / 4)
        waitables: list[Any] = [results, process.sentinel]
        result: tuple[Any, ...] | None = None
        ps: psutil.Process | None = None
        last_beat = 0.0
        while True:
            ready = mpc.wait(waitables, timeout=tick)
            if results in ready:
                result, eof = self._drain(results, process.pid, result)
                if eof:
                    waitables.remove(results)
            if process.sentinel in ready:
                break
            if self._kill_reason is not None:
                continue
            if self.memory_limit is not None:
                try:
                    ps = ps or psutil.Process(process.pid)
                    rss = ps.memory_info().rss
                except psutil.Error:
                    rss = 0
                if rss > self.memory_limit:
                    self._stop_child(
                        process,
                        MemoryLimitError(
                            f"child process {process.pid} of {self.record.name!r} used {rss / 1e6:.1f} MB RSS, "
                            f"over its memory_limit of {self.memory_limit / 1e6:.1f} MB; it was stopped"
                        ),
                    )
                    continue
            timeout = self.record.heartbeat_timeout
            if timeout is not None:
                value = shared.beat
                if value and value != last_beat:
                    last_beat = value
                    self.record.update(last_heartbeat_at=value)
                # Counted from the last beat, or from when execute() began: the child's own
                # start-up (imports, unpickling, building the service) is no hang of its loop.
                since = last_beat or shared.executing
                if since and time.time() - since > timeout:
                    self._stop_child(
                        process,
                        ServiceHungError(
                            f"child process {process.pid} of {self.record.name!r} sent no heartbeat for "
                            f"{time.time() - since:.1f} s (heartbeat_timeout {timeout:g} s); treated as a hang "
                            f"and stopped"
                        ),
                    )
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

    def _drain(self, results: Any, pid: int, result: tuple[Any, ...] | None) -> tuple[tuple[Any, ...] | None, bool]:
        """Read what is waiting on the result pipe: ``(result message or the one given, EOF seen)``.

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
            if message[0] == "log":
                try:
                    _reemit(message[1], pid, self.record.name)
                except Exception:
                    self._log.opt(exception=True).error("A log record from child {} could not be re-emitted", pid)
            elif message[0] == "stop_application":
                self._stop_application(pid)
            elif message[0] == "lock":
                self.record.update(lock=None if message[1] is None else LockStatus(*message[1]))
            else:
                result = message
        return result, False

    def _stop_application(self, pid: int) -> None:
        """The child called ``ApplicationLifetime.stop_application()``: ask the host to stop."""
        if not isinstance(self.service, DeferredService):
            return
        from .._lifetime import ApplicationLifetime

        self._log.info("Child process {} of {!r} asked the host to stop", pid, self.record.name)
        self.service.provider.get(ApplicationLifetime).stop_application()

    def _stop_child(self, process: Any, reason: BaseException) -> None:
        """Stop a child that is hung or too big: the restart policy decides what comes next."""
        self._kill_reason = reason
        self._log.error("Background service {!r}: {}", self.record.name, reason)
        self.record.update(detail=str(reason))
        self._terminate(process, KILL_GRACE)

    def _terminate(self, process: Any, grace: float, note: Callable[[str], None] | None = None) -> str:
        """SIGTERM to the child's group, wait up to ``grace``, then SIGKILL to it. Returns what was done.

        ``note`` hears each step *before* it is taken, so whoever reads it after the
        child ended (the supervising thread) sees the step that ended it.
        """
        action = f"child process {process.pid} was terminated (SIGTERM)"
        if note is not None:
            note(action)
        shared = self._shared
        if shared is not None:
            # Before the signal: the child's handler reads it to tell this SIGTERM (end
            # now, with finally blocks) from any other (a request to stop).
            shared.escalating = True
        _signal_group(process.pid, signal.SIGTERM)
        if mpc.wait([process.sentinel], timeout=max(grace, 0.0)):
            return action
        action = f"child process {process.pid} was killed (SIGKILL) after {grace:.2f} s"
        if note is not None:
            note(action)
        _signal_group(process.pid, signal.SIGKILL)
        mpc.wait([process.sentinel], timeout=1.0)
        return action

    def _sweep(self, pgid: int) -> None:
        """End what the child left in its process group: SIGTERM, then SIGKILL after ``KILL_GRACE``.

        Called once the child has been reaped. Its pid stays allocated while its group
        has members, so the group cannot be confused with a newer process's; when the
        group is empty (the usual case) this is one system call.
        """
        try:
            os.killpg(pgid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            return
        left = _group_members(pgid)
        self._log.warning(
            "Background service {!r}: its child process {} left processes running in its process group {}; "
            "sent them SIGTERM",
            self.record.name,
            pgid,
            left,
        )
        deadline = time.monotonic() + KILL_GRACE
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except (ProcessLookupError, PermissionError):
                return
            time.sleep(_SWEEP_POLL)
        left = _group_members(pgid)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        self._log.warning(
            "Background service {!r}: processes {} of child process {}'s group were still running {:.1f} s after "
            "SIGTERM; sent them SIGKILL",
            self.record.name,
            left,
            pgid,
            KILL_GRACE,
        )

    def _outcome(self, process: Any, result: tuple[Any, ...] | None, shared: SharedState) -> None:
        """Return if the run ended well, else raise what the host should know."""
        code = process.exitcode
        if self.timed_out_detail is not None:
            return  # escalated at the deadline; the base marks it timed out
        if self._kill_reason is not None:
            raise self._kill_reason
        if result is not None and result[0] == "error":
            raise self._rebuild(result)
        if result is not None and result[0] == "ok" and not shared.outside_sigterm:
            return
        if shared.outside_sigterm or code == -signal.SIGTERM:
            self._stopped_from_outside(process.pid)
            return
        if result is not None and result[0] == "terminated":
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

    def _rebuild(self, result: tuple[Any, ...]) -> BaseException:
        _, blob, type_name, summary, text = result
        exc: BaseException | None = None
        if blob is not None:
            try:
                loaded = dill.loads(blob)
            except Exception:
                loaded = None
            if isinstance(loaded, BaseException):
                exc = loaded
        if exc is None:
            exc = RemoteServiceError(f"{summary} (raised in the child as {type_name}; it could not be sent back)")
        exc.__cause__ = _RemoteTraceback(text)
        return exc

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
        action = self._terminate(process, grace / 2, note)
        # The child is gone; give the supervising thread a moment to reap it and record
        # the end (at least 0.5 s on a loaded machine: still within the 1 s allowance).
        self.ended.wait(max(grace - (time.monotonic() - began), 0.5))
        return action

    def __repr__(self) -> str:
        pid = self._process.pid if self._process is not None else None
        return f"<ProcessRunner {self.record.name!r} {self.record.state.value} pid={pid} runs={self._runs}>"
