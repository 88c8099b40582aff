"""systemd integration: ``sd_notify`` and the watchdog, written here in full.

When systemd starts a ``Type=notify`` service it sets ``NOTIFY_SOCKET`` to an
``AF_UNIX`` datagram socket (a path, or an abstract name starting with ``@``).
The service sends newline-separated ``KEY=VALUE`` lines to it:

* ``READY=1`` once every hosted service has started (``lifetime.started``);
* ``STATUS=...`` lines saying what the host is doing (``systemctl status`` shows it);
* ``STOPPING=1`` when the stop begins, then ``EXTEND_TIMEOUT_USEC=...`` every
  couple of seconds while the stop runs, so a long graceful stop is not killed by
  ``TimeoutStopSec`` before hostkit's own ``shutdown_timeout`` is used up;
* ``WATCHDOG=1`` every half ``WATCHDOG_USEC``, but only while the liveness checks
  (:mod:`hostkit.health`) pass: a hung or unhealthy host stops pinging and systemd
  restarts it;
* ``RELOADING=1`` with ``MONOTONIC_USEC=`` (``CLOCK_MONOTONIC`` now, which systemd
  253 and later require of a ``Type=notify-reload`` service) when a reload begins
  (SIGHUP, ``Host.reload()``), then ``READY=1`` when every ``reload()`` has
  returned, failed or timed out; systemd shows the unit *reloading* in between.

The ``sdnotify`` package swallows every error; :class:`Notifier` raises
:class:`~hostkit.exceptions.SystemdNotifyError` instead, naming the socket.

``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID`` are read and then removed
from ``os.environ`` when the integration is set up, so child processes (process-placed
services, subprocesses) do not inherit them and talk to systemd on our behalf.

.. versionadded:: 0.1
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, MutableMapping
from typing import TYPE_CHECKING

from loguru import logger

from ._services import HostedService
from ._status import ServiceState
from ._token import CancellationToken, Registration
from .exceptions import ConfigurationError, ServiceNotFoundError, SystemdNotifyError
from .health import HealthChecks, HealthStatus

if TYPE_CHECKING:
    from ._builder import HostBuilder
    from ._host import Host
    from ._reloading import ReloadReport

__all__ = ["Notifier", "SystemdService", "use_systemd"]

_log = logger.bind(service="systemd")
_ENV_KEYS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class Notifier:
    """A sender of ``sd_notify`` messages to one socket.

    Args:
        address: ``NOTIFY_SOCKET``'s value: an absolute path, or ``@name`` for the
            abstract namespace.
        watchdog_usec: ``WATCHDOG_USEC``, if the unit has ``WatchdogSec=``.

    Raises:
        ConfigurationError: ``address`` is neither an absolute path nor ``@name``.

    .. versionadded:: 0.1
    """

    def __init__(self, address: str, *, watchdog_usec: int | None = None) -> None:
        if not isinstance(address, str) or not (address.startswith("/") or address.startswith("@")):
            msg = (
                f"NOTIFY_SOCKET must be an absolute socket path or an abstract name starting with '@', not: {address!r}"
            )
            raise ConfigurationError(msg)
        self.address = address
        self.watchdog_usec = watchdog_usec
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_environment(
        cls, environ: MutableMapping[str, str] | None = None, *, unset: bool = True
    ) -> Notifier | None:
        """A notifier for ``NOTIFY_SOCKET``, or ``None`` when it is not set.

        ``WATCHDOG_USEC`` is honoured when ``WATCHDOG_PID`` is absent or names this
        process. With ``unset`` (the default) the three variables are removed from
        ``environ`` so children do not inherit them.

        Raises:
            ConfigurationError: ``NOTIFY_SOCKET`` or ``WATCHDOG_USEC`` has a malformed value.
        """
        env: MutableMapping[str, str] = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET")
        usec_text = env.get("WATCHDOG_USEC")
        pid_text = env.get("WATCHDOG_PID")
        if unset:
            for key in _ENV_KEYS:
                env.pop(key, None)
        if not address:
            return None
        usec = None
        if usec_text and (not pid_text or pid_text == str(os.getpid())):
            try:
                usec = int(usec_text)
                if usec <= 0:
                    raise ValueError
            except ValueError:
                msg = f"WATCHDOG_USEC must be a positive number of microseconds, not: {usec_text!r}"
                raise ConfigurationError(msg) from None
        return cls(address, watchdog_usec=usec)

    @property
    def watchdog_interval(self) -> float | None:
        """How often to ping: half of ``WATCHDOG_USEC``, in seconds (``None`` without a watchdog)."""
        return None if self.watchdog_usec is None else self.watchdog_usec / 2_000_000

    def connect(self) -> None:
        """Open the socket now, so an unreachable ``NOTIFY_SOCKET`` fails early (idempotent).

        Raises:
            SystemdNotifyError: the socket does not exist, refuses us, or is not a socket.
        """
        with self._lock:
            if self._sock is not None:
                return
            target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            try:
                sock.connect(target)
            except OSError as err:
                sock.close()
                msg = (
                    f"NOTIFY_SOCKET={self.address!r} cannot be used: {err.strerror or err}. "
                    f"Unset NOTIFY_SOCKET when not running under systemd (or pass --no-systemd)"
                )
                raise SystemdNotifyError(msg) from None
            self._sock = sock

    def notify(self, *lines: str, **fields: object) -> None:
        """Send one message: ``notify("READY=1")`` or ``notify(READY=1, STATUS="Running")``.

        Raises:
            SystemdNotifyError: the datagram could not be sent.
        """
        parts = [*lines, *(f"{key}={value}" for key, value in fields.items())]
        for part in parts:
            if "\n" in part.split("=", 1)[-1]:
                msg = f"sd_notify values cannot contain a newline: {part!r}"
                raise ValueError(msg)
        self.connect()
        payload = "\n".join(parts).encode()
        with self._lock:
            sock = self._sock
            if sock is None:
                msg = f"the notifier for NOTIFY_SOCKET={self.address!r} is closed"
                raise SystemdNotifyError(msg)
            try:
                sock.send(payload)
            except OSError as err:
                msg = f"sending {payload!r} to NOTIFY_SOCKET={self.address!r} failed: {err.strerror or err}"
                raise SystemdNotifyError(msg) from None

    def close(self) -> None:
        """Close the socket (idempotent)."""
        with self._lock:
            sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def __repr__(self) -> str:
        return f"<Notifier {self.address!r} watchdog_usec={self.watchdog_usec} connected={self._sock is not None}>"


class SystemdService(HostedService):
    """Tells systemd what the host is doing; :func:`use_systemd` registers it.

    On start it connects to the socket (an unreachable one fails start-up, naming
    it) and starts one thread, ``hostkit-systemd``, that pings the watchdog while
    liveness passes, refreshes ``STATUS=`` and, during the stop, extends systemd's
    stop timeout. READY and STOPPING are sent from ``lifetime`` callbacks, at the
    exact moments. The thread ends when ``lifetime.stopped`` fires.

    Args:
        notifier: the sender; ``None`` reads ``NOTIFY_SOCKET`` now (and then does
            nothing at all if it is not set).
        watchdog: ping the watchdog when ``WATCHDOG_USEC`` is set.
        extend_every: seconds between ``EXTEND_TIMEOUT_USEC`` messages during a stop.
        extend_margin: seconds added to the remaining shutdown budget in each of them.
        health: the checks whose liveness gates the watchdog (default: the host's
            registered :class:`~hostkit.health.HealthChecks`, else the built-in checks).

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        notifier: Notifier | None = None,
        *,
        watchdog: bool = True,
        extend_every: float = 2.0,
        extend_margin: float = 5.0,
        health: HealthChecks | None = None,
    ) -> None:
        self.notifier = notifier if notifier is not None else Notifier.from_environment()
        self.watchdog = watchdog
        self.extend_every = extend_every
        self.extend_margin = extend_margin
        self.pings = 0
        self.pings_withheld = 0
        self._host: Host | None = None
        self._health: HealthChecks | None = health
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()
        self._done = threading.Event()
        self._stop_began: float | None = None
        self._registrations: list[Registration] = []
        self._remove_reload_listener: Callable[[], None] | None = None
        self._last_status = ""
        self._withheld = False

    def attach(self, host: Host) -> None:
        """Give the service the host it reports on."""
        self._host = host

    def attach_host(self, host: Host) -> None:
        """:class:`~hostkit.HostAware`: the host calls this when it is built; same as :meth:`attach`."""
        self.attach(host)

    @property
    def active(self) -> bool:
        """``True`` when there is a socket to notify."""
        return self.notifier is not None

    def start(self, token: CancellationToken) -> None:
        """Connect, send the first ``STATUS=``, watch the lifetime, start the thread.

        Raises:
            SystemdNotifyError: ``NOTIFY_SOCKET`` cannot be reached.
        """
        if self.notifier is None or self._thread is not None:
            return
        host = self._require_host()
        self.notifier.connect()
        self._send(STATUS=f"Starting {len(host.status().services)} service(s)")
        lifetime = host.lifetime
        self._registrations = [
            lifetime.started.register(self._on_started),
            lifetime.stopping.register(self._on_stopping),
            lifetime.stopped.register(self.close),
        ]
        self._remove_reload_listener = host.add_reload_listener(self._on_reloading, self._on_reloaded)
        self._thread = threading.Thread(target=self._loop, name="hostkit-systemd", daemon=True)
        self._thread.start()
        if self.watchdog and self.notifier.watchdog_interval is not None:
            _log.info("systemd watchdog: pinging every {:.2f} s while liveness passes", self.notifier.watchdog_interval)

    def close(self) -> None:
        """End the thread and close the socket (idempotent); runs at ``lifetime.stopped``."""
        self._done.set()
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(5.0)
        for registration in self._registrations:
            registration.unregister()
        if self._remove_reload_listener is not None:
            self._remove_reload_listener()
        if self.notifier is not None:
            self.notifier.close()

    def _require_host(self) -> Host:
        if self._host is None:
            msg = "SystemdService needs its host: register it with hostkit.systemd.use_systemd(builder)"
            raise ConfigurationError(msg)
        return self._host

    def _send(self, *lines: str, **fields: object) -> bool:
        """Send, logging (not raising) a failure once the host runs: systemd going away must not crash it."""
        if self.notifier is None:
            return False
        try:
            self.notifier.notify(*lines, **fields)
        except (OSError, ValueError) as err:
            _log.warning("sd_notify failed: {}", err)
            return False
        return True

    def _on_started(self) -> None:
        self._send("READY=1", STATUS=self._status_line())
        _log.info("Notified systemd: READY=1")

    def _on_stopping(self) -> None:
        self._stop_began = time.monotonic()
        host = self._require_host()
        self._send("STOPPING=1", STATUS=f"Stopping (shutdown budget {host.options.shutdown_seconds:g} s)")
        self._extend()
        self._wake.set()  # the thread switches from watchdog pings to stop extensions

    def _on_reloading(self) -> None:
        # systemd >= 253 (Type=notify-reload) ignores a RELOADING=1 without MONOTONIC_USEC:
        # it tells a reload that began after its SIGHUP from one that was already running.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        if self._send("RELOADING=1", MONOTONIC_USEC=usec, STATUS="Reloading"):
            _log.info("Notified systemd: RELOADING=1")

    def _on_reloaded(self, report: ReloadReport) -> None:
        if self._stop_began is not None:
            return  # STOPPING=1 went out during the reload: READY=1 now would tell systemd the stop is over
        if self._send("READY=1", STATUS=self._status_line()):
            _log.info("Notified systemd: READY=1 (reload {})", "done" if report.ok else "done, with failures")

    def _extend(self) -> None:
        host = self._require_host()
        began = self._stop_began if self._stop_began is not None else time.monotonic()
        left = max(host.options.shutdown_seconds - (time.monotonic() - began), 0.0)
        self._send(EXTEND_TIMEOUT_USEC=int((left + self.extend_margin) * 1_000_000))

    def _status_line(self) -> str:
        host = self._require_host()
        services = host.status().services
        counts: dict[str, int] = {}
        for s in services:
            counts[s.state.value] = counts.get(s.state.value, 0) + 1
        detail = ", ".join(f"{n} {state}" for state, n in counts.items())
        faulted = [s.name for s in services if s.state in (ServiceState.FAULTED, ServiceState.TIMED_OUT)]
        line = f"{host.state.value.capitalize()}: {len(services)} service(s) ({detail})"
        return line + (f"; faulted: {', '.join(faulted)}" if faulted else "")

    def _health_checks(self) -> HealthChecks:
        if self._health is None:
            host = self._require_host()
            try:
                self._health = host.services.get(HealthChecks)
            except ServiceNotFoundError:
                self._health = HealthChecks()
            self._health.attach(host)
        return self._health

    def _loop(self) -> None:
        interval = self.notifier.watchdog_interval if self.notifier is not None and self.watchdog else None
        next_ping = time.monotonic()
        next_extend = 0.0
        while not self._done.is_set():
            now = time.monotonic()
            if self._stop_began is not None:
                if now >= next_extend:
                    if next_extend:  # the first one went out with STOPPING=1
                        self._extend()
                    next_extend = now + self.extend_every
                self._wake.wait(max(next_extend - time.monotonic(), 0.0))
                self._wake.clear()
                continue
            if interval is not None and now >= next_ping:
                self._ping()
                next_ping = now + interval
            status = self._status_line()
            if status != self._last_status and self._host is not None and self._host.lifetime.started.is_set():
                self._last_status = status
                self._send(STATUS=status)
            wait = min(1.0, max(next_ping - time.monotonic(), 0.0)) if interval is not None else 1.0
            self._wake.wait(wait)
            self._wake.clear()

    def _ping(self) -> None:
        report = self._health_checks().run("live")
        if report.status is HealthStatus.UNHEALTHY:
            self.pings_withheld += 1
            _log.debug("systemd watchdog ping withheld ({} so far)", self.pings_withheld)
            if not self._withheld:
                _log.error("Liveness failed, withholding systemd watchdog pings: {}", report.unhealthy_summary())
            self._withheld = True
            return
        if self._withheld:
            _log.info("Liveness is back; systemd watchdog pings resume")
            self._withheld = False
        if self._send("WATCHDOG=1"):
            self.pings += 1

    def __repr__(self) -> str:
        return f"<SystemdService {self.notifier!r} pings={self.pings}>"


def use_systemd(
    builder: HostBuilder,
    *,
    watchdog: bool = True,
    environ: MutableMapping[str, str] | None = None,
) -> SystemdService | None:
    """Report to systemd when run under it (``NOTIFY_SOCKET`` set); otherwise do nothing.

    Reads (and removes) ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID`` now,
    before any child process is started, and registers a :class:`SystemdService`.
    The watchdog follows the liveness checks of :func:`hostkit.health.use_health`
    when it was called, else the built-in ones.

    Returns:
        the registered service, or ``None`` when ``NOTIFY_SOCKET`` is not set.

    .. versionadded:: 0.1
    """
    notifier = Notifier.from_environment(environ)
    if notifier is None:
        return None
    service = SystemdService(notifier, watchdog=watchdog)
    builder.services.add_hosted_service(service, name="systemd")
    return service
