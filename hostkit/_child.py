"""The child side of ``placement="process"``: bootstrap, stop watcher, log forwarding, result.

:func:`child_main` is the target of every service child. It runs, in order:

1. its own process group (``setpgid``): whatever the service starts (a
   ``subprocess``, a fork of itself) belongs to it, so the host can signal them all
   together and sweep what is left once the child has ended;
2. signals: SIGINT ignored (the host coordinates one stop); SIGTERM asks for a
   graceful stop (systemd's ``KillMode=control-group`` sends it to every process of
   the unit at once), unless the host has flagged in shared memory that it is
   ending this child (escalation, memory limit, hang): then SIGTERM raises
   :class:`Terminated` in the main thread, so ``finally`` blocks still run. The host
   launches the child with SIGINT and SIGTERM blocked, and they are unblocked only
   here, once the handlers are in place: a signal sent while the child was starting
   waits for them instead of killing it;
3. log forwarding: every stdlib ``logging`` record, and every loguru record, goes
   to the parent over the result pipe, in order. loguru is not imported here (a
   spawned child would pay tens of milliseconds for it): its forwarding sink is
   installed the moment the service's code imports it (at once if it already is,
   as under fork, or when the fork server preloaded it), and from then on stdlib
   records are routed through loguru as in the host;
4. the stop watcher thread: the stop request on the control pipe, the parent's
   sentinel (the parent died) and the SIGTERM wake-up pipe all set ``stopping``;
   ``PR_SET_PDEATHSIG`` as a backstop for fork and spawn. When the parent died,
   the watcher also ends what the service started (SIGTERM, then SIGKILL to the
   group), since no host is left to do it;
5. nice value and CPU affinity, then the service is unpickled (or built from its
   own container), and ``execute(stopping)`` runs;
6. the result (``ok``, or the exception with its traceback) is the last message
   on the pipe, so the parent has every log line before it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from types import FrameType, ModuleType
from typing import Any

import dill

from ._postimport import when_imported
from ._token import CancellationToken

__all__ = ["LAUNCH_BLOCKED", "ChildSettings", "SharedState", "child_main"]

#: How long a child whose parent died waits for ``execute`` (and what it started) to end before
#: it kills its process group, itself included.
ORPHAN_GRACE = 1.0
#: Exit code of a child that ended itself because its parent died and it ignored its token
#: (when it has no process group of its own to kill).
ORPHAN_EXIT_CODE = 70
#: Blocked in the host's thread that starts a child, unblocked by the child once its handlers
#: are in place: the mask is inherited through fork and exec, the handlers are not.
LAUNCH_BLOCKED = frozenset({signal.SIGINT, signal.SIGTERM})
#: Bytes the signal handlers write to the watcher's wake-up pipe.
_SIGTERM, _PARENT_DIED = b"T", b"P"

ChildSettings = dict[str, Any]


class Terminated(BaseException):
    """Raised in the child's main thread by a SIGTERM that arrives after a stop request."""


class _Channel:
    """The child's end of the result pipe; many threads log, so sends are serialised."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn
        self._lock = threading.Lock()
        self._closed = False

    def send(self, message: tuple[Any, ...]) -> None:
        with self._lock:
            if self._closed:
                return
            try:
                self._conn.send_bytes(dill.dumps(message))
            except (OSError, EOFError):
                # The parent is gone: nobody is left to read; the watcher ends the child.
                self._closed = True

    def close(self) -> None:
        with self._lock:
            self._closed = True
            with contextlib.suppress(OSError):
                self._conn.close()


class SharedState:
    """What the host and one child share through memory, not through the pipe.

    Plain doubles in a ``RawArray`` (no lock): the child's SIGTERM handler reads it
    (a handler must not take locks its own thread may hold), and a service may beat
    on every turn of its loop, far too often for the pipe. Each slot has one writer.
    """

    SLOTS = 4
    _BEAT, _EXECUTING, _ESCALATING, _OUTSIDE_SIGTERM = range(SLOTS)

    def __init__(self, array: Any) -> None:
        self.array = array

    @property
    def beat(self) -> float:
        """When the service last called ``heartbeat()`` (0: never). Written by the child."""
        return float(self.array[self._BEAT])

    @beat.setter
    def beat(self, when: float) -> None:
        self.array[self._BEAT] = when

    @property
    def executing(self) -> float:
        """When ``execute`` began (0: not yet); a hang is counted from here. Written by the child."""
        return float(self.array[self._EXECUTING])

    @executing.setter
    def executing(self, when: float) -> None:
        self.array[self._EXECUTING] = when

    @property
    def escalating(self) -> bool:
        """The host is ending this child: its next SIGTERM raises :class:`Terminated`. Written by the host."""
        return bool(self.array[self._ESCALATING])

    @escalating.setter
    def escalating(self, value: bool) -> None:
        self.array[self._ESCALATING] = 1.0 if value else 0.0

    @property
    def outside_sigterm(self) -> float:
        """When a SIGTERM the host did not send asked the child to stop (0: none). Written by the child."""
        return float(self.array[self._OUTSIDE_SIGTERM])

    @outside_sigterm.setter
    def outside_sigterm(self, when: float) -> None:
        self.array[self._OUTSIDE_SIGTERM] = when


class _Beat:
    """Stands in for the runner in the child.

    ``heartbeat()`` writes the time into shared memory (a service may beat on every
    loop turn, too often for the pipe); a deployment lock's status, which changes
    rarely, goes to the parent by the result pipe.
    """

    def __init__(self, shared: SharedState, channel: _Channel) -> None:
        self._shared = shared
        self._channel = channel

    #: A child has no record of the service: the host keeps it.
    record = None

    def heartbeat(self) -> None:
        self._shared.beat = time.time()

    def report_detail(self, text: str | None) -> None:
        """Dropped: a child has no record to show it on; its log lines reach the host."""

    def report_lock(self, status: Any) -> None:
        # Plain values: the parent rebuilds the LockStatus, so nothing of hostkit is pickled by reference.
        fields = None if status is None else (status.role, status.path, status.holder_pid)
        self._channel.send(("lock", fields))


def restore_logger(options: tuple[Any, ...]) -> Any:
    """The child's own loguru logger, with the options (bound extras, patchers) it was pickled with."""
    from loguru import logger

    logger_type: Any = type(logger)
    return logger_type(getattr(logger, "_core"), *options)  # noqa: B009 - private, on purpose


def _plain(value: object) -> object:
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return repr(value)


def _caller_module(default: str) -> str:
    """``__name__`` of the module that called the stdlib logger (what loguru names a record by)."""
    skip = (_caller_module.__code__.co_filename, logging.__file__)
    frame: FrameType | None = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename in skip:
        frame = frame.f_back
    if frame is None:
        return default
    return str(frame.f_globals.get("__name__", default))


class _LogForwarder:
    """Sends the child's log records to the parent, which re-emits them through loguru.

    loguru is imported in the child only if the service's code imports it (it costs
    a spawned child tens of milliseconds): its records then go through a sink, and
    stdlib ``logging`` records are routed into loguru as in the host. Until then
    stdlib records and hostkit's own lines are sent as they are, in the same shape.
    """

    def __init__(self, channel: _Channel, settings: ChildSettings) -> None:
        self.channel = channel
        self.service = settings["name"]
        self.pid = os.getpid()
        # Named once: every record carries it, and it does not change in this process.
        self.process_name = _process_name()
        self.stdlib_handler: logging.Handler | None = None
        self.loguru_installed = False

    # -- without loguru -----------------------------------------------------------

    def send(
        self,
        level: str,
        levelno: int,
        message: str,
        *,
        name: str,
        created: float,
        function: str,
        line: int,
        file_path: str,
        exception: str | None = None,
        extra: dict[str, object] | None = None,
    ) -> None:
        base = os.path.basename(file_path)
        thread = threading.current_thread()
        self.channel.send(
            (
                "log",
                {
                    "level": level,
                    "levelno": levelno,
                    "message": message,
                    "time": created,
                    "name": name,
                    "function": function,
                    "line": line,
                    "module": os.path.splitext(base)[0],
                    "file_name": base,
                    "file_path": file_path,
                    "thread_id": thread.ident,
                    "thread_name": thread.name,
                    "process_name": self.process_name,
                    "extra": {"service": self.service, "pid": self.pid, **(extra or {})},
                    "exception": exception,
                },
            )
        )

    def warning(self, message: str, exc: BaseException | None = None) -> None:
        """hostkit's own line from the child (loguru or not)."""
        caller = sys._getframe(1)
        self.send(
            "WARNING",
            logging.WARNING,
            message,
            name=__name__,
            created=time.time(),
            function=caller.f_code.co_name,
            line=caller.f_lineno,
            file_path=__file__,
            exception="".join(traceback.format_exception(exc)) if exc is not None else None,
        )

    def emit_stdlib(self, record: logging.LogRecord) -> None:
        exception = None
        if record.exc_info and record.exc_info[1] is not None:
            exception = "".join(traceback.format_exception(*record.exc_info))
        self.send(
            record.levelname,
            record.levelno,
            record.getMessage(),
            name=_caller_module(record.name),
            created=record.created,
            function=record.funcName,
            line=record.lineno,
            file_path=record.pathname,
            exception=exception,
            extra={"logger_name": record.name},
        )

    # -- with loguru ---------------------------------------------------------------

    def install_loguru(self, loguru: ModuleType) -> None:
        """Forward every loguru record; from now on route stdlib records through loguru."""
        logger = loguru.logger
        channel = self.channel
        process_name = self.process_name

        def sink(message: Any) -> None:
            record = message.record
            exc_text = None
            if record["exception"] is not None:
                etype, evalue, etb = record["exception"]
                exc_text = "".join(traceback.format_exception(etype, evalue, etb))
            channel.send(
                (
                    "log",
                    {
                        "level": record["level"].name,
                        "levelno": record["level"].no,
                        "message": record["message"],
                        "time": record["time"],
                        "name": record["name"],
                        "function": record["function"],
                        "line": record["line"],
                        "module": record["module"],
                        "file_name": record["file"].name,
                        "file_path": record["file"].path,
                        "thread_id": record["thread"].id,
                        "thread_name": record["thread"].name,
                        "process_name": process_name,
                        "extra": {str(k): _plain(v) for k, v in record["extra"].items()},
                        "exception": exc_text,
                    },
                )
            )

        # Under fork the parent's sinks were copied into the child: writing to them here
        # would bypass the parent (and its in-memory sinks would swallow the lines).
        logger.remove()
        logger.add(sink, level=0, format="{message}", enqueue=False, catch=True)
        logger.configure(extra={"service": self.service, "pid": self.pid})
        # hostkit disables its own logger; the parent filters by module name when it
        # re-emits, so enable everything here and let the parent's settings decide.
        logger.enable("")
        self.loguru_installed = True
        from ._logging import InterceptHandler

        # Swapped in place of the direct handler (not called from it: loguru names a
        # record by the frame that called the stdlib logger, which must be the caller's).
        root = logging.getLogger()
        if self.stdlib_handler is not None:
            root.removeHandler(self.stdlib_handler)
            self.stdlib_handler = None
        root.addHandler(InterceptHandler())

    def complete(self) -> None:
        if self.loguru_installed:
            sys.modules["loguru"].logger.complete()


class _StdlibHandler(logging.Handler):
    def __init__(self, forwarder: _LogForwarder) -> None:
        super().__init__()
        self.forwarder = forwarder

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.forwarder.emit_stdlib(record)
        except Exception:
            self.handleError(record)


def _process_name() -> str:
    """This child's name (``hostkit-<service>-<n>``); loguru alone would say the stdlib's ``MainProcess``."""
    import multiprocess  # the child runs under it: already imported

    return str(multiprocess.current_process().name)


def _forward_logs(channel: _Channel, settings: ChildSettings) -> _LogForwarder:
    """Send every record to the parent: stdlib ``logging`` now, loguru once it is imported."""
    forwarder = _LogForwarder(channel, settings)
    forwarder.stdlib_handler = _StdlibHandler(forwarder)
    root = logging.getLogger()
    root.handlers = [forwarder.stdlib_handler]
    root.setLevel(settings.get("stdlib_level", logging.WARNING))
    when_imported("loguru", forwarder.install_loguru)
    return forwarder


def _set_proctitle(name: str) -> None:
    try:
        import setproctitle  # type: ignore[import-not-found]
    except ImportError:
        return
    setproctitle.setproctitle(f"hostkit: {name}")


def _pdeathsig(settings: ChildSettings, wake_w: int) -> None:
    """Backstop: ask the kernel for a signal when the parent dies (fork and spawn, Linux only).

    The signal is one of its own (a real-time one), whose handler tells the watcher
    the host is gone. Not SIGTERM: the kernel sends it when the host's *thread* that
    started this child exits, and while a SIGKILLed host's other threads still
    exit, its end of the sentinel pipe is still open; a SIGTERM would stop
    ``execute`` as a mere stop request, and the child could end before it saw the
    sentinel, leaving what its service started behind.

    Under forkserver the child's parent is the fork server, which outlives the host,
    so this would never fire there; the sentinel watcher covers it.
    """
    if settings["start_method"] == "forkserver" or not sys.platform.startswith("linux"):
        return
    signum = signal.SIGRTMIN + 1

    def on_parent_death(signum: int, frame: object) -> None:
        with contextlib.suppress(OSError):
            os.write(wake_w, _PARENT_DIED)

    try:
        import ctypes

        signal.signal(signum, on_parent_death)
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, int(signum), 0, 0, 0)
    except (OSError, AttributeError, ValueError):
        return
    # The parent may have died before prctl: then nothing would ever send the signal.
    if os.getppid() != settings["parent_pid"]:
        on_parent_death(signum, None)


class _Ending:
    """Between the main thread and the watcher: has the host died, and is ``child_main`` done?"""

    def __init__(self) -> None:
        self.orphaned = threading.Event()
        self.main_done = threading.Event()


def _watch(control: Any, token: CancellationToken, wake_r: int, settings: ChildSettings, ending: _Ending) -> None:
    """The stop watcher thread: control pipe, parent sentinel, SIGTERM wake-up pipe."""
    import multiprocess.connection as mpc
    from multiprocess import parent_process

    parent = parent_process()
    sentinel = parent.sentinel if parent is not None else None
    waitables: list[Any] = [control, wake_r]
    if sentinel is not None:
        waitables.append(sentinel)
    orphaned = False
    while not orphaned:
        ready = mpc.wait(waitables)
        if wake_r in ready:
            try:
                woken = os.read(wake_r, 64)
            except OSError:
                woken = b""
            if _PARENT_DIED in woken:
                orphaned = True
                # Before the token: execute() may return, and child_main end, at once.
                ending.orphaned.set()
            token.set()
        if control in ready:
            try:
                control.recv_bytes()
            except (EOFError, OSError):
                # The parent closes the control pipe only after this child ended:
                # EOF while we run means the parent died.
                orphaned = True
            else:
                token.set()
                waitables.remove(control)
        if sentinel is not None and sentinel in ready:
            orphaned = True
    ending.orphaned.set()
    token.set()
    _end_orphan(settings, ending)


def _parent_gone() -> bool:
    """``True`` if the host process has died (its sentinel is readable), under every start method."""
    import multiprocess.connection as mpc
    from multiprocess import parent_process

    parent = parent_process()
    return parent is not None and bool(mpc.wait([parent.sentinel], timeout=0))


def _leads_own_group() -> bool:
    return os.getpgrp() == os.getpid()


def _others_in_group() -> list[int]:
    """The other live processes of this child's process group: what the service started."""
    import psutil  # only on the orphan path: a child does not pay for it otherwise

    me, group = os.getpid(), os.getpgrp()
    found = []
    for pid in psutil.pids():
        if pid == me:
            continue
        try:
            if os.getpgid(pid) == group:
                found.append(pid)
        except OSError:
            continue  # gone, or not ours to ask about
    return found


def _end_orphan(settings: ChildSettings, ending: _Ending) -> None:
    """The host died, so nobody can stop, escalate or sweep: end the service, what it started, and this child."""
    leader = _leads_own_group()
    if leader:
        # What the service started gets the same grace as execute() does. Sent to each
        # one by pid: SIGTERM to the whole group would reach this process too, whose
        # handler the service's code may have replaced with the default (death).
        for pid in _others_in_group():
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGTERM)
    ending.main_done.wait(ORPHAN_GRACE)
    with contextlib.suppress(OSError):
        os.write(2, f"hostkit: {settings['name']}: the host process died; ending this child\n".encode())
    if leader:
        # One system call for the whole group, this process included: nothing the service
        # forks meanwhile can slip between a listing and the kill.
        with contextlib.suppress(OSError):
            os.killpg(0, signal.SIGKILL)
    os._exit(ORPHAN_EXIT_CODE)


def _own_process_group() -> OSError | None:
    """Make this child the leader of a new process group; the error if it could not."""
    try:
        os.setpgid(0, 0)
    except OSError as err:
        return err
    return None


def _default_sigterm_in_forks() -> None:
    """In a process the service forks from this one, SIGTERM has its default action again.

    The handler below only makes sense in the child itself: in a fork it would write
    to the child's wake-up pipe (stopping the child, not the fork) and never end the
    fork. The host's sweep of the group relies on SIGTERM ending such processes.
    """
    with contextlib.suppress(ValueError, OSError):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _install_signals(shared: SharedState, wake_w: int) -> None:
    def on_sigterm(signum: int, frame: object) -> None:
        # No locks here: a handler runs between two bytecodes of the main thread, which
        # may hold the token's own lock (Event.wait). Setting the token is the watcher
        # thread's job; we only write a byte to its wake-up pipe. The flag is shared
        # memory the host sets *before* it sends its own SIGTERM, so which SIGTERM this
        # is does not depend on which of two processes ran first: a SIGTERM sent to
        # every process at once can reach this handler after the host's stop request
        # reached the watcher, and it is still a stop request, not an escalation.
        if shared.escalating:
            raise Terminated
        if not shared.outside_sigterm:
            shared.outside_sigterm = time.time()
        with contextlib.suppress(OSError):
            os.write(wake_w, _SIGTERM)

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, on_sigterm)


def _apply_resources(settings: ChildSettings) -> None:
    nice = settings.get("nice")
    if nice is not None:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, nice)
        except OSError as err:
            msg = f"cannot set the child's nice value to {nice}: {err} (lowering it below 0 needs privileges)"
            raise PermissionError(msg) from err
    cpus = settings.get("cpu_affinity")
    if cpus is not None:
        import psutil

        try:
            psutil.Process().cpu_affinity(list(cpus))
        except (ValueError, OSError) as err:
            last = (os.cpu_count() or 1) - 1
            msg = f"cannot set the child's CPU affinity to {sorted(cpus)}: {err} (this machine has CPUs 0-{last})"
            raise ValueError(msg) from err


def _load(payload: bytes, token: CancellationToken, channel: _Channel) -> tuple[Any, Callable[[], None]]:
    """The service object, and what to close when it ends (its own container's singletons)."""
    kind, *rest = dill.loads(payload)
    if kind == "instance":
        return rest[0], lambda: None
    from ._di import ServiceDescriptor, ServiceProvider
    from ._lifetime import ApplicationLifetime

    collection, key = rest
    lifetime = ApplicationLifetime()
    lifetime.started.set()
    token.register(lifetime.stopping.set)

    def ask_host() -> None:
        # stop_application() in the child asks the host, which stops everything in order.
        # Only when the service's code asked: `stopping` is also set from the token (the
        # host's own stop request, a SIGTERM), and that is no request to pass back.
        if not token.is_set():
            channel.send(("stop_application",))

    lifetime.set_stop_handler(ask_host)
    own = ServiceDescriptor(ApplicationLifetime, "singleton", instance=lifetime)
    collection._descriptors[ApplicationLifetime] = own
    provider = ServiceProvider(collection, validate=False)
    return provider.get(key), provider.close


def _describe_error(exc: BaseException) -> tuple[Any, ...]:
    text = "".join(traceback.format_exception(exc))
    summary = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    try:
        blob: bytes | None = dill.dumps(exc)
    except Exception:
        blob = None
    return ("error", blob, f"{type(exc).__module__}.{type(exc).__qualname__}", summary, text)


def child_main(payload: bytes, settings: ChildSettings, results: Any, control: Any, shared_array: Any) -> None:
    """Run one service's ``execute`` in this (child) process; report the result to the parent."""
    token = CancellationToken(name=settings["name"])
    shared = SharedState(shared_array)
    channel = _Channel(results)
    # Under fork the host's wake-up fd was inherited: a signal here would be reported to
    # the host's signal loop as if the host had received it.
    signal.set_wakeup_fd(-1)
    group_error = _own_process_group()
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    _install_signals(shared, wake_w)
    os.register_at_fork(after_in_child=_default_sigterm_in_forks)
    # Handlers in place: a SIGINT or SIGTERM sent while this child was starting (it was
    # blocked since the host launched it) is delivered now, to them.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, LAUNCH_BLOCKED)
    logs = _forward_logs(channel, settings)
    if group_error is not None:
        logs.warning(
            f"This child could not lead its own process group ({group_error}); what its service starts "
            f"will not be stopped with it"
        )
    _set_proctitle(settings["process_name"])
    ending = _Ending()
    watcher = threading.Thread(
        target=_watch,
        args=(control, token, wake_r, settings, ending),
        name=f"hostkit-{settings['name']}-watch",
        daemon=True,
    )
    watcher.start()
    _pdeathsig(settings, wake_w)
    result: tuple[Any, ...] = ("ok",)
    close: Callable[[], None] = lambda: None  # noqa: E731
    try:
        try:
            _apply_resources(settings)
            service, close = _load(payload, token, channel)
            from ._runner_table import attach_runner

            beat = _Beat(shared, channel)  # the table holds it weakly: kept alive here while execute runs
            attach_runner(service, beat)
            shared.executing = time.time()
            service.execute(token)
        finally:
            # Past execute a late SIGTERM has nothing left to interrupt; the result
            # must reach the parent whole.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            try:
                close()
            except Exception as exc:
                logs.warning("Closing the child's singletons failed", exc)
    except Terminated:
        result = ("terminated",)
    except BaseException as exc:
        result = _describe_error(exc)
    logs.complete()
    channel.send(result)
    channel.close()
    ending.main_done.set()
    if ending.orphaned.is_set() or _parent_gone():
        # The host is gone: returning would end this process before the watcher has
        # ended what the service started. The watcher (which sees the same sentinel,
        # if it has not yet) ends this process itself. The parent's death can stop
        # execute() before the watcher notices it: PR_SET_PDEATHSIG's SIGTERM sets
        # the token through the wake-up pipe, which the watcher may read first.
        watcher.join()
