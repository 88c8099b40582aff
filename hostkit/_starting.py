"""The start of a host's services: three phases, and what a failed start reports.

Every service's ``starting``, then every ``start``, then every ``started``, in
registration order (or each phase all at once with ``start_concurrently``). A
call that raises ends the start-up; :class:`StartPhases` remembers which service
raised it (the exception itself is the user's, and carries nothing of ours), so
that the host can name the service, roll back, and raise
:class:`~hostkit.exceptions.HostStartupError`.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence

from loguru import logger

from ._calls import HungCall, LifecycleCalls
from ._status import ServiceRecord, ServiceState
from ._supervisor import format_failure
from ._token import CancellationToken
from ._util import thread_stack
from .exceptions import HostStartupError, StartupTimeoutError

__all__ = ["StartPhases", "report_start_failure", "startup_error"]

_log = logger.bind(service="host")


class StartPhases:
    """One start-up of ``records``; ``started`` collects those whose ``start`` returned."""

    def __init__(
        self,
        records: Sequence[ServiceRecord],
        calls: LifecycleCalls,
        started: list[ServiceRecord],
        *,
        concurrently: bool,
        stop_requested: Callable[[], bool],
    ) -> None:
        self._records = records
        self._calls = calls
        self._started = started
        self._concurrently = concurrently
        self._stop_requested = stop_requested
        # The exception a service's call raised (by id: it is alive while anyone asks) -> that service.
        self._culprits: dict[int, ServiceRecord] = {}

    def culprit(self, exc: BaseException) -> ServiceRecord | None:
        """The service whose lifecycle call raised ``exc`` (``None`` if none did)."""
        return self._culprits.get(id(exc))

    def run(self, token: CancellationToken, deadline: float | None) -> None:
        for phase in ("starting", "start", "started"):
            if self._concurrently:
                self._phase_concurrently(phase, token, deadline)
                continue
            for record in self._records:
                if self._stop_requested():
                    return
                self._one(record, phase, token, deadline)

    def _one(self, record: ServiceRecord, phase: str, token: CancellationToken, deadline: float | None) -> None:
        if phase == "start":
            record.mark(ServiceState.STARTING)
        try:
            self._calls.invoke(record, phase, token, deadline)
        except BaseException as exc:
            self._culprits.setdefault(id(exc), record)
            raise
        if phase == "start":
            self._started.append(record)
            if record.kind == "hosted":
                record.mark(ServiceState.RUNNING, pid=os.getpid())

    def _phase_concurrently(self, phase: str, token: CancellationToken, deadline: float | None) -> None:
        errors: list[BaseException] = []
        lock = threading.Lock()

        def one(record: ServiceRecord) -> None:
            try:
                self._one(record, phase, token, deadline)
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


def report_start_failure(exc: BaseException, record: ServiceRecord | None, startup_seconds: float | None) -> str:
    """Mark and log the service whose start failed; return the one-line summary of why."""
    name = record.name if record else "?"
    if isinstance(exc, HungCall):
        where = thread_stack(exc.call.thread)
        summary = f"start-up did not finish within startup_timeout={startup_seconds} s"
        if record is not None:
            record.mark(ServiceState.TIMED_OUT, error=summary, detail="start() did not return in time")
        _log.bind(service=name).critical(
            "Hosted service {!r} did not finish starting within startup_timeout ({} s); it is stuck at:\n{}",
            name,
            startup_seconds,
            where.rstrip(),
        )
        return summary
    summary, text = format_failure(exc)
    if record is not None:
        record.mark(ServiceState.FAULTED, error=summary, traceback=text, exception=exc)
    _log.bind(service=name).critical("Hosted service {!r} failed to start: {}\n{}", name, summary, text.rstrip())
    return summary


def startup_error(
    exc: BaseException, record: ServiceRecord | None, summary: str, started: int, startup_seconds: float | None
) -> HostStartupError:
    """The error ``Host.start()`` raises once the services already started were stopped again."""
    name = record.name if record else "?"
    if isinstance(exc, HungCall):
        return StartupTimeoutError(
            f"hosted service {name!r} did not finish starting within startup_timeout="
            f"{startup_seconds} s; the {started} service(s) already started were stopped. "
            f"Make its start() return promptly (move long work to a BackgroundService) or raise startup_timeout",
            service=name,
        )
    return HostStartupError(
        f"hosted service {name!r} failed to start: {summary}; the {started} service(s) already started were stopped",
        service=name,
    )
