"""A host embedded in a web server's process: started late, once per process, stopped at exit.

The Flask extension, the Django app and the gunicorn hooks all share this one
code path (one path for 1 and N workers, for every server):

- the host is built and started at the first of: the first request, the server's
  post-fork hook, an explicit :meth:`EmbeddedHost.start`. Never at import, so no
  thread exists before a pre-fork server forks (gunicorn ``--preload``), and the
  dev server's reloader parent, which serves no request, never runs it;
- never ``Host.run()``: ``start()``/``stop()`` install no signal handler, because
  the server owns the process's signals;
- once per process: the object remembers the pid that started it; a forked child
  that inherits a started one (a mistake made before the fork) gets a fresh host;
- stopped at the server's worker-exit hook or, failing that, at interpreter exit
  (``atexit``), within the host's ``shutdown_timeout``;
- the garbage start-up leaves is collected at the end of the start (one full
  collection), so the server's requests do not pay for it later.
"""

from __future__ import annotations

import atexit
import gc
import itertools
import os
import threading
import time
import weakref
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from loguru import logger

from ._builder import HostBuilder
from ._host import Host
from ._logging import attach_embedded_logging, detach_embedded_logging
from ._options import seconds_option
from ._resolve import import_target, resolve_host
from ._status import HostState
from ._util import describe
from .exceptions import ConfigurationError

__all__ = ["EmbeddedHost", "HostFactory", "load_factory", "start_all", "stop_all"]

#: What an integration is given: a builder, a host, or a callable returning either.
HostFactory = Callable[[], "HostBuilder | Host"]

_log = logger.bind(service="host")
# What the server's hooks (start_all, stop_all) act on: every embedded host alive in this
# process, in the order they were made. Weak: the registry keeps none alive; their owners
# do (the Flask extension, the Django app config, hostkit.gunicorn.embed(), and, once a
# host started, the hook that stops it at interpreter exit). A dropped one is forgotten.
_registry: weakref.WeakValueDictionary[int, EmbeddedHost] = weakref.WeakValueDictionary()
_made = itertools.count()
_registry_lock = threading.Lock()


def _registered() -> list[EmbeddedHost]:
    with _registry_lock:
        return list(_registry.values())


def _reinit_after_fork() -> None:
    # A lock held by another thread at fork() time stays held forever in the child.
    global _registry_lock
    _registry_lock = threading.Lock()
    for embedded in list(_registry.values()):
        embedded._lock = threading.Lock()


os.register_at_fork(after_in_child=_reinit_after_fork)


class EmbeddedHost:
    """One host per process, built from ``factory`` on first use.

    Args:
        factory: a :class:`~hostkit.HostBuilder`, a callable returning a builder or a
            :class:`~hostkit.Host`. A callable is called once per process, so each
            worker gets fresh service instances.
        name: for logs.
        contention: a dict of :class:`~hostkit.contention.ContentionMonitor` options to
            watch the host, or ``None``.
        latency: a :class:`~hostkit.contention.LatencyRecorder` for the monitor.
        shutdown_timeout: the stop budget; ``None`` uses the host's ``HostOptions.shutdown_timeout``.
            Keep it under the server's own (gunicorn's ``graceful_timeout``, 30 s by default).
        enabled: ``False``: :func:`start_all` (the gunicorn hook) skips it and :meth:`start` refuses.
        embedded_logging: ``True``/``False`` overrides the host's ``HostOptions.embedded_logging``
            (hostkit's lines into the application's stdlib logging); ``None`` keeps it.

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        factory: HostFactory | HostBuilder,
        *,
        name: str = "hostkit",
        contention: dict[str, Any] | None = None,
        latency: Any = None,
        shutdown_timeout: float | timedelta | None = None,
        enabled: bool = True,
        embedded_logging: bool | None = None,
    ) -> None:
        if not (isinstance(factory, HostBuilder) or callable(factory)):
            msg = (  # type: ignore[unreachable]
                f"the host factory must be a HostBuilder or a callable returning a HostBuilder or a Host, "
                f"not: {describe(factory)}"
            )
            raise ConfigurationError(msg)
        if contention is not None:
            _check_monitor_options(contention)
        if shutdown_timeout is not None:
            # A wrong budget fails here, when the integration is set up, not when the host stops.
            shutdown_timeout = seconds_option(shutdown_timeout, f"{name}: shutdown_timeout")
        if embedded_logging is not None and not isinstance(embedded_logging, bool):
            msg = (  # type: ignore[unreachable]
                f"{name}: embedded_logging must be True, False or None, not: {describe(embedded_logging)}"
            )
            raise ConfigurationError(msg)
        self._factory = factory
        self.embedded_logging = embedded_logging
        self.name = name
        self.contention = contention
        self.latency = latency
        self.shutdown_timeout = shutdown_timeout
        self.enabled = enabled
        self._lock = threading.Lock()
        self._host: Host | None = None
        self._monitor: Any = None
        self._pid: int | None = None
        self._atexit_pid: int | None = None
        # The process whose embedded logging route this object holds open, if any.
        self._route_pid: int | None = None
        with _registry_lock:
            _registry[next(_made)] = self

    @property
    def host(self) -> Host | None:
        """The host of this process, or ``None`` if it has not started here."""
        return self._host if self._pid == os.getpid() else None

    @property
    def monitor(self) -> Any:
        """The :class:`~hostkit.contention.ContentionMonitor` of this process, or ``None``."""
        return self._monitor if self._pid == os.getpid() else None

    @property
    def started(self) -> bool:
        """Whether the host has started in this process."""
        return self.host is not None

    def ensure_started(self) -> Host:
        """Start the host unless it already started in this process; return it. Cheap after the first call."""
        host = self.host
        if host is not None:
            return host
        return self.start()

    def start(self) -> Host:
        """Build and start the host in this process (idempotent per process).

        Raises:
            ConfigurationError: the embedded host is disabled, or the factory gave no host.
        """
        if not self.enabled:
            msg = f"{self.name}: the host is disabled (HOSTKIT_ENABLED / HOSTKIT['ENABLED'] is False); not starting it"
            raise ConfigurationError(msg)
        with self._lock:
            pid = os.getpid()
            if self._host is not None and self._pid == pid:
                return self._host
            if self._host is not None:
                _log.warning(
                    "{}: the host was started in process {} before this process ({}) was forked from it; "
                    "starting a fresh host here. Start hosts after the fork (first request or post_fork hook)",
                    self.name,
                    self._pid,
                    pid,
                )
            host = self._build()
            if self.embedded_logging is not None:
                host.options.embedded_logging = self.embedded_logging
            self._host, self._pid, self._monitor = host, pid, None
            if self._atexit_pid != pid:
                self._atexit_pid = pid
                # Interpreter exit is the last chance to stop: dev servers and waitress have no exit hook.
                _at_interpreter_exit(self._stop_at_exit)
            monitor = None
            if self.contention is not None:
                from .contention import ContentionMonitor

                options = dict(self.contention)
                options.setdefault("latency", self.latency)
                # Made before the host starts: a wrong option fails here, with nothing running yet.
                monitor = ContentionMonitor(host, **options)
            # Held from before the start until after the stop, so that this object's own
            # lines around them (started, stopped with an exit code) reach the logs too.
            if host.options.embedded_logging and attach_embedded_logging():
                self._route_pid = pid
            try:
                host.start()
            except BaseException:
                self._release_route()
                raise
            if monitor is not None:
                monitor.start()
                self._monitor = monitor
            _settle_garbage(self.name)
            _log.info("{}: host started in process {}", self.name, pid)
            return host

    def _release_route(self) -> None:
        if self._route_pid == os.getpid():
            self._route_pid = None
            detach_embedded_logging()

    def _build(self) -> Host:
        return resolve_host(self._factory)

    def stop(self, timeout: float | timedelta | None = None) -> None:
        """Stop this process's host within its budget (idempotent; a no-op if it never started here)."""
        host, monitor = self.host, self.monitor
        if host is None:
            return
        if monitor is not None:
            monitor.stop()
        try:
            if host.state is not HostState.STOPPED:
                host.stop(timeout if timeout is not None else self.shutdown_timeout)
            if host.exit_code:
                _log.warning("{}: host stopped with exit code {}", self.name, host.exit_code)
        finally:
            self._release_route()

    def _stop_at_exit(self) -> None:
        try:
            self.stop()
        except Exception:
            _log.opt(exception=True).error("{}: stopping the host at exit failed", self.name)

    def __repr__(self) -> str:
        host = self.host
        return f"<EmbeddedHost {self.name!r} {host.state.value if host else 'not started'} pid={os.getpid()}>"


def _check_monitor_options(options: dict[str, Any]) -> None:
    """Refuse unknown ContentionMonitor options when the integration is set up, not at the first request."""
    import inspect

    from .contention import ContentionMonitor

    known = [p for p in inspect.signature(ContentionMonitor).parameters if p != "host"]
    unknown = sorted(set(options) - set(known))
    if unknown:
        msg = f"unknown contention monitor option(s) {unknown}; known options: {known}"
        raise ConfigurationError(msg)


def _settle_garbage(name: str) -> None:
    """Run now the full garbage collection that start-up has made due.

    A fresh server worker has just imported and built tens of thousands of objects
    (the app, the server, the host and their dependencies) that no full collection
    has walked yet. CPython (3.10-3.13) runs the next full collection after ten
    collections of the middle generation, once the objects promoted since the last
    one exceed a quarter of the old generation: in a new worker that comes seconds
    into the request load. It walks the whole heap while holding the GIL, so every
    request thread waits: tens of milliseconds, more when busy children share the
    cores and the collecting thread is descheduled. Run here, at the end of the
    host's start (before gunicorn's accept loop when ``post_worker_init`` starts the
    host), it costs the same once and no request waits for it; the next one is then
    due only when the long-lived heap has grown by a quarter.

    A process that turned the collector off (``gc.disable()``) manages collections
    itself: nothing is done then.
    """
    if not gc.isenabled():
        return
    began = time.perf_counter()
    found = gc.collect()
    _log.debug(
        "{}: full garbage collection after start: {} unreachable object(s), {:.1f} ms",
        name,
        found,
        (time.perf_counter() - began) * 1000,
    )


def start_all() -> list[Host]:
    """Start every embedded host made in this process (gunicorn's post-fork hook calls it)."""
    hosts = [h for h in _registered() if h.enabled]
    return [h.start() for h in hosts]


def stop_all(timeout: float | timedelta | None = None) -> None:
    """Stop every embedded host started in this process, last made first."""
    hosts = _registered()
    for embedded in reversed(hosts):
        try:
            embedded.stop(timeout)
        except Exception:
            _log.opt(exception=True).error("{}: stopping the host failed", embedded.name)


#: ``"package.module:attr"`` -> the object (the integrations' settings accept both).
load_factory = import_target


def _at_interpreter_exit(callback: Callable[[], None]) -> None:
    """Run ``callback`` when the interpreter exits, while it can still start threads.

    Stopping a host starts threads (the shutdown-budget timer, helper threads for
    user hooks), and since Python 3.12 an ``atexit`` callback may not start one
    ("can't create new thread at interpreter shutdown"). threading's own exit hooks
    run earlier, before non-daemon threads are joined, when threads are still
    allowed; ``concurrent.futures`` stops its workers there for the same reason.
    ``atexit`` remains the fallback where that hook is missing or already closed.
    """
    register = getattr(threading, "_register_atexit", None)
    if register is not None:
        try:
            register(callback)
            return
        except RuntimeError:  # threading is already shutting down
            pass
    atexit.register(callback)
