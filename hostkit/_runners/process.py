"""Process placement: ``execute`` runs in a dedicated child process, supervised.

Data flow for one run (one child; a restart makes a new child)::

    host process                                         child process (hostkit._child)
    ------------                                         ------------------------------
    ProcessRunner.start()
      payload = dill.dumps(service)  --- pickling error here: ServicePicklingError
    supervising thread hostkit-<svc>
      Supervisor -> _run_once()
        ctx.Process(child_main) ---------------------->  signals, log forwarding, watcher thread
        control pipe  ---- b"stop" / EOF ------------->  watcher: stopping.set()
        parent sentinel (host dies) ------------------>  watcher: stopping.set(), then exit
        RawValue('d') <--- heartbeat() time ----------   service.heartbeat()
        result pipe   <--- ("log", record) -----------   loguru sink (stdlib routed into loguru)
                      <--- ("ok") / ("error", exc, tb)   after execute returns or raises
        wait([result pipe, child sentinel], tick)
          re-emit logs, sample RSS and heartbeat
        child exits -> drain pipe, join (reaped), raise or return
    Host._escalate -> escalate(grace): SIGTERM, wait, SIGKILL, join

Only the supervising thread reads the result pipe, so a child's records are
re-emitted in the order it wrote them, and the result is read after every one of
them: none is lost at a clean stop.
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

from .._child import Terminated, child_main, restore_logger
from .._services import BackgroundService
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
#: Grace between SIGTERM and SIGKILL when the runner stops a hung or oversized child.
KILL_GRACE = 1.0


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
    from .._di import _name

    head = f"process-placed service {name!r} cannot be sent to its child process"
    for attr, value in state.items():
        try:
            dumps(value)
        except Exception as inner:
            if what == "dependency":
                msg = (
                    f"{head}: its dependency {_name(attr)} (a {value.lifetime} registration) cannot be pickled, "
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
        # Shared memory for heartbeats: a child may beat on every loop turn, far too
        # often for the pipe. Kept referenced here until the child is joined (facts.md:
        # a collected Value breaks the child's unpickling under forkserver).
        beat = ctx.RawValue("d", 0.0)
        name = f"hostkit-{self.record.name}-{next(self._counter)}"
        process = ctx.Process(
            target=child_main,
            args=(self._payload, self._settings(name), results_w, control_r, beat),
            name=name,
            daemon=False,
        )
        try:
            process.start()
        except BaseException:
            for conn in (results_r, results_w, control_r, control_w):
                conn.close()
            raise
        # Our copies of the child's ends: closed so only the child holds them.
        results_w.close()
        control_r.close()
        with self._control_lock:
            self._process = process
            self._control = control_w
        began = time.time()
        self.record.update(pid=process.pid, detail=None)
        self._log.debug("Started child process {} ({}, {})", process.pid, name, self.start_method)
        registration = self.stopping.register(self._send_stop)
        result: tuple[Any, ...] | None = None
        try:
            result = self._supervise(process, results_r, beat, began)
        finally:
            registration.unregister()
            process.join()  # reaped: never a zombie
            with self._control_lock:
                self._control = None
                with contextlib.suppress(OSError):
                    control_w.close()
            results_r.close()
        self._outcome(process, result)

    def _send_stop(self) -> None:
        with self._control_lock:
            control = self._control
            if control is None:
                return
            try:
                control.send_bytes(b"stop")
            except OSError:
                pass  # the child already ended; its sentinel tells the supervising thread

    def _supervise(self, process: Any, results: Any, beat: Any, began: float) -> tuple[Any, ...] | None:
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
                value = float(beat.value)
                if value and value != last_beat:
                    last_beat = value
                    self.record.update(last_heartbeat_at=value)
                since = last_beat or began
                if time.time() - since > timeout:
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
        """SIGTERM, wait up to ``grace``, then SIGKILL. Returns what was done.

        ``note`` hears each step *before* it is taken, so whoever reads it after the
        child ended (the supervising thread) sees the step that ended it.
        """
        action = f"child process {process.pid} was terminated (SIGTERM)"
        if note is not None:
            note(action)
        with contextlib.suppress(OSError, ValueError, AttributeError):
            process.terminate()
        if mpc.wait([process.sentinel], timeout=max(grace, 0.0)):
            return action
        action = f"child process {process.pid} was killed (SIGKILL) after {grace:.2f} s"
        if note is not None:
            note(action)
        with contextlib.suppress(OSError, ValueError, AttributeError):
            process.kill()
        mpc.wait([process.sentinel], timeout=1.0)
        return action

    def _outcome(self, process: Any, result: tuple[Any, ...] | None) -> None:
        """Return if the run ended well, else raise what the host should know."""
        code = process.exitcode
        if self.timed_out_detail is not None:
            return  # escalated at the deadline; the base marks it timed out
        if self._kill_reason is not None:
            raise self._kill_reason
        if result is not None and result[0] == "ok":
            return
        if result is not None and result[0] == "error":
            raise self._rebuild(result)
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
