"""The runner contract shared by thread and process placement.

A runner owns one background service's run: a supervising thread named
``hostkit-<service>`` runs :meth:`Runner._run_once` under the restart policy
(:class:`~hostkit._supervisor.Supervisor`), records every state change, logs how
the run ended, and sets :attr:`Runner.ended`. The host stops it with
:meth:`request_stop` + :meth:`wait`, and at the deadline asks it to
:meth:`escalate`.
"""

from __future__ import annotations

import os
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING

from loguru import logger

# The table of which runner runs which service lives in a module that imports nothing
# heavy: a spawned child attaches its stand-in without loading loguru. Published here too.
from .._runner_table import RunnerLike, attach_runner, detach_runner, runner_for
from .._status import LockStatus, ServiceRecord, ServiceState
from .._supervisor import Supervisor, format_failure
from .._token import CancellationToken
from ..exceptions import HostStateError, SupervisorError

if TYPE_CHECKING:
    from .._services import BackgroundService, Replica

__all__ = ["Runner", "RunnerLike", "attach_runner", "detach_runner", "runner_for"]


class Runner(ABC):
    """Runs one background service in its placement."""

    def __init__(self, service: BackgroundService, record: ServiceRecord) -> None:
        self.service = service
        self.record = record
        self.stopping = CancellationToken(name=record.name)
        self.ended = CancellationToken(name=f"{record.name}:ended")
        self.on_end: Callable[[Runner], None] | None = None
        self.failure: BaseException | None = None
        #: Set by :meth:`escalate`: the run ended because the deadline passed, not on its own.
        self.timed_out_detail: str | None = None
        #: The host's ``lifetime.stopping``: a run that ends once it is set ended because
        #: the host is stopping (a service may watch it to wind down early), so it counts
        #: as stopped, not completed.
        self.host_stopping: CancellationToken | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._log = logger.bind(service=record.name)

    # -- lifecycle ----------------------------------------------------------------

    def start(self) -> None:
        with self._lock:
            if self._thread is not None:
                msg = f"background service {self.record.name!r} was already started; a service runs once per host"
                raise HostStateError(msg)
            self._thread = threading.Thread(target=self._main, name=f"hostkit-{self.record.name}", daemon=True)
        self._mark_started()
        self._thread.start()

    def _mark_started(self) -> None:
        """The record's state once ``start()`` returns: RUNNING here, in this process."""
        self.record.mark(ServiceState.RUNNING, pid=os.getpid())

    @property
    def started(self) -> bool:
        return self._thread is not None

    @property
    def running(self) -> bool:
        return self._thread is not None and not self.ended.is_set()

    def runs_on(self, thread: threading.Thread) -> bool:
        """``True`` if ``thread`` is the one that runs (and supervises) the service."""
        return self._thread is thread

    def request_stop(self) -> None:
        """Set the service's ``stopping`` token (idempotent)."""
        if self.running and not self.stopping.is_set():
            self.record.mark(ServiceState.STOPPING)
        self.stopping.set()

    def wait(self, token: CancellationToken) -> bool:
        """Wait until the run ended or ``token`` is set. ``True`` if it ended."""
        if self._thread is None or self.ended.is_set():
            return True
        gate = threading.Event()
        # watch, not register: the wait is bounded by the token's own deadline, so no
        # timer thread is needed to end it.
        with self.ended.register(gate.set), token.watch(gate.set):
            gate.wait(token.remaining())
        return self.ended.is_set()

    def join(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` seconds for the run to end. ``True`` if it ended."""
        if self._thread is None:
            return True
        return self.ended.wait(timeout)

    @property
    def replica(self) -> Replica | None:
        """Which replica of its registration the service is: the host's record says."""
        return self.record.replica

    def heartbeat(self) -> None:
        """Record a heartbeat from the service."""
        self.record.update(last_heartbeat_at=time.time())

    def report_detail(self, text: str | None) -> None:
        """Show ``text`` as the service's status detail (``None`` clears it)."""
        self.record.update(detail=text)

    def report_lock(self, status: LockStatus | None) -> None:
        """Record where the service stands with its deployment lock (``None``: it has none now)."""
        self.record.update(lock=status)

    # -- the supervising thread ---------------------------------------------------

    def _main(self) -> None:
        try:
            self._supervise_and_report()
        except BaseException as exc:
            # Reporting how the run ended failed: a bug in hostkit. The thread must not end
            # quietly (threading's hook only prints to stderr) and leave the service showing
            # as running: fault it, and log it where every other error goes.
            self.failure = exc
            self.record.mark(
                ServiceState.FAULTED,
                error=f"hostkit failed to report how the run ended: {type(exc).__name__}",
                detail=None,
            )
            self._log.opt(exception=exc).critical(
                "hostkit failed to report how background service {!r} ended; it is no longer run. "
                "This is a bug in hostkit, please report it with this traceback",
                self.record.name,
            )
        finally:
            self._finish()

    def _supervise_and_report(self) -> None:
        try:
            self.record.update(thread_id=threading.get_native_id())
            with logger.contextualize(service=self.record.name):
                Supervisor(self.record, self.stopping, self._run_once).run()
        except SupervisorError as exc:
            # Not the service's failure: the loop that ran and restarted it broke. Said
            # so in the log, and the service is faulted so that the host applies
            # on_background_error and health reports it, rather than it going quiet.
            self.failure = exc
            summary, text = format_failure(exc)
            self.record.mark(ServiceState.FAULTED, error=summary, traceback=text, exception=exc, detail=None)
            self._log.critical(
                "The restart supervisor of background service {!r} failed; the service is no longer run. "
                "This is a bug in hostkit, please report it with this traceback:\n{}",
                self.record.name,
                text.rstrip(),
            )
        except BaseException as exc:
            self.failure = exc
            summary, text = format_failure(exc)
            self.record.mark(ServiceState.FAULTED, error=summary, traceback=text, exception=exc, detail=None)
            self._log.critical("Background service {!r} failed: {}\n{}", self.record.name, summary, text.rstrip())
        else:
            if self.timed_out_detail is not None:
                self.record.mark(ServiceState.TIMED_OUT, detail=self.timed_out_detail)
                # The host logs this event once, at ERROR, with where the service was stuck and
                # what was done to it (Host._escalate); here it is only the run's end.
                self._log.debug("Background service {!r} {}", self.record.name, self.timed_out_detail)
            # The line first, then the state: whoever sees the state (a test, a probe) finds
            # the line already written.
            elif self.stopping.is_set() or (self.host_stopping is not None and self.host_stopping.is_set()):
                self._log.info("Background service {!r} stopped", self.record.name)
                self.record.mark(ServiceState.STOPPED, detail=None)
            else:
                self._log.info("Background service {!r} completed", self.record.name)
                self.record.mark(ServiceState.COMPLETED, detail=None)

    def _finish(self) -> None:
        self.ended.set()
        callback = self.on_end
        if callback is not None:
            try:
                callback(self)
            except Exception:
                self._log.opt(exception=True).error("The host's end-of-run handler for {!r} raised", self.record.name)

    # -- placement-specific -------------------------------------------------------

    @abstractmethod
    def _run_once(self) -> None:
        """Run ``execute`` once in the placement; raise if it failed."""

    @abstractmethod
    def where(self) -> str:
        """Where the service is now: a thread's stack, a child's pid and state."""

    @abstractmethod
    def escalate(self, grace: float) -> str:
        """The stop deadline passed with the service still running: do what can be done.

        Returns a short description of what was done, for the log.
        """

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.record.name!r} {self.record.state.value}>"
