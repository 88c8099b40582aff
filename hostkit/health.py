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
probe's enemy. Every blocking call (``select``, ``accept``, ``recv``, ``send``,
starting a handler thread) gives the GIL away, and getting it back can take a
whole switch interval (5 ms) while the busy thread holds it. The stdlib server
makes a dozen such calls per request; this listener makes four (accept, recv,
send, close) on one thread, and lowers the switch interval while it runs (see
``switch_interval``). ``benchmarks/probe.py`` measures both.

.. versionadded:: 0.1
"""

from __future__ import annotations

import contextlib
import enum
import errno
import json
import os
import socket
import struct
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

    .. versionadded:: 0.1
    """

    status: HealthStatus
    description: str = ""
    data: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def healthy(cls, description: str = "", **data: Any) -> HealthCheckResult:
        """A healthy result."""
        return cls(HealthStatus.HEALTHY, description, data)

    @classmethod
    def degraded(cls, description: str = "", **data: Any) -> HealthCheckResult:
        """A degraded result."""
        return cls(HealthStatus.DEGRADED, description, data)

    @classmethod
    def unhealthy(cls, description: str = "", **data: Any) -> HealthCheckResult:
        """An unhealthy result."""
        return cls(HealthStatus.UNHEALTHY, description, data)


HealthCheck = Callable[[], "HealthCheckResult | HealthStatus"]


@dataclass(frozen=True)
class HealthEntry:
    """One check's result inside a :class:`HealthReport`."""

    name: str
    result: HealthCheckResult
    duration: float
    tags: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.result.status.value,
            "description": self.result.description,
            "data": dict(self.result.data),
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

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "status": self.status.value,
            "duration_ms": round(self.duration * 1000, 3),
            "checks": {e.name: e.to_dict() for e in self.entries},
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
        return HealthCheckResult.unhealthy(f"check raised {type(exc).__name__}: {exc}")
    if isinstance(value, HealthCheckResult):
        return value
    if isinstance(value, HealthStatus):
        return HealthCheckResult(value)
    return HealthCheckResult.unhealthy(
        f"check returned {describe(value)}; a check must return a HealthCheckResult or a HealthStatus"
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
        return HealthCheckResult.unhealthy(why, **data)
    restarting = [s.name for s in status.services if s.state is ServiceState.RESTARTING]
    if restarting:
        return HealthCheckResult.degraded(f"restarting: {', '.join(restarting)}", **data)
    return HealthCheckResult.healthy(f"{len(states)} service(s), none faulted", **data)


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
    timeouts = {r.name: r.heartbeat_timeout for r in getattr(host, "_records", ()) if r.heartbeat_timeout}
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

_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 400: "Bad Request", 503: "Service Unavailable"}
# SO_RCVTIMEO/SO_SNDTIMEO on the accepted socket: the kernel bounds a slow client's
# recv/send without Python's own timeout, which would add a poll() per call, and
# every extra blocking call is one more wait for the GIL under load.
_IO_TIMEOUT = struct.pack("ll", 2, 0)


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
            the probe sooner; ``None`` leaves it alone. Restored at :meth:`close`.
        tcp_interval: in ``"tcp"`` mode, how often liveness is re-evaluated.

    One request is answered at a time, on one thread (that is what keeps it fast
    under GIL contention); a client that connects and sends nothing holds it for at
    most 2 s (kernel receive timeout). A context manager; :meth:`close` is idempotent.

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
        self.checks = checks
        self.host = host
        self.mode = mode
        self.switch_interval = switch_interval
        self.tcp_interval = tcp_interval
        self._requested_port = port
        self._port: int | None = None
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()
        self._lock = threading.Lock()
        self._saved_switch: float | None = None
        self.requests = 0

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
            self._port = self._sock.getsockname()[1]
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
            sock.listen(64)
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
            if self.switch_interval is not None and sys.getswitchinterval() > self.switch_interval:
                # A CPU-bound thread keeps the GIL for a whole switch interval before it
                # must hand it over; each of the probe's blocking calls waits for one such
                # hand-over. 1 ms instead of 5 ms keeps the probe's p99 low under load
                # (benchmarks/probe.py), at a small cost in switching overhead.
                self._saved_switch = sys.getswitchinterval()
                sys.setswitchinterval(self.switch_interval)
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
            # A thread blocked in accept() is not woken by close() on Linux; a connection
            # to ourselves is the portable way to wake it: it sees _closing and leaves.
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
            if self._saved_switch is not None:
                sys.setswitchinterval(self._saved_switch)
                self._saved_switch = None

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
        return f"<ProbeListener {self.mode} {where} running={self.running} requests={self.requests}>"

    # -- http ------------------------------------------------------------------------------

    def _serve_http(self) -> None:
        sock = self._sock
        assert sock is not None
        while not self._closing.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:
                if self._closing.is_set():
                    return
                continue
            if self._closing.is_set():
                conn.close()
                return
            try:
                self._answer(conn)
            except Exception:
                _log.opt(exception=True).warning("Health probe: answering a request failed")
            finally:
                conn.close()

    def _answer(self, conn: socket.socket) -> None:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _IO_TIMEOUT)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _IO_TIMEOUT)
        data = b""
        # One recv() almost always holds the whole request; loop for clients that
        # send it in pieces, up to 8 KiB of headers.
        while b"\r\n\r\n" not in data and b"\n\n" not in data and len(data) < 8192:
            try:
                chunk = conn.recv(4096)
            except OSError:
                return
            if not chunk:
                break
            data += chunk
        self.requests += 1
        line = data.split(b"\n", 1)[0].decode("latin-1").strip()
        parts = line.split()
        if len(parts) < 2:
            conn.sendall(_response(400, {"error": "bad request line"}))
            return
        method, target = parts[0], parts[1].split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            conn.sendall(_response(405, {"error": f"method {method} not allowed; use GET"}))
            return
        head = method == "HEAD"
        if target in ("/health/live", "/livez"):
            report = self.checks.run("live")
            conn.sendall(_response(report.http_status, report.to_dict(), head=head))
        elif target in ("/health/ready", "/readyz"):
            report = self.checks.run("ready")
            conn.sendall(_response(report.http_status, report.to_dict(), head=head))
        elif target in ("/health", "/health/"):
            report = self.checks.run(None)
            conn.sendall(_response(report.http_status, report.to_dict(), head=head))
        elif target == "/metrics":
            conn.sendall(self._metrics(head))
        else:
            body = {"error": f"no such path {target!r}", "paths": ["/health/live", "/health/ready", "/health"]}
            conn.sendall(_response(404, body, head=head))

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
        else ProbeListener(registry, port=port, host=host, mode=mode, switch_interval=switch_interval)
    )
    builder.services.add_hosted_service(HealthService(registry, listener), name="health")
    return registry
