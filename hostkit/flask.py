"""Flask integration: run a host's background services inside a Flask app.

::

    from hostkit.flask import Hostkit

    hostkit = Hostkit()

    def create_app():
        app = Flask(__name__)
        app.config["HOSTKIT_CONTENTION"] = True
        hostkit.init_app(app, builder=make_builder)   # make_builder() -> HostBuilder
        return app

The host starts lazily, at the app's first request (``HOSTKIT_START = "request"``,
the default), so nothing runs at import, before a pre-fork server forks, or in the
dev server's reloader parent. ``HOSTKIT_START = "manual"`` leaves the start to
you or to :mod:`hostkit.gunicorn`'s hooks. The host stops at interpreter exit, or
at gunicorn's ``worker_exit`` hook.

Config keys (all optional):

- ``HOSTKIT_ENABLED`` (``True``): ``False`` never starts the host (tests, scripts).
- ``HOSTKIT_BUILDER``: ``"module:attr"`` of the builder factory, if not passed in code.
- ``HOSTKIT_START`` (``"request"``): ``"request"`` or ``"manual"``.
- ``HOSTKIT_SHUTDOWN_TIMEOUT``: seconds; the stop budget at exit (default: the host's).
- ``HOSTKIT_CONTENTION`` (``False``): ``True`` or a dict of
  :class:`~hostkit.contention.ContentionMonitor` options, to measure contention.
- ``HOSTKIT_LATENCY`` (``False``): record request latency for the monitor
  (wraps ``app.wsgi_app`` in :class:`~hostkit.contention.LatencyMiddleware`).
- ``HOSTKIT_EMBEDDED_LOGGING`` (the host's ``HostOptions.embedded_logging``, ``True``
  by default): hostkit's own lines (start, stop, failures with tracebacks) go to the
  stdlib logger ``"hostkit"``, so the app's logging configuration applies (to stderr
  when stdlib logging has no handler). ``False`` turns them off.

.. versionadded:: 0.1
.. versionchanged:: 0.2
   ``HostKit`` and ``HostKitState`` are now :class:`Hostkit` and :class:`HostkitState`,
   cased like every other hostkit name; the old names stay deprecated aliases for
   one release.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from flask import Flask, current_app

from ._builder import HostBuilder
from ._embed import EmbeddedHost, load_factory
from ._framework import contention_options, latency_recorder
from ._host import Host
from ._validate import describe, to_seconds
from .exceptions import ConfigurationError

__all__ = ["Hostkit", "HostkitState"]

#: Old spellings, kept for one release: each use warns and names the new one.
_DEPRECATED = {"HostKit": "Hostkit", "HostKitState": "HostkitState"}

BuilderFactory = Callable[..., "HostBuilder | Host"]
_STARTS = ("request", "manual")


class HostkitState:
    """What :class:`Hostkit` keeps per app, in ``app.extensions["hostkit"]``.

    Attributes:
        embedded: the :class:`~hostkit._embed.EmbeddedHost` (one host per process).
        start: ``"request"`` or ``"manual"``.
        enabled: ``HOSTKIT_ENABLED``.
        latency: the latency recorder, when ``HOSTKIT_LATENCY`` is on.

    .. versionadded:: 0.1
    """

    def __init__(self, embedded: EmbeddedHost, *, start: str, enabled: bool, latency: Any) -> None:
        self.embedded = embedded
        self.start = start
        self.enabled = enabled
        self.latency = latency

    def __repr__(self) -> str:
        return f"<HostkitState start={self.start!r} enabled={self.enabled} {self.embedded!r}>"


class Hostkit:
    """The Flask extension: ``Hostkit(app, builder=...)`` or ``Hostkit()`` + :meth:`init_app`.

    Args:
        app: the Flask app, or ``None`` to call :meth:`init_app` later.
        builder: a :class:`~hostkit.HostBuilder`, or a callable returning one (or a
            :class:`~hostkit.Host`); a callable taking one argument gets the app. A
            callable is preferred: it runs once per worker process.

    .. versionadded:: 0.1
    """

    def __init__(self, app: Flask | None = None, *, builder: HostBuilder | BuilderFactory | None = None) -> None:
        # Never self.app = app: one extension object may serve several apps.
        self._builder = builder
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask, *, builder: HostBuilder | BuilderFactory | None = None) -> None:
        """Attach to ``app``: read ``HOSTKIT_*`` config, register the lazy start. Starts nothing."""
        if "hostkit" in app.extensions:
            msg = f"Hostkit.init_app() was called twice for app {app.name!r}; attach the extension once per app"
            raise ConfigurationError(msg)
        config = app.config
        spec = builder or self._builder or config.get("HOSTKIT_BUILDER")
        if spec is None:
            msg = (
                f"Hostkit for app {app.name!r} has no builder: pass builder= (a HostBuilder or a callable "
                f"returning one) or set app.config['HOSTKIT_BUILDER'] = 'package.module:make_builder'"
            )
            raise ConfigurationError(msg)
        factory = load_factory(spec, "HOSTKIT_BUILDER")
        start = config.get("HOSTKIT_START", "request")
        if start not in _STARTS:
            msg = f"HOSTKIT_START must be one of {', '.join(map(repr, _STARTS))}, not: {describe(start)}"
            raise ConfigurationError(msg)
        contention = contention_options(config.get("HOSTKIT_CONTENTION", False), "HOSTKIT_CONTENTION")
        shutdown_timeout = config.get("HOSTKIT_SHUTDOWN_TIMEOUT")
        if shutdown_timeout is not None:
            shutdown_timeout = to_seconds(shutdown_timeout, "HOSTKIT_SHUTDOWN_TIMEOUT")
        embedded_logging = config.get("HOSTKIT_EMBEDDED_LOGGING")
        if embedded_logging is not None and not isinstance(embedded_logging, bool):
            msg = f"HOSTKIT_EMBEDDED_LOGGING must be True or False, not: {describe(embedded_logging)}"
            raise ConfigurationError(msg)
        latency = latency_recorder(config.get("HOSTKIT_LATENCY", False))
        embedded = EmbeddedHost(
            _bind_app(factory, app),
            name=f"flask:{app.name}",
            contention=contention,
            latency=latency,
            shutdown_timeout=shutdown_timeout,
            enabled=bool(config.get("HOSTKIT_ENABLED", True)),
            embedded_logging=embedded_logging,
        )
        # Every check passed: only now change the app.
        if latency is not None:
            from .contention import LatencyMiddleware

            app.wsgi_app = LatencyMiddleware(app.wsgi_app, latency)  # type: ignore[method-assign]
        state = HostkitState(embedded, start=start, enabled=embedded.enabled, latency=latency)
        app.extensions["hostkit"] = state
        if start == "request" and state.enabled:

            def _start_host() -> None:
                # Cheap after the first request: a pid comparison.
                state.embedded.ensure_started()

            app.before_request(_start_host)

    @staticmethod
    def state(app: Flask | None = None) -> HostkitState:
        """The extension's state for ``app`` (default: ``current_app``)."""
        target = app if app is not None else current_app
        try:
            state: HostkitState = target.extensions["hostkit"]
        except KeyError:
            msg = f"Hostkit is not attached to app {target.name!r}; call Hostkit().init_app(app) first"
            raise ConfigurationError(msg) from None
        return state

    def start(self, app: Flask | None = None) -> Host:
        """Start the host of ``app`` in this process now (idempotent per process)."""
        state = self.state(app)
        if not state.enabled:
            msg = "HOSTKIT_ENABLED is False for this app; the host is not started"
            raise ConfigurationError(msg)
        return state.embedded.ensure_started()

    def stop(self, app: Flask | None = None) -> None:
        """Stop the host of ``app`` in this process (idempotent)."""
        self.state(app).embedded.stop()

    def host(self, app: Flask | None = None) -> Host | None:
        """The running host of ``app`` in this process, or ``None`` before it started."""
        return self.state(app).embedded.host

    def __repr__(self) -> str:
        return "<Hostkit>"


def _bind_app(factory: Any, app: Flask) -> Any:
    if isinstance(factory, (HostBuilder, Host)) or not callable(factory):
        if isinstance(factory, Host):
            return lambda: factory
        return factory
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return factory
    if len(params) >= 1:
        return lambda: factory(app)
    return factory


def __getattr__(name: str) -> Any:
    new = _DEPRECATED.get(name)
    if new is None:
        msg = f"module {__name__!r} has no attribute {name!r}"
        raise AttributeError(msg)
    import warnings

    warnings.warn(
        f"hostkit.flask.{name} is deprecated and will be removed in the next release: use hostkit.flask.{new}",
        DeprecationWarning,
        stacklevel=2,
    )
    return globals()[new]
