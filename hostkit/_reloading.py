"""Reload: every running service's ``reload()``, at once, within one deadline, never overlapping.

A reload is asked for by SIGHUP to ``Host.run()`` (what ``systemctl reload`` sends)
or by ``Host.reload()``; both go through :meth:`Reloader.request`::

    request ──> a reload is running? ──yes──> join the one follow-up reload (coalesced)
       │ no
       v
    thread hostkit-host-reload
       listeners' began()                         (systemd: RELOADING=1)
       every RUNNING service that overrides reload(), all at once, one deadline:
         hosted / thread-placed   reload(token) on a helper thread hostkit-<service>-reload
         process-placed           a Reload message to its child, which calls reload(token)
                                  on a thread of its own and answers (hostkit._process.childreload)
       each outcome: reloaded | failed (ERROR, traceback) | timed out (ERROR, where it is stuck)
       the record's last_reload_at / reload_error, then listeners' ended(report)   (systemd: READY=1)
       the report to every caller waiting; then the follow-up, if one was asked for meanwhile

The token each ``reload`` gets is set at the deadline (``HostOptions.reload_timeout``)
and when the host begins to stop. A call still running at the deadline is left on its
thread (a thread cannot be killed; a child is not killed for a slow reload) and
reported; the next reload does not call that service again until it has returned.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Literal

from loguru import logger

from ._calls import HelperCall, LifecycleCalls
from ._lifetime import ApplicationLifetime
from ._options import HostOptions
from ._services import HostedService, class_overrides
from ._status import ServiceRecord, ServiceState
from ._summary import format_failure
from ._token import CancellationToken, CancellationTokenSource
from ._util import thread_stack
from .exceptions import HostStateError

__all__ = ["ReloadReport", "Reloader", "ServiceReload", "has_reload_hook"]

_log = logger.bind(service="host")

#: Seconds a call may take past the deadline that set its token, and still count as returned:
#: code that watches the token returns a moment after it fires, which is no overrun.
REPLY_GRACE = 0.5


@dataclass(frozen=True)
class ServiceReload:
    """How one service's ``reload()`` went.

    Attributes:
        name: the service's name.
        result: ``"reloaded"`` (it returned), ``"failed"`` (it raised, or its child
            ended first) or ``"timed_out"`` (still running at the deadline; left behind).
        seconds: how long the host waited for it.
        error: ``"Type: message"`` of the failure, or why it timed out; ``None`` when reloaded.

    .. versionadded:: 0.2
    """

    name: str
    result: Literal["reloaded", "failed", "timed_out"]
    seconds: float
    error: str | None = None


@dataclass(frozen=True)
class ReloadReport:
    """What one reload did: returned by :meth:`Host.reload() <hostkit.Host.reload>`.

    Attributes:
        services: one :class:`ServiceReload` per service whose ``reload()`` was
            called, in registration order. Services without a ``reload()`` are not
            called and not listed: they keep running untouched.
        skipped: services with a ``reload()`` that were not called because they were
            not running (starting, restarting, stopped, faulted).

    .. versionadded:: 0.2
    """

    services: tuple[ServiceReload, ...] = ()
    skipped: tuple[str, ...] = ()

    @property
    def reloaded(self) -> tuple[str, ...]:
        """The names of the services whose ``reload()`` returned."""
        return tuple(s.name for s in self.services if s.result == "reloaded")

    @property
    def failed(self) -> tuple[str, ...]:
        """The names of the services whose ``reload()`` raised or timed out."""
        return tuple(s.name for s in self.services if s.result != "reloaded")

    @property
    def ok(self) -> bool:
        """``True`` when no ``reload()`` failed or timed out."""
        return not self.failed

    def __getitem__(self, name: str) -> ServiceReload:
        for service in self.services:
            if service.name == name:
                return service
        called = ", ".join(s.name for s in self.services) or "none"
        msg = f"no reload of a service named {name!r}; the reload called: {called}"
        raise KeyError(msg)


def has_reload_hook(record: ServiceRecord) -> bool:
    """``True`` if the service's class overrides ``reload`` (for a process-placed one: the class its child builds)."""
    service: object = record.service
    cls: type[HostedService] = type(record.service)
    if record.placement == "process":
        from ._process.deferred import DeferredService

        if isinstance(record.service, DeferredService):
            service = record.service.registration.service
            cls = record.service.registration.service_class
    from ._once import OncePerDeployment

    if isinstance(service, OncePerDeployment):
        # The wrapper forwards reload() to the service it runs: it has a hook when that one has.
        return class_overrides(type(service.service), "reload")
    return class_overrides(cls, "reload")


#: Called when a reload begins, and with its report when it ended.
Began = Callable[[], None]
Ended = Callable[[ReloadReport], None]


class _Unanswered(Exception):
    """A child did not answer its reload request before the deadline."""


class Reloader:
    """Runs the host's reloads, one at a time, coalescing requests that come meanwhile."""

    def __init__(
        self,
        records: Sequence[ServiceRecord],
        calls: LifecycleCalls,
        options: HostOptions,
        lifetime: ApplicationLifetime,
    ) -> None:
        self._records = records
        self._calls = calls
        self._options = options
        self._lifetime = lifetime
        self._lock = threading.Lock()
        self._running = False
        self._next: Future[ReloadReport] | None = None
        self._listeners: list[tuple[Began, Ended]] = []
        # A call that overran its deadline, by service name, until it returns: not called again meanwhile.
        self._overran: dict[str, HelperCall] = {}
        self._local = threading.local()

    def inside(self) -> bool:
        """``True`` on a thread that runs a service's ``reload()`` in this process."""
        return bool(getattr(self._local, "in_reload", False))

    def add_listener(self, began: Began, ended: Ended) -> Callable[[], None]:
        """Call ``began()`` before every reload and ``ended(report)`` after it; returns the remover."""
        pair = (began, ended)
        with self._lock:
            self._listeners.append(pair)

        def remove() -> None:
            with self._lock:
                if pair in self._listeners:
                    self._listeners.remove(pair)

        return remove

    def request(self, reason: str) -> Future[ReloadReport]:
        """Ask for a reload; the future holds its report.

        While a reload runs, every request joins one follow-up reload that begins when
        it ends: however many came, one more reload sees the newest configuration.
        """
        with self._lock:
            if self._next is not None:
                _log.info("{}: a reload is running and another is already queued; this request joins it", reason)
                return self._next
            future: Future[ReloadReport] = Future()
            if self._running:
                self._next = future
                _log.info("{}: a reload is running; one more reload follows when it ends", reason)
                return future
            self._running = True
        thread = threading.Thread(target=self._loop, args=(future, reason), name="hostkit-host-reload", daemon=True)
        try:
            thread.start()
        except BaseException:
            with self._lock:
                self._running = False
            raise
        return future

    def _loop(self, future: Future[ReloadReport], reason: str) -> None:
        current: Future[ReloadReport] | None = future
        while current is not None:
            if self._lifetime.stopping.is_set():
                current.set_exception(HostStateError("the host began to stop before this reload could run"))
            else:
                try:
                    current.set_result(self._reload(reason))
                except BaseException as exc:  # a bug in hostkit: the waiters must hear of it
                    _log.opt(exception=exc).critical("The reload failed in hostkit itself; please report it")
                    current.set_exception(exc)
            with self._lock:
                current, self._next = self._next, None
                if current is None:
                    self._running = False
            reason = "Follow-up reload"

    def _reload(self, reason: str) -> ReloadReport:
        began = time.monotonic()
        timeout = self._options.reload_seconds
        deadline = began + timeout
        chosen = [r for r in self._records if has_reload_hook(r)]
        running = [r for r in chosen if r.state is ServiceState.RUNNING]
        skipped = tuple(r.name for r in chosen if r.state is not ServiceState.RUNNING)
        _log.info(
            "{}: reloading {} service(s) (reload_timeout {:g} s){}",
            reason,
            len(running),
            timeout,
            f"; not running, skipped: {', '.join(skipped)}" if skipped else "",
        )
        self._notify("began")
        outcomes: list[ServiceReload] = []
        with CancellationTokenSource(self._lifetime.stopping, cancel_after=timeout, name="reload") as source:
            started = [(record, self._launch(record, source.token)) for record in running]
            for record, call in started:
                outcomes.append(self._outcome(record, call, began, deadline))
        report = ReloadReport(tuple(outcomes), skipped)
        if report.ok:
            _log.info("Reload done in {:.3f} s: {} service(s) reloaded", time.monotonic() - began, len(outcomes))
        else:
            _log.error(
                "Reload done in {:.3f} s: {} reloaded, failed: {}",
                time.monotonic() - began,
                len(report.reloaded),
                ", ".join(report.failed),
            )
        self._notify("ended", report)
        return report

    def _launch(self, record: ServiceRecord, token: CancellationToken) -> HelperCall | str:
        """Start ``record``'s reload on a helper thread; or say why it cannot be called now."""
        previous = self._overran.get(record.name)
        if previous is not None:
            if previous.thread.is_alive():
                return "its previous reload() has not returned yet (it overran its deadline)"
            del self._overran[record.name]
        fn: Callable[[CancellationToken], None]
        runner = record.runner
        if record.placement == "process":
            from ._process.runner import ProcessRunner

            assert isinstance(runner, ProcessRunner)
            reload_child = runner.reload

            def fn(token: CancellationToken) -> None:
                if not reload_child(token):
                    raise _Unanswered

        else:
            hook = record.service.reload

            def fn(token: CancellationToken) -> None:
                self._local.in_reload = True
                hook(token)

        try:
            return self._calls.launch(record, "reload", fn, token)
        except RuntimeError as err:  # no new threads at interpreter shutdown
            return f"no thread could be started for it ({err})"

    def _outcome(self, record: ServiceRecord, call: HelperCall | str, began: float, deadline: float) -> ServiceReload:
        log = _log.bind(service=record.name)
        if isinstance(call, str):
            return self._failed(record, began, f"RuntimeError: {call}", None)
        if not call.join(deadline + REPLY_GRACE - time.monotonic()) or isinstance(call.error, _Unanswered):
            timeout = self._options.reload_seconds
            if record.placement == "process":
                where = f"it goes on in child process {record.pid}, whose service keeps running"
            else:
                self._overran[record.name] = call
                where = f"left running on {call.thread.name}, at:\n{thread_stack(call.thread).rstrip()}"
            error = f"reload() did not return within reload_timeout ({timeout:g} s)"
            log.error("reload() of {!r} did not return within {:g} s (reload_timeout); {}", record.name, timeout, where)
            return self._record(record, ServiceReload(record.name, "timed_out", time.monotonic() - began, error))
        if call.error is not None:
            if record.placement == "process":
                from ._process.runner import ReloadRefused

                if isinstance(call.error, ReloadRefused):
                    return self._failed(record, began, f"RuntimeError: {call.error}", None)
            summary, text = format_failure(call.error)
            return self._failed(record, began, summary, text)
        seconds = time.monotonic() - began
        log.info("Service {!r} reloaded in {:.3f} s", record.name, seconds)
        return self._record(record, ServiceReload(record.name, "reloaded", seconds))

    def _failed(self, record: ServiceRecord, began: float, summary: str, text: str | None) -> ServiceReload:
        _log.bind(service=record.name).error(
            "reload() of {!r} failed: {}; the service runs on{}",
            record.name,
            summary,
            f"\n{text.rstrip()}" if text else "",
        )
        return self._record(record, ServiceReload(record.name, "failed", time.monotonic() - began, summary))

    @staticmethod
    def _record(record: ServiceRecord, outcome: ServiceReload) -> ServiceReload:
        record.update(last_reload_at=time.time(), reload_error=outcome.error)
        return outcome

    def _notify(self, event: Literal["began", "ended"], report: ReloadReport | None = None) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for began, ended in listeners:
            callback: Any = began if event == "began" else ended
            try:
                callback() if report is None else callback(report)
            except Exception:
                _log.opt(exception=True).warning("A reload listener raised ({} of a reload); the reload goes on", event)
