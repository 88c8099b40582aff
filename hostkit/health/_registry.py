"""The registry of named, tagged checks, and running them into a report."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from .._util import describe
from ..exceptions import ConfigurationError, HostStateError
from ._checks import children_check, heartbeats_check, host_live, host_ready, services_check
from ._model import TAGS, HealthCheck, HealthCheckResult, HealthEntry, HealthReport, HealthStatus, Tag
from ._queues import QueueGauges, QueueSample, WatchedQueue

if TYPE_CHECKING:
    from .._host import Host


@dataclass
class _Check:
    name: str
    fn: HealthCheck
    tags: tuple[Tag, ...]


class HealthChecks:
    """A registry of named health checks, each tagged ``"live"`` and/or ``"ready"``.

    Example::

        checks = HealthChecks()
        checks.add("database", lambda: HealthCheckResult.healthy("ping ok"), tags=("ready",))
        report = checks.run("ready")

    Thread-safe: checks can be added while probes run.

    .. versionadded:: 0.1
    """

    def __init__(self) -> None:
        self._checks: dict[str, _Check] = {}
        self._lock = threading.Lock()
        self._host: Host | None = None
        #: The queues whose gauges ``/metrics`` and ``/health`` show (see :meth:`add_queue`).
        self.queues = QueueGauges()

    def add(self, name: str, check: HealthCheck, *, tags: Iterable[Tag] = TAGS) -> HealthChecks:
        """Register ``check`` under ``name``; returns the registry (for chaining).

        Raises:
            ConfigurationError: an empty or taken name, an unknown tag, or no tags.
            TypeError: ``check`` is not callable.
        """
        if not isinstance(name, str) or not name.strip():  # checked at run time for untyped callers
            msg = f"a health check needs a non-empty name, not: {describe(name)}"
            raise ConfigurationError(msg)
        if not callable(cast(object, check)):
            msg = f"health check {name!r} must be a callable returning a HealthCheckResult, not: {describe(check)}"
            raise TypeError(msg)
        tag_list: tuple[Any, ...] = (tags,) if isinstance(tags, str) else tuple(tags)
        bad = [t for t in tag_list if t not in TAGS]
        if bad or not tag_list:
            msg = f"health check {name!r}: tags must be one or both of 'live', 'ready', not: {describe(tags)}"
            raise ConfigurationError(msg)
        with self._lock:
            if name in self._checks:
                msg = f"a health check named {name!r} is already registered; give each check its own name"
                raise ConfigurationError(msg)
            self._checks[name] = _Check(name, check, tag_list)
        return self

    def add_queue(self, queue: WatchedQueue, *, label: str | None = None) -> HealthChecks:
        """Report ``queue``'s depth, in-flight count, dead letters and oldest ready message's age.

        They appear on ``/metrics`` as ``hostkit_queue_depth{queue="<label>"}`` and its
        siblings, and under ``"queues"`` in the ``/health`` JSON; they change no check's
        status (a deep queue is work to do, not a failure). A
        :class:`~hostkit.queues.QueueConsumer` adds its queue itself; add a queue a
        web app only produces to, for instance. Adding the same queue again does
        nothing. Returns the registry (for chaining).

        Args:
            queue: a :class:`~hostkit.queues.Queue`.
            label: the ``queue`` label (default: the queue's name).

        Raises:
            ConfigurationError: ``label`` is taken by a different queue.

        .. versionadded:: 0.2
        """
        self.queues.add(queue, label)
        return self

    def queue_samples(self) -> list[QueueSample]:
        """Every watched queue's figures, at most ``queues.max_age`` seconds old; never raises.

        .. versionadded:: 0.2
        """
        return self.queues.sample()

    def remove(self, name: str) -> None:
        """Remove the check named ``name`` (``KeyError`` if there is none)."""
        with self._lock:
            del self._checks[name]

    @property
    def names(self) -> list[str]:
        """The registered checks' names, in registration order."""
        with self._lock:
            return list(self._checks)

    @property
    def host(self) -> Host | None:
        """The host attached with :meth:`attach`, if any."""
        return self._host

    def attach(self, host: Host) -> HealthChecks:
        """Add the built-in checks over ``host``'s status (once per registry).

        ``host`` (live, ready): the host is starting or running (ready only when running).
        ``services`` (live, ready): no service faulted or timed out; restarting is degraded.
        Its data: each service's state, and under ``locks`` each once-per-deployment
        service's :class:`~hostkit.LockStatus` (holder or standby, path, holder's pid).
        ``children`` (live, ready): every process-placed service's child is alive.
        ``heartbeats`` (live, ready): every service with a ``heartbeat_timeout`` beat recently.
        """
        if self._host is host:
            return self
        if self._host is not None:
            msg = "this HealthChecks registry is already attached to another host; make one registry per host"
            raise HostStateError(msg)
        self._host = host
        self.add("host.live", lambda: host_live(host), tags=("live",))
        self.add("host.ready", lambda: host_ready(host), tags=("ready",))
        self.add("services", lambda: services_check(host))
        self.add("children", lambda: children_check(host))
        self.add("heartbeats", lambda: heartbeats_check(host))
        return self

    def run(self, tag: Tag | None = None) -> HealthReport:
        """Run every check (or those tagged ``tag``) and report; never raises for a check."""
        with self._lock:
            selected = [c for c in self._checks.values() if tag is None or tag in c.tags]
        began = time.perf_counter()
        entries = []
        worst = HealthStatus.HEALTHY
        for check in selected:
            t0 = time.perf_counter()
            result = _call(check)
            entries.append(HealthEntry(check.name, result, time.perf_counter() - t0, check.tags))
            if result.status.rank > worst.rank:
                worst = result.status
        return HealthReport(worst, tuple(entries), time.perf_counter() - began)

    def __repr__(self) -> str:
        return f"<HealthChecks checks={len(self._checks)} attached={self._host is not None}>"


def _call(check: _Check) -> HealthCheckResult:
    try:
        value: object = check.fn()
    except Exception as exc:  # a check that raises is a failed check, never a failed probe
        kind = type(exc).__name__
        return HealthCheckResult(HealthStatus.UNHEALTHY, f"check raised {kind}: {exc}", {}, f"check raised {kind}")
    if isinstance(value, HealthCheckResult):
        return value
    if isinstance(value, HealthStatus):
        return HealthCheckResult(value)
    rule = "a check must return a HealthCheckResult or a HealthStatus"
    return HealthCheckResult(
        HealthStatus.UNHEALTHY,
        f"check returned {describe(value)}; {rule}",
        {},
        f"check returned a {type(value).__name__}; {rule}",
    )
