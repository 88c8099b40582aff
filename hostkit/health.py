"""Health checks, and the probe listener that serves them on a loopback port.

A :class:`HealthChecks` registry holds named checks. A check is a callable with
no arguments that returns a :class:`HealthCheckResult` (or just a
:class:`HealthStatus`); one that raises counts as unhealthy, with the error as
its description. Each check is tagged ``"live"`` and/or ``"ready"``:

* *liveness* asks "is this process able to do its work, or should it be
  restarted?" (systemd's watchdog and Kubernetes' liveness probe use it);
* *readiness* asks "should it get work now?" (it is not while starting or
  stopping).

:meth:`HealthChecks.attach` adds the built-in checks over a host's status
snapshot: every service's state (a faulted service is unhealthy), process-placed
children alive, heartbeats fresh, and the host itself running.

:class:`ProbeListener` answers ``GET /health/live`` and ``GET /health/ready``
(JSON, 200 or 503), ``GET /health`` (every check), and ``/metrics`` in the
Prometheus text format when ``prometheus_client`` is installed. In ``"tcp"``
mode it is a plain port that is open while the host is live and closed while it
is not, for ``tcpSocket`` probes.

Why not ``http.server``: under a CPU-bound thread-placed service the GIL is the
probe's enemy. Every socket call (``select``, ``accept``, ``recv``, ``send``,
starting a handler thread) gives the GIL away, and getting it back can take a
whole switch interval (5 ms) while the busy thread holds it. The stdlib server
makes a dozen such calls per request; this listener makes four (accept, recv,
send, close) on one thread, and lowers the switch interval while it runs (see
``switch_interval``). ``benchmarks/probe.py`` measures both. That thread never
waits on one client: a connection whose request is not complete waits in a
selector, with a deadline for its whole request, so a slow or silent client
delays no one (see :class:`ProbeListener`). Exception messages in the reports
are shown on a loopback address only.

.. versionadded:: 0.1
"""

from __future__ import annotations

import contextlib
import enum
import errno
import ipaddress
import json
import math
import os
import re
import selectors
import socket
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, cast

from loguru import logger

from ._services import HostedService
from ._status import HostState, ServiceState
from ._token import CancellationToken, Registration
from ._util import describe, pid_alive
from .exceptions import ConfigurationError, HostStateError, ProbeListenerError

if TYPE_CHECKING:
    from ._builder import HostBuilder
    from ._host import Host

__all__ = [
    "HealthCheckResult",
    "HealthChecks",
    "HealthReport",
    "HealthService",
    "HealthStatus",
    "ProbeListener",
    "use_health",
]

_log = logger.bind(service="health")

Tag = Literal["live", "ready"]
_TAGS: tuple[Tag, ...] = ("live", "ready")
ProbeMode = Literal["http", "tcp"]


class HealthStatus(str, enum.Enum):
    """How a check (or a whole report) came out; ordered from best to worst.

    .. versionadded:: 0.1
    """

    #: Working as it should.
    HEALTHY = "healthy"
    #: Working, but not as it should (still answers 200: degraded is not down).
    DEGRADED = "degraded"
    #: Not working: the probe answers 503 and the watchdog stops pinging.
    UNHEALTHY = "unhealthy"

    @property
    def rank(self) -> int:
        return _RANK[self]


_RANK = {HealthStatus.HEALTHY: 0, HealthStatus.DEGRADED: 1, HealthStatus.UNHEALTHY: 2}


@dataclass(frozen=True)
class HealthCheckResult:
    """What one check found.

    Attributes:
        status: a :class:`HealthStatus`.
        description: one human sentence saying why.
        data: JSON-ready details (counts, names, ages).
        redacted_description: the description without exception messages, which
            a probe listener bound beyond loopback shows instead (an error's text
            can hold a password or an internal address); ``None`` when the
            description holds none. The factories fill it in when given ``exception``.

    .. versionadded:: 0.1
    """

    status: HealthStatus
    description: str = ""
    data: Mapping[str, Any] = field(default_factory=dict)
    redacted_description: str | None = None

    @classmethod
    def healthy(
        cls, description: str = "", *, exception: BaseException | None = None, **data: Any
    ) -> HealthCheckResult:
        """A healthy result (see :meth:`unhealthy` for ``exception``)."""
        return cls._make(HealthStatus.HEALTHY, description, exception, data)

    @classmethod
    def degraded(
        cls, description: str = "", *, exception: BaseException | None = None, **data: Any
    ) -> HealthCheckResult:
        """A degraded result (see :meth:`unhealthy` for ``exception``)."""
        return cls._make(HealthStatus.DEGRADED, description, exception, data)

    @classmethod
    def unhealthy(
        cls, description: str = "", *, exception: BaseException | None = None, **data: Any
    ) -> HealthCheckResult:
        """An unhealthy result.

        With ``exception``, the description gets ``" (Type: message)"`` appended, and
        its redacted form ``" (Type)"``: ``unhealthy("database unreachable", exception=err)``.
        """
        return cls._make(HealthStatus.UNHEALTHY, description, exception, data)

    @classmethod
    def _make(
        cls, status: HealthStatus, description: str, exception: BaseException | None, data: Mapping[str, Any]
    ) -> HealthCheckResult:
        if exception is None:
            return cls(status, description, data)
        if not isinstance(cast(object, exception), BaseException):
            msg = f"exception= takes the exception a check caught, not: {describe(exception)}"
            raise TypeError(msg)
        kind = type(exception).__name__
        text = f"{kind}: {exception}" if str(exception) else kind
        if not description:
            return cls(status, text, data, kind)
        return cls(status, f"{description} ({text})", data, f"{description} ({kind})")


HealthCheck = Callable[[], "HealthCheckResult | HealthStatus"]


@dataclass(frozen=True)
class HealthEntry:
    """One check's result inside a :class:`HealthReport`."""

    name: str
    result: HealthCheckResult
    duration: float
    tags: tuple[str, ...]

    def to_dict(self, *, redact: bool = False) -> dict[str, Any]:
        """A JSON-ready dict; ``redact`` shows the description without exception messages."""
        result = self.result
        description = result.description
        if redact and result.redacted_description is not None:
            description = result.redacted_description
        return {
            "status": result.status.value,
            "description": description,
            "data": dict(result.data),
            "duration_ms": round(self.duration * 1000, 3),
            "tags": list(self.tags),
        }


@dataclass(frozen=True)
class HealthReport:
    """Every check run for one probe: the worst status wins.

    .. versionadded:: 0.1
    """

    status: HealthStatus
    entries: tuple[HealthEntry, ...]
    duration: float

    @property
    def http_status(self) -> int:
        """200 unless unhealthy (503)."""
        return 503 if self.status is HealthStatus.UNHEALTHY else 200

    def __getitem__(self, name: str) -> HealthEntry:
        for entry in self.entries:
            if entry.name == name:
                return entry
        msg = f"no health check named {name!r} in this report; it has: {', '.join(e.name for e in self.entries)}"
        raise KeyError(msg)

    def to_dict(self, *, redact: bool = False) -> dict[str, Any]:
        """A JSON-ready dict; ``redact`` leaves exception messages out of the descriptions."""
        return {
            "status": self.status.value,
            "duration_ms": round(self.duration * 1000, 3),
            "checks": {e.name: e.to_dict(redact=redact) for e in self.entries},
        }

    def unhealthy_summary(self) -> str:
        """``"name: description; ..."`` of every check that is not healthy."""
        return "; ".join(
            f"{e.name}: {e.result.description or e.result.status.value}"
            for e in self.entries
            if e.result.status is not HealthStatus.HEALTHY
        )


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

    def add(self, name: str, check: HealthCheck, *, tags: Iterable[Tag] = _TAGS) -> HealthChecks:
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
        bad = [t for t in tag_list if t not in _TAGS]
        if bad or not tag_list:
            msg = f"health check {name!r}: tags must be one or both of 'live', 'ready', not: {describe(tags)}"
            raise ConfigurationError(msg)
        with self._lock:
            if name in self._checks:
                msg = f"a health check named {name!r} is already registered; give each check its own name"
                raise ConfigurationError(msg)
            self._checks[name] = _Check(name, check, tag_list)
        return self

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
        self.add("host.live", lambda: _host_live(host), tags=("live",))
        self.add("host.ready", lambda: _host_ready(host), tags=("ready",))
        self.add("services", lambda: _services_check(host))
        self.add("children", lambda: _children_check(host))
        self.add("heartbeats", lambda: _heartbeats_check(host))
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


# -- built-in checks over a host -----------------------------------------------------------


def _host_live(host: Host) -> HealthCheckResult:
    state = host.state
    if state is HostState.STOPPED:
        return HealthCheckResult.unhealthy("the host has stopped", state=state.value)
    return HealthCheckResult.healthy(f"the host is {state.value}", state=state.value)


def _host_ready(host: Host) -> HealthCheckResult:
    state = host.state
    if state is HostState.RUNNING and not host.lifetime.stopping.is_set():
        return HealthCheckResult.healthy("the host is running", state=state.value)
    why = "stopping" if host.lifetime.stopping.is_set() and state is not HostState.STOPPED else state.value
    return HealthCheckResult.unhealthy(f"the host is {why}", state=state.value)


_BAD = (ServiceState.FAULTED, ServiceState.TIMED_OUT)


def _services_check(host: Host) -> HealthCheckResult:
    status = host.status()
    states = {s.name: s.state.value for s in status.services}
    data: dict[str, Any] = {"services": states}
    # Which worker runs a once-per-deployment service, and which stand by.
    locks = {s.name: s.lock.to_dict() for s in status.services if s.lock is not None}
    if locks:
        data["locks"] = locks
    bad = [s for s in status.services if s.state in _BAD]
    if bad:
        why = ", ".join(f"{s.name} is {s.state.value}" + (f" ({s.error})" if s.error else "") for s in bad)
        short = ", ".join(
            f"{s.name} is {s.state.value}" + (f" ({_error_kind(s.error)})" if s.error else "") for s in bad
        )
        return HealthCheckResult(HealthStatus.UNHEALTHY, why, dict(data), short if short != why else None)
    restarting = [s.name for s in status.services if s.state is ServiceState.RESTARTING]
    if restarting:
        return HealthCheckResult.degraded(f"restarting: {', '.join(restarting)}", **data)
    return HealthCheckResult.healthy(f"{len(states)} service(s), none faulted", **data)


_KIND = re.compile(r"[A-Za-z_][\w.]*")


def _error_kind(error: str) -> str:
    """``"Type: message"`` (how the status snapshot words a failure) without the message.

    A summary that is not in that form is one of the host's own sentences (a
    start-up timeout), which holds no exception text and is kept whole.
    """
    kind, sep, _ = error.partition(": ")
    return kind if sep and _KIND.fullmatch(kind) else error


def _children_check(host: Host) -> HealthCheckResult:
    me = os.getpid()
    live = (ServiceState.RUNNING, ServiceState.STOPPING)
    children = {
        s.name: s.pid
        for s in host.status().services
        if s.placement == "process" and s.state in live and s.pid is not None and s.pid != me
    }
    dead = [f"{name} (pid {pid})" for name, pid in children.items() if not pid_alive(pid)]
    if dead:
        return HealthCheckResult.unhealthy(f"child process gone: {', '.join(dead)}", children=children)
    return HealthCheckResult.healthy(f"{len(children)} child process(es) alive", children=children)


def _heartbeats_check(host: Host) -> HealthCheckResult:
    # The timeouts live on the host's records (the snapshot has the beat, not the limit).
    timeouts = {r.name: r.heartbeat_timeout for r in host.service_records() if r.heartbeat_timeout}
    if not timeouts:
        return HealthCheckResult.healthy("no service has a heartbeat_timeout")
    now = time.time()
    ages: dict[str, float | None] = {}
    stale = []
    for s in host.status().services:
        limit = timeouts.get(s.name)
        if limit is None or s.state is not ServiceState.RUNNING:
            continue
        if getattr(s, "healthy", True) is False:  # the runner itself judged the heartbeat stale
            stale.append(f"{s.name}: {s.detail}" if s.detail else f"{s.name}: heartbeat is stale")
        since = s.last_heartbeat_at if s.last_heartbeat_at is not None else s.started_at
        age = None if since is None else now - since
        ages[s.name] = None if age is None else round(age, 3)
        if age is not None and age > limit and not any(x.startswith(f"{s.name}: ") for x in stale):
            stale.append(f"{s.name} last beat {age:.1f} s ago (heartbeat_timeout {limit:g} s)")
    if stale:
        return HealthCheckResult.unhealthy("; ".join(stale), ages=ages)
    return HealthCheckResult.healthy(f"{len(ages)} heartbeat(s) fresh", ages=ages)


# -- the probe listener ---------------------------------------------------------------------

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
# A request is its headers (GET and HEAD have no body); past this size it is answered as it stands.
_MAX_REQUEST = 8192
# Every socket call gives the GIL away and may wait a switch interval to get it back, so
# read all that is there in one recv().
_RECV_SIZE = 65536
# For the same reason a connection is not made non-blocking (setblocking() is one more call
# that gives the GIL away): each recv() and send() is, with MSG_DONTWAIT (Linux, macOS,
# BSD). Where that flag is missing (Windows), the connection is made non-blocking instead.
_NOWAIT: int = getattr(socket, "MSG_DONTWAIT", 0)


def _is_loopback(address: str) -> bool:
    """Whether ``address`` (an IP literal, as a socket reports its bound address) is loopback.

    ``0.0.0.0`` and ``::`` are every interface, so not loopback; a name that is not
    an IP literal is not either (the listener decides from the address it bound).
    """
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


class _SwitchInterval:
    """The process-wide switch interval, lowered while any listener asks for it.

    Reference-counted: the first request saves the interval in force, every change
    sets the lowest interval still asked for, and the last release restores the
    saved one, unless someone else changed it meanwhile (then theirs is kept).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._wanted: list[float] = []
        self._saved = 0.0
        self._ours = 0.0  # what we last set, as sys.getswitchinterval() reports it back

    def lower(self, seconds: float) -> None:
        with self._lock:
            if not self._wanted:
                self._saved = self._ours = sys.getswitchinterval()
            self._wanted.append(seconds)
            self._apply(min(self._saved, *self._wanted))

    def release(self, seconds: float) -> None:
        with self._lock:
            self._wanted.remove(seconds)
            self._apply(min(self._saved, *self._wanted) if self._wanted else self._saved)

    def _apply(self, seconds: float) -> None:
        if sys.getswitchinterval() != self._ours:
            return  # changed by someone else while we held it: theirs wins
        sys.setswitchinterval(seconds)
        self._ours = sys.getswitchinterval()


_switch = _SwitchInterval()


@dataclass(eq=False)
class _Connection:
    """One accepted HTTP connection: what it sent so far, what is left to send."""

    sock: socket.socket
    deadline: float  # time.monotonic() by which the whole request must be answered
    inbox: bytearray = field(default_factory=bytearray)
    outbox: memoryview | None = None  # the answer still to send; None while reading
    events: int = 0  # what it is registered for in the selector (0: not registered)


class ProbeListener:
    """Serves health probes on its own thread and port (loopback by default).

    Args:
        checks: the registry to run.
        port: the TCP port; ``0`` picks a free one (read :attr:`port` after :meth:`bind`).
        host: the address to bind (``"127.0.0.1"`` unless told otherwise).
        mode: ``"http"`` (``/health/live``, ``/health/ready``, ``/health``, ``/metrics``)
            or ``"tcp"`` (the port is open while live checks pass, closed while not).
        switch_interval: while the listener runs, lower ``sys.setswitchinterval`` to
            this many seconds (if it is higher) so a CPU-bound thread hands the GIL to
            the probe sooner; ``None`` leaves it alone. Shared by every listener in the
            process: the interval is restored when the last one that lowered it closes.
        tcp_interval: in ``"tcp"`` mode, how often liveness is re-evaluated.
        request_timeout: in ``"http"`` mode, the seconds a client has from its
            connection to the end of its answer; one that takes longer is dropped
            (with a 408 if it has not finished its request).
        max_connections: in ``"http"`` mode, how many connections may be open at
            once; at the limit, a new connection closes the oldest that has not
            finished its request.
        show_error_messages: whether the JSON reports show the messages of
            exceptions (``"check raised OSError: ..."``) or only their type
            (``"check raised OSError"``). ``None`` (the default): only when the
            listener is bound to a loopback address, since an error's text can hold
            a password or an internal address.

    HTTP requests are served by one thread with a selector over non-blocking
    sockets: a request is answered as soon as it is complete, whatever other
    clients are doing, so a client that is slow or silent delays no one. Each
    connection gets :attr:`request_timeout` for the whole exchange, however it
    trickles its bytes. A context manager; :meth:`close` is idempotent.

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        checks: HealthChecks,
        *,
        port: int = 0,
        host: str = "127.0.0.1",
        mode: ProbeMode = "http",
        switch_interval: float | None = 0.001,
        tcp_interval: float = 1.0,
        request_timeout: float = 2.0,
        max_connections: int = 64,
        show_error_messages: bool | None = None,
    ) -> None:
        if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
            msg = f"probe port must be an int from 0 to 65535 (0 picks a free port), not: {describe(port)}"
            raise ConfigurationError(msg)
        if mode not in ("http", "tcp"):
            msg = f"probe mode must be 'http' or 'tcp', not: {describe(mode)}"
            raise ConfigurationError(msg)
        if switch_interval is not None and not (isinstance(switch_interval, (int, float)) and switch_interval > 0):
            msg = f"switch_interval must be a number of seconds > 0 or None, not: {describe(switch_interval)}"
            raise ConfigurationError(msg)
        if (
            not isinstance(request_timeout, (int, float))
            or isinstance(request_timeout, bool)
            or not 0 < request_timeout < math.inf
        ):
            msg = f"request_timeout must be a finite number of seconds > 0, not: {describe(request_timeout)}"
            raise ConfigurationError(msg)
        if not isinstance(max_connections, int) or isinstance(max_connections, bool) or max_connections < 1:
            msg = f"max_connections must be an int >= 1, not: {describe(max_connections)}"
            raise ConfigurationError(msg)
        if show_error_messages is not None and not isinstance(cast(object, show_error_messages), bool):
            msg = (
                "show_error_messages must be True, False, or None (shown on a loopback address only), "
                f"not: {describe(show_error_messages)}"
            )
            raise ConfigurationError(msg)
        self.checks = checks
        self.host = host
        self.mode = mode
        self.switch_interval = switch_interval
        self.tcp_interval = tcp_interval
        self.request_timeout = float(request_timeout)
        self.max_connections = max_connections
        self._show_error_messages = show_error_messages
        self._requested_port = port
        self._port: int | None = None
        self._bound_address: str | None = None
        self._redact = True  # decided at bind(), from the address bound
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()
        self._lock = threading.Lock()
        self._lowered_switch: float | None = None
        #: Requests answered so far.
        self.requests = 0
        #: Connections closed unanswered: past their request_timeout, or the oldest at max_connections.
        self.dropped = 0

    @property
    def port(self) -> int:
        """The bound port (after :meth:`bind`)."""
        if self._port is None:
            msg = "the probe listener is not bound yet; call bind() or start() first"
            raise HostStateError(msg)
        return self._port

    @property
    def url(self) -> str:
        """``http://host:port`` (or ``tcp://host:port``)."""
        return f"{self.mode}://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        """``True`` while its thread serves."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def shows_error_messages(self) -> bool:
        """Whether answers show exception messages: ``show_error_messages`` if given, else
        whether the bound address (the configured one before :meth:`bind`) is loopback."""
        if self._show_error_messages is not None:
            return self._show_error_messages
        return _is_loopback(self._bound_address if self._bound_address is not None else self.host)

    def bind(self) -> int:
        """Bind and listen now (idempotent), so a port in use fails at once; return the port.

        Raises:
            ProbeListenerError: the port is in use or the address cannot be bound.
        """
        with self._lock:
            if self._sock is not None:
                return self.port
            if self._closing.is_set():
                msg = "the probe listener was closed; make a new ProbeListener"
                raise HostStateError(msg)
            self._sock = self._listen(self._requested_port)
            address = self._sock.getsockname()
            self._bound_address, self._port = address[0], address[1]
            self._redact = not self.shows_error_messages
            return self._port

    def _listen(self, port: int) -> socket.socket:
        try:
            infos = socket.getaddrinfo(self.host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as err:
            msg = f"probe listener: cannot resolve address {self.host!r}: {err.strerror}"
            raise ProbeListenerError(msg) from None
        family, _, _, _, addr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            # SO_REUSEADDR lets a restarted worker re-bind its probe port while old
            # connections sit in TIME_WAIT; it does not allow two live listeners.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
            sock.listen(128)
        except OSError as err:
            sock.close()
            if err.errno == errno.EADDRINUSE:
                msg = (
                    f"probe port {self.host}:{port} is already in use (another process listens there); "
                    f"choose another port, or 0 for any free port"
                )
            else:
                msg = f"probe listener cannot listen on {self.host}:{port}: {err.strerror or err}"
            raise ProbeListenerError(msg) from None
        return sock

    def start(self) -> None:
        """Bind (if not yet) and start serving on a thread named ``hostkit-health-probe``."""
        self.bind()
        with self._lock:
            if self._thread is not None:
                return
            if self.switch_interval is not None:
                # A CPU-bound thread keeps the GIL for a whole switch interval before it
                # must hand it over; each of the probe's socket calls waits for one such
                # hand-over. 1 ms instead of 5 ms keeps the probe's p99 low under load
                # (benchmarks/probe.py), at a small cost in switching overhead.
                _switch.lower(self.switch_interval)
                self._lowered_switch = self.switch_interval
            target = self._serve_http if self.mode == "http" else self._serve_tcp
            self._thread = threading.Thread(target=target, name="hostkit-health-probe", daemon=True)
            self._thread.start()
        _log.info("Health probe listening on {}", self.url)

    def close(self, timeout: float = 5.0) -> None:
        """Stop serving and release the port; idempotent."""
        with self._lock:
            if self._closing.is_set():
                return
            self._closing.set()
            sock, thread = self._sock, self._thread
        if thread is not None and thread.is_alive() and self._port is not None:
            # A thread blocked in accept() (or in poll() on the listening socket) is not
            # woken by close() on Linux; a connection to ourselves is the portable way
            # to wake it: it sees _closing and leaves.
            with contextlib.suppress(OSError), socket.create_connection((self.host, self._port), timeout=1.0):
                pass
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                _log.warning("Health probe thread did not stop within {:.1f} s", timeout)
        if sock is not None:
            sock.close()
        with self._lock:
            self._sock = None
            if self._lowered_switch is not None:
                _switch.release(self._lowered_switch)
                self._lowered_switch = None

    def __enter__(self) -> ProbeListener:
        self.start()
        return self

    def __del__(self) -> None:
        thread = getattr(self, "_thread", None)
        if thread is not None and thread.is_alive() and not self._closing.is_set():
            warnings.warn(
                f"{self!r} was garbage-collected while serving; call close() or use it as a context manager",
                ResourceWarning,
                stacklevel=1,
            )

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        where = f"{self.host}:{self._port}" if self._port is not None else "unbound"
        return (
            f"<ProbeListener {self.mode} {where} running={self.running} "
            f"requests={self.requests} dropped={self.dropped}>"
        )

    # -- http ------------------------------------------------------------------------------
    #
    # One thread, non-blocking I/O. Why this shape: under a CPU-bound thread the GIL is
    # the probe's enemy, and every socket call costs a GIL hand-over, so a request should
    # cost as few calls as possible; and no client may hold the thread, so nothing may
    # wait on one client. A probe's request arrives with its connection, so while no
    # other client is waiting the thread blocks in accept() itself, and accept, recv,
    # send, close answer it in one pass: the four calls of a one-client-at-a-time
    # server. A connection whose request is not complete waits in a selector, and the
    # thread then waits in the selector instead (listening socket included), until
    # every such connection has completed its request or passed its deadline. The
    # selector is poll() (select() where there is none): registering a socket is then
    # bookkeeping in Python, not a system call (epoll and kqueue make one per change),
    # and with at most max_connections sockets the scan poll() does costs nothing.

    def _serve_http(self) -> None:
        listening = self._sock
        assert listening is not None
        selector = selectors.PollSelector() if hasattr(selectors, "PollSelector") else selectors.SelectSelector()
        selector.register(listening, selectors.EVENT_READ, None)
        # Insertion order is accept order, so deadline order: the first one expires first.
        open_: dict[_Connection, None] = {}
        # The listening socket's mode, changed only when connections start or stop waiting.
        # Set here too: socket.setdefaulttimeout() may have given it a timeout.
        listening.setblocking(True)
        blocking = True
        try:
            while not self._closing.is_set():
                if not open_:
                    if not blocking:
                        listening.setblocking(True)
                        blocking = True
                    self._accept(listening, selector, open_)
                    continue
                if blocking:
                    listening.setblocking(False)
                    blocking = False
                timeout = max(0.0, next(iter(open_)).deadline - time.monotonic())
                for key, events in selector.select(timeout):
                    if key.data is None:
                        self._accept(listening, selector, open_)
                        continue
                    conn = cast(_Connection, key.data)
                    if conn in open_:  # not dropped earlier in this pass
                        self._advance(conn, events, selector, open_)
                self._expire(selector, open_)
        except Exception:  # the probe must never die silently: say why it stops answering
            _log.opt(exception=True).critical("Health probe listener failed; probes will not be answered")
        finally:
            for conn in list(open_):
                conn.sock.close()
            selector.close()

    def _accept(
        self, listening: socket.socket, selector: selectors.BaseSelector, open_: dict[_Connection, None]
    ) -> None:
        try:
            sock, _ = listening.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return  # another wake-up took it, or the client gave up first
        except OSError as err:
            if self._closing.is_set():
                return
            # Out of file descriptors (EMFILE): the listening socket stays readable, so
            # pause rather than spin; dropping our oldest client frees one for a probe.
            _log.warning("Health probe: cannot accept a connection: {}", err)
            if open_:
                self._drop(next(iter(open_)), selector, open_, answer=False)
            self._closing.wait(0.1)
            return
        if self._closing.is_set():  # close() woke us with a connection of its own
            sock.close()
            return
        if not _NOWAIT or sock.gettimeout() is not None:  # a timeout: socket.setdefaulttimeout()
            sock.setblocking(False)
        conn = _Connection(sock, time.monotonic() + self.request_timeout)
        # Read at once: the request is usually there already, and answered in this pass.
        if not self._read(conn):
            sock.close()
            return
        if len(open_) >= self.max_connections:
            oldest = next((c for c in open_ if c.outbox is None), next(iter(open_)))
            self._drop(oldest, selector, open_, answer=False)
        open_[conn] = None
        self._watch(conn, selector)

    def _advance(
        self, conn: _Connection, events: int, selector: selectors.BaseSelector, open_: dict[_Connection, None]
    ) -> None:
        if conn.outbox is None:
            still_open = self._read(conn) if events & selectors.EVENT_READ else True
        else:
            still_open = self._write(conn)
        if still_open:
            self._watch(conn, selector)  # answered but not all sent: now it waits to write
        else:
            self._close(conn, selector, open_)

    def _read(self, conn: _Connection) -> bool:
        """Read what the client sent; answer when the request is complete.

        Returns whether the connection is still needed (reading, or writing its answer).
        """
        try:
            chunk = conn.sock.recv(_RECV_SIZE, _NOWAIT)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return False
        if chunk:
            seen = len(conn.inbox)
            conn.inbox += chunk
            start = max(0, seen - 3)
            done = (
                conn.inbox.find(b"\r\n\r\n", start) >= 0
                or conn.inbox.find(b"\n\n", start) >= 0
                or len(conn.inbox) >= _MAX_REQUEST
            )
            if not done:
                return True
        elif not conn.inbox:  # closed without a word
            return False
        # Complete, or the client closed its side after a partial request: answer what came.
        conn.outbox = memoryview(self._respond(bytes(conn.inbox)))
        conn.inbox.clear()
        return self._write(conn)

    def _write(self, conn: _Connection) -> bool:
        """Send what is left of the answer; returns whether some is still left."""
        assert conn.outbox is not None
        try:
            sent = conn.sock.send(conn.outbox, _NOWAIT)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            return False
        conn.outbox = conn.outbox[sent:]
        return len(conn.outbox) > 0

    def _watch(self, conn: _Connection, selector: selectors.BaseSelector) -> None:
        events = selectors.EVENT_READ if conn.outbox is None else selectors.EVENT_WRITE
        if conn.events == events:
            return
        if conn.events:
            selector.modify(conn.sock, events, conn)
        else:
            selector.register(conn.sock, events, conn)
        conn.events = events

    def _close(self, conn: _Connection, selector: selectors.BaseSelector, open_: dict[_Connection, None]) -> None:
        # Out of the selector first: once closed, its fd number can be reused at once.
        if conn.events:
            selector.unregister(conn.sock)
            conn.events = 0
        open_.pop(conn, None)
        conn.sock.close()

    def _drop(
        self, conn: _Connection, selector: selectors.BaseSelector, open_: dict[_Connection, None], *, answer: bool
    ) -> None:
        """Close a connection unanswered (its deadline passed, or room is needed)."""
        self.dropped += 1
        if answer and conn.outbox is None:
            # One try, never waited on: a slow but honest client learns why.
            body = {"error": f"request not complete within request_timeout={self.request_timeout:g} s"}
            with contextlib.suppress(OSError):
                conn.sock.send(_response(408, body), _NOWAIT)
        self._close(conn, selector, open_)
        _log.debug("Health probe: dropped a connection ({})", "timed out" if answer else "oldest at max_connections")

    def _expire(self, selector: selectors.BaseSelector, open_: dict[_Connection, None]) -> None:
        now = time.monotonic()
        while open_:
            first = next(iter(open_))
            if first.deadline > now:
                return
            self._drop(first, selector, open_, answer=True)

    def _respond(self, request: bytes) -> bytes:
        """The whole answer to one request (never raises: a failure is a 500)."""
        self.requests += 1
        try:
            return self._answer(request)
        except Exception as exc:
            _log.opt(exception=True).warning("Health probe: answering a request failed")
            kind = type(exc).__name__
            text = f"{kind}: {exc}" if self.shows_error_messages else kind
            return _response(500, {"error": f"answering the probe failed: {text}"})

    def _answer(self, request: bytes) -> bytes:
        line = request.split(b"\n", 1)[0].decode("latin-1").strip()
        parts = line.split()
        if len(parts) < 2:
            return _response(400, {"error": "bad request line"})
        method, target = parts[0], parts[1].split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            return _response(405, {"error": f"method {method} not allowed; use GET"})
        head = method == "HEAD"
        tag: Tag | None
        if target in ("/health/live", "/livez"):
            tag = "live"
        elif target in ("/health/ready", "/readyz"):
            tag = "ready"
        elif target in ("/health", "/health/"):
            tag = None
        elif target == "/metrics":
            return self._metrics(head)
        else:
            body = {"error": f"no such path {target!r}", "paths": ["/health/live", "/health/ready", "/health"]}
            return _response(404, body, head=head)
        report = self.checks.run(tag)
        return _response(report.http_status, report.to_dict(redact=self._redact), head=head)

    def _metrics(self, head: bool) -> bytes:
        try:
            body, content_type = _render_metrics(self.checks)
        except ImportError:
            hint = "/metrics needs prometheus-client: pip install 'pyhostkit[prometheus]'"
            return _response(404, {"error": hint}, head=head)
        return _raw_response(200, body, content_type, head=head)

    # -- tcp -------------------------------------------------------------------------------

    def _serve_tcp(self) -> None:
        sock: socket.socket | None = self._sock
        assert sock is not None
        # accept() with a timeout, so liveness is re-checked every tcp_interval even
        # when nobody connects.
        sock.settimeout(self.tcp_interval)
        port = self.port
        while not self._closing.is_set():
            report = self.checks.run("live")
            if report.status is HealthStatus.UNHEALTHY:
                if sock is not None:
                    _log.warning("Liveness failed ({}); closing TCP probe port {}", report.unhealthy_summary(), port)
                    sock.close()
                    sock = None
                    with self._lock:
                        self._sock = None
                self._closing.wait(self.tcp_interval)
                continue
            if sock is None:
                try:
                    sock = self._listen(port)
                except ProbeListenerError as err:
                    _log.warning("Health is back but the TCP probe port cannot be re-opened: {}", err)
                    self._closing.wait(self.tcp_interval)
                    continue
                sock.settimeout(self.tcp_interval)
                with self._lock:
                    self._sock = sock
                _log.info("Liveness is back; TCP probe port {} re-opened", port)
            try:
                conn, _ = sock.accept()
            except (TimeoutError, socket.timeout):  # noqa: UP041 - socket.timeout differs on 3.10
                continue
            except OSError:
                continue
            with contextlib.closing(conn):
                self.requests += 1
                with contextlib.suppress(OSError):
                    conn.sendall(f"{report.status.value}\n".encode())


def _render_metrics(checks: HealthChecks) -> tuple[bytes, str]:
    """The host's state in the Prometheus text format (raises ImportError without prometheus_client)."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import GaugeMetricFamily
    from prometheus_client.exposition import CONTENT_TYPE_LATEST

    class _Collector:
        def collect(self) -> Iterable[GaugeMetricFamily]:
            report = checks.run(None)
            health = GaugeMetricFamily(
                "hostkit_health_check_status", "1 when the check has this status, else 0", labels=["check", "status"]
            )
            for entry in report.entries:
                for status in HealthStatus:
                    health.add_metric([entry.name, status.value], float(entry.result.status is status))
            yield health
            host = checks.host
            if host is None:
                return
            states = GaugeMetricFamily(
                "hostkit_service_state", "1 when the service is in this state, else 0", labels=["service", "state"]
            )
            restarts = GaugeMetricFamily("hostkit_service_restarts", "restarts so far", labels=["service"])
            for s in host.status().services:
                for state in ServiceState:
                    states.add_metric([s.name, state.value], float(s.state is state))
                restarts.add_metric([s.name], float(s.restarts))
            yield states
            yield restarts

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector())
    return generate_latest(registry), CONTENT_TYPE_LATEST


def _response(code: int, payload: dict[str, Any], *, head: bool = False) -> bytes:
    body = json.dumps(payload, separators=(",", ":")).encode()
    return _raw_response(code, body, "application/json", head=head)


def _raw_response(code: int, body: bytes, content_type: str, *, head: bool = False) -> bytes:
    # One buffer, one sendall(): fewer blocking calls, fewer waits for the GIL.
    header = (
        f"HTTP/1.1 {code} {_REASONS.get(code, 'Error')}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"Cache-Control: no-store\r\n"
        f"Connection: close\r\n\r\n"
    ).encode()
    return header if head else header + body


# -- as a hosted service ----------------------------------------------------------------------


class HealthService(HostedService):
    """The probe listener as a hosted service; :func:`use_health` registers it.

    The listener starts with the host and keeps answering through the whole stop
    (readiness says 503 "stopping" meanwhile); it closes when ``lifetime.stopped``
    fires, so a probe never fails just because the stop is running.

    .. versionadded:: 0.1
    """

    def __init__(self, checks: HealthChecks, listener: ProbeListener | None) -> None:
        self.checks = checks
        self.listener = listener
        self._host: Host | None = None
        self._registration: Registration | None = None

    def attach(self, host: Host) -> None:
        """Give the service its host (built-in checks are added now)."""
        self._host = host
        self.checks.attach(host)

    _hostkit_attach_host = attach

    def start(self, token: CancellationToken) -> None:
        """Start the listener and close it when the host has stopped."""
        if self.listener is None:
            return
        self.listener.start()
        if self._host is not None and self._registration is None:
            self._registration = self._host.lifetime.stopped.register(self.close)

    def close(self) -> None:
        """Close the listener (idempotent)."""
        if self.listener is not None:
            self.listener.close()

    def __repr__(self) -> str:
        return f"<HealthService {self.listener!r}>"


def use_health(
    builder: HostBuilder,
    *,
    port: int | None = None,
    host: str = "127.0.0.1",
    mode: ProbeMode = "http",
    checks: HealthChecks | None = None,
    switch_interval: float | None = 0.001,
    show_error_messages: bool | None = None,
) -> HealthChecks:
    """Add health checks (and a probe listener when ``port`` is given) to a host.

    The :class:`HealthChecks` registry is registered as a singleton (other services,
    and :mod:`hostkit.systemd`'s watchdog, resolve it), gets the built-in checks
    when the host is built, and is returned so you can add your own.

    Args:
        builder: the :class:`~hostkit.HostBuilder`.
        port: the probe port (``0`` for any free port); ``None`` for no listener.
        host: the address to bind; loopback unless you say otherwise.
        mode: ``"http"`` or ``"tcp"``.
        checks: a registry to use instead of a new one.
        switch_interval: see :class:`ProbeListener`.
        show_error_messages: whether answers show exception messages (``None``:
            only on a loopback address); see :class:`ProbeListener`.

    .. versionadded:: 0.1
    """
    registry = checks if checks is not None else HealthChecks()
    if HealthChecks in builder.services:
        msg = "use_health() was already called on this builder (a HealthChecks is registered)"
        raise ConfigurationError(msg)
    builder.services.add_singleton(HealthChecks, instance=registry)
    listener = (
        None
        if port is None
        else ProbeListener(
            registry,
            port=port,
            host=host,
            mode=mode,
            switch_interval=switch_interval,
            show_error_messages=show_error_messages,
        )
    )
    builder.services.add_hosted_service(HealthService(registry, listener), name="health")
    return registry
