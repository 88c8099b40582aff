"""The child side of ``placement="process"``: bootstrap, stop watcher, result.

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
3. the log bridge (:mod:`hostkit._process.logbridge`): every loguru record, and
   every stdlib ``logging`` record (routed through loguru as in the host), goes to
   the parent over the result pipe, in order;
4. the stop watcher thread (:mod:`hostkit._process.orphan`): the stop request on
   the control pipe, the parent's sentinel (the parent died) and the SIGTERM
   wake-up pipe all set ``stopping``; ``PR_SET_PDEATHSIG`` as a backstop for fork
   and spawn. When the parent died, the watcher also ends what the service started
   (SIGTERM, then SIGKILL to the group), since no host is left to do it. A reload
   request on the control pipe goes to :mod:`hostkit._process.childreload`;
5. scheduling policy, nice value and CPU affinity, then the service is unpickled (or built from its
   own container), and ``execute(stopping)`` runs;
6. the result (:data:`~hostkit._process.protocol.Result`) is the last message on
   the pipe, so the parent has every log line before it.
"""

from __future__ import annotations

import _thread
import contextlib
import importlib.util
import os
import signal
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import dill

from .._runner_table import attach_runner, detach_runner
from .._token import CancellationToken
from .childreload import ChildReloads
from .logbridge import ChildLog
from .orphan import Ending, arm_pdeathsig, parent_gone, watch
from .protocol import (
    LAUNCH_BLOCKED,
    ChildSettings,
    EndedBySigterm,
    Executing,
    Failed,
    Finished,
    FromContainer,
    LockReport,
    Message,
    Payload,
    Result,
    SharedState,
    StopApplication,
)

__all__ = ["Terminated", "child_main"]

#: Bytes the SIGTERM handler writes to the watcher's wake-up pipe.
SIGTERM_BYTE = b"T"
#: The "execute began" message, pickled once where this module is imported, not in each
#: child on its way to execute.
_EXECUTING = dill.dumps(Executing())


class Terminated(BaseException):
    """Raised in the child's main thread by a SIGTERM that arrives after a stop request."""


class _Channel:
    """The child's end of the result pipe; many threads log, so sends are serialised."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn
        self._lock = threading.Lock()
        self._closed = False

    def send(self, message: Message) -> None:
        self.send_pickled(dill.dumps(message))

    def send_pickled(self, blob: bytes) -> None:
        with self._lock:
            if self._closed:
                return
            try:
                self._conn.send_bytes(blob)
            except (OSError, EOFError):
                # The parent is gone: nobody is left to read; the watcher ends the child.
                self._closed = True

    def close(self) -> None:
        with self._lock:
            self._closed = True
            with contextlib.suppress(OSError):
                self._conn.close()


class _Beat:
    """Stands in for the runner in the child.

    ``heartbeat()`` writes the time into shared memory (a service may beat on every
    loop turn, too often for the pipe); a deployment lock's status, which changes
    rarely, goes to the parent by the result pipe. It has no record: the host's
    runner keeps it.
    """

    record = None

    def __init__(self, shared: SharedState, channel: _Channel, replica: Any = None) -> None:
        self._shared = shared
        self._channel = channel
        #: Which replica the service is (``BackgroundService.replica``), from the host's settings.
        self.replica = replica

    def heartbeat(self) -> None:
        self._shared.beat = time.time()

    beat = heartbeat

    def report_detail(self, text: str | None) -> None:
        """Not sent: the detail of a process-placed service stays in the log lines the child forwards."""

    def report_lock(self, status: Any) -> None:
        self._channel.send(LockReport(status))


# Looked up once, where this module is imported (the host, or the fork server that
# preloads it): a failed import searches every folder of sys.path again, about 0.7 ms
# of each child's start. Only looked up here, not imported: the host has no use for it.
_HAS_SETPROCTITLE = importlib.util.find_spec("setproctitle") is not None


def _set_proctitle(name: str) -> None:
    if not _HAS_SETPROCTITLE:
        return
    try:
        import setproctitle  # type: ignore[import-not-found]
    except ImportError:
        return
    setproctitle.setproctitle(f"hostkit: {name}")


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
            os.write(wake_w, SIGTERM_BYTE)

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, on_sigterm)


def _apply_resources(settings: ChildSettings) -> None:
    # Linux keeps the policy, nice value and affinity per thread: set on the main thread
    # here, they hold for execute() and every thread it starts; the stop watcher, started
    # earlier, keeps the host's priority and so wakes at once for a stop request.
    policy = settings.sched_policy
    if policy is not None:
        number = os.SCHED_IDLE if policy == "idle" else os.SCHED_BATCH
        try:
            os.sched_setscheduler(0, number, os.sched_param(0))
        except OSError as err:
            msg = f"cannot set the child's scheduling policy to SCHED_{policy.upper()}: {err}"
            raise PermissionError(msg) from err
    nice = settings.nice
    if nice is not None:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, nice)
        except OSError as err:
            now = os.getpriority(os.PRIO_PROCESS, 0)
            msg = (
                f"cannot set the child's nice value to {nice}: {err} (it is {now}; a nice value below the "
                f"current one needs privileges: CAP_SYS_NICE, or RLIMIT_NICE)"
            )
            raise PermissionError(msg) from err
    cpus = settings.cpu_affinity
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
    loaded: Payload = dill.loads(payload)
    if not isinstance(loaded, FromContainer):
        return loaded.service, lambda: None
    from .._di import ServiceProvider
    from .._lifetime import ApplicationLifetime

    def ask_host() -> None:
        # stop_application() in the child asks the host, which stops everything in order.
        # Only when the service's code asked: `stopping` is also set from the token (the
        # host's own stop request, a SIGTERM), and that is no request to pass back.
        if not token.is_set():
            channel.send(StopApplication())

    lifetime = ApplicationLifetime()
    lifetime.set_stop_handler(ask_host)
    lifetime.started.set()
    token.register(lifetime.stopping.set)
    # The child's own lifetime: the host's refers to the host, and stays there.
    collection = loaded.collection
    collection.add_singleton(ApplicationLifetime, instance=lifetime)
    provider = ServiceProvider(collection, validate=False)
    return provider.get(loaded.key), provider.close


def _start_watcher(name: str, *args: Any) -> None:
    """Start the stop watcher (:func:`~hostkit._process.orphan.watch` with ``args``) on a daemon thread; do not wait.

    ``threading.Thread.start()`` blocks until the new thread runs: on a busy machine
    the scheduler takes 0.3-1 ms to run it, a fifth of a forked child's whole start,
    and execute() would wait for it. The watcher needs no such handshake: whatever
    it must notice (a stop or reload request on the control pipe, a byte on the
    wake-up pipe, the parent's sentinel) the kernel keeps until it looks, so a
    watcher that runs a moment after execute() began misses nothing.
    """

    def run() -> None:
        ending: Ending = args[4]
        # Named as a threading.Thread would be, so that what runs on it (token callbacks
        # that log) shows which thread it was.
        threading.current_thread().name = name
        try:
            watch(*args)
        finally:
            # watch() ends only through os._exit (a dead host); should it raise instead,
            # the main thread must not wait for it forever.
            ending.watcher_done.set()

    _thread.start_new_thread(run, ())


def _describe_error(exc: BaseException) -> Failed:
    text = "".join(traceback.format_exception(exc))
    summary = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    try:
        blob: bytes | None = dill.dumps(exc)
    except Exception:
        blob = None
    return Failed(blob, f"{type(exc).__module__}.{type(exc).__qualname__}", summary, text)


def child_main(payload: bytes, settings: ChildSettings, results: Any, control: Any, shared_array: Any) -> None:
    """Run one service's ``execute`` in this (child) process; report the result to the parent."""
    token = CancellationToken(name=settings.name)
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
    logs = ChildLog(channel, settings.name, settings.process_name)
    logs.install(settings.stdlib_level)
    if group_error is not None:
        logs.warning(
            f"This child could not lead its own process group ({group_error}); what its service starts "
            f"will not be stopped with it"
        )
    _set_proctitle(settings.process_name)
    ending = Ending()
    reloads = ChildReloads(settings.name, channel.send, token, _describe_error, logs.warning)
    _start_watcher(f"hostkit-{settings.name}-watch", control, token, wake_r, settings, ending, reloads.handle)
    arm_pdeathsig(settings, wake_w)
    result: Result = Finished()
    close: Callable[[], None] = lambda: None  # noqa: E731
    try:
        try:
            _apply_resources(settings)
            service, close = _load(payload, token, channel)
            beat = _Beat(shared, channel, settings.replica)
            attach_runner(service, beat)
            reloads.attach(service)
            shared.executing = time.time()
            channel.send_pickled(_EXECUTING)
            try:
                service.execute(token)
            finally:
                detach_runner(service, beat)
        finally:
            # Past execute a late SIGTERM has nothing left to interrupt; the result
            # must reach the parent whole.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            try:
                close()
            except Exception as exc:
                logs.warning("Closing the child's singletons failed", exc)
    except Terminated:
        result = EndedBySigterm()
    except BaseException as exc:
        result = _describe_error(exc)
    logs.complete()
    channel.send(result)
    channel.close()
    ending.main_done.set()
    if ending.orphaned.is_set() or parent_gone():
        # The host is gone: returning would end this process before the watcher has
        # ended what the service started. The watcher (which sees the same sentinel,
        # if it has not yet) ends this process itself. The parent's death can stop
        # execute() before the watcher notices it: PR_SET_PDEATHSIG's SIGTERM sets
        # the token through the wake-up pipe, which the watcher may read first.
        ending.watcher_done.wait()
