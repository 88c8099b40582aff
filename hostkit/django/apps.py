"""The Django app: add ``"hostkit.django"`` to ``INSTALLED_APPS`` and describe the host in settings.

::

    INSTALLED_APPS = [..., "hostkit.django"]
    HOSTKIT = {
        "BUILDER": "myproject.services:make_builder",  # a callable returning a HostBuilder
        "START": "request",            # or "ready", or "manual" (gunicorn hooks / your code)
        "SHUTDOWN_TIMEOUT": 10,        # seconds; keep it below the server's graceful timeout
        "CONTENTION": False,           # True, or a dict of ContentionMonitor options
        "LATENCY": False,              # True: request latency for the monitor (add the middleware)
        "ENABLED": True,
        "EMBEDDED_LOGGING": True,      # hostkit's lines into LOGGING's "hostkit" logger (False: off)
    }

:meth:`HostkitConfig.ready` makes one :class:`~hostkit._embed.EmbeddedHost` and
connects it to ``request_started``, so the host starts at the first request in
the serving process: never in ``manage.py migrate``, never before a pre-fork
server forks, never in ``runserver``'s autoreload parent. ``"ready"`` starts it in
``ready()`` itself, but only in a serving process (``runserver``'s child, or a WSGI
server), never in another management command; under gunicorn ``--preload`` that would be
the master, before the fork: there use ``"request"`` or ``"manual"`` with
:mod:`hostkit.gunicorn`. ``manage.py hostkit_run`` runs the same host as a standalone
worker service.

While the embedded host runs, hostkit's own lines (start, stop, a failure with its
traceback) go to the stdlib logger ``"hostkit"``, so ``LOGGING`` decides where they
go (stderr, INFO and up, when no handler is configured anywhere);
``"EMBEDDED_LOGGING": False`` turns that off. ``hostkit_run`` logs as ``hostkit run`` does.

.. versionadded:: 0.1
"""

from __future__ import annotations

import os
import sys
from typing import Any

from django.apps import AppConfig  # type: ignore[import-untyped,import-not-found,unused-ignore]
from django.conf import settings  # type: ignore[import-untyped,import-not-found,unused-ignore]
from django.core.signals import request_started  # type: ignore[import-untyped,import-not-found,unused-ignore]

from .._embed import EmbeddedHost, load_factory
from .._framework import contention_options, latency_recorder
from .._validate import describe, to_seconds
from ..exceptions import ConfigurationError

__all__ = ["HostkitConfig", "embedded_host", "host_settings"]

_STARTS = ("request", "ready", "manual")
_KEYS = {"BUILDER", "START", "SHUTDOWN_TIMEOUT", "CONTENTION", "LATENCY", "ENABLED", "EMBEDDED_LOGGING"}


def host_settings() -> dict[str, Any]:
    """``settings.HOSTKIT`` checked, with defaults filled in."""
    raw = getattr(settings, "HOSTKIT", None)
    if raw is None:
        msg = (
            "settings.HOSTKIT is missing: set HOSTKIT = {'BUILDER': 'package.module:make_builder'} "
            "(a callable returning a hostkit.HostBuilder)"
        )
        raise ConfigurationError(msg)
    if not isinstance(raw, dict):
        msg = f"settings.HOSTKIT must be a dict, not: {describe(raw)}"
        raise ConfigurationError(msg)
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        msg = f"settings.HOSTKIT has unknown key(s) {unknown}; known keys: {sorted(_KEYS)}"
        raise ConfigurationError(msg)
    conf = {
        "START": "request",
        "SHUTDOWN_TIMEOUT": None,
        "CONTENTION": False,
        "LATENCY": False,
        "ENABLED": True,
        "EMBEDDED_LOGGING": None,  # None: the builder's HostOptions.embedded_logging (True by default)
        **raw,
    }
    if "BUILDER" not in conf:
        msg = "settings.HOSTKIT['BUILDER'] is missing: set it to 'package.module:make_builder'"
        raise ConfigurationError(msg)
    if conf["START"] not in _STARTS:
        msg = (
            f"settings.HOSTKIT['START'] must be one of {', '.join(map(repr, _STARTS))}, not: {describe(conf['START'])}"
        )
        raise ConfigurationError(msg)
    if conf["SHUTDOWN_TIMEOUT"] is not None:
        # Checked here, at ready(), not at the first stop; `manage.py hostkit_run` uses it too.
        conf["SHUTDOWN_TIMEOUT"] = to_seconds(conf["SHUTDOWN_TIMEOUT"], "settings.HOSTKIT['SHUTDOWN_TIMEOUT']")
    if conf["EMBEDDED_LOGGING"] is not None and not isinstance(conf["EMBEDDED_LOGGING"], bool):
        msg = f"settings.HOSTKIT['EMBEDDED_LOGGING'] must be True or False, not: {describe(conf['EMBEDDED_LOGGING'])}"
        raise ConfigurationError(msg)
    options = contention_options(conf["CONTENTION"], "settings.HOSTKIT['CONTENTION']")
    conf["CONTENTION"] = False if options is None else options
    return conf


def _is_serving_process() -> bool:
    """Whether this process serves requests (so ``START = "ready"`` may start the host here).

    ``manage.py``/``django-admin``/``python -m django`` run a command: only ``runserver``
    serves, and with the autoreloader only its child (``RUN_MAIN=true``) does. Any other
    program (a WSGI server) imported the project to serve it.
    """
    argv0 = sys.argv[0] if sys.argv else ""
    prog = os.path.basename(argv0)
    is_command = prog in ("manage.py", "django-admin", "django-admin.py") or (
        prog == "__main__.py" and os.path.basename(os.path.dirname(argv0)) == "django"
    )
    if not is_command:
        return True
    if (sys.argv[1] if len(sys.argv) > 1 else "") != "runserver":
        return False  # migrate, shell, hostkit_run...: not a server
    return os.environ.get("RUN_MAIN") == "true" or "--noreload" in sys.argv


class HostkitConfig(AppConfig):  # type: ignore[misc,unused-ignore]
    """``INSTALLED_APPS = [..., "hostkit.django"]``.

    .. versionadded:: 0.1
    """

    name = "hostkit.django"
    label = "hostkit"
    verbose_name = "hostkit"
    default = True

    embedded: EmbeddedHost | None = None

    def ready(self) -> None:
        conf = host_settings()
        if not conf["ENABLED"]:
            return
        spec = conf["BUILDER"]
        latency = latency_recorder(conf["LATENCY"])
        embedded = EmbeddedHost(
            lambda: _load(spec)(),
            name="django",
            contention=conf["CONTENTION"] if isinstance(conf["CONTENTION"], dict) else None,
            latency=latency,
            shutdown_timeout=conf["SHUTDOWN_TIMEOUT"],
            embedded_logging=conf["EMBEDDED_LOGGING"],
        )
        type(self).embedded = embedded
        if conf["START"] == "request":
            # weak=False: the receiver is a closure; dispatch_uid: ready() may run twice in tests.
            request_started.connect(_start_on_request, weak=False, dispatch_uid="hostkit-start")
        elif conf["START"] == "ready" and _is_serving_process():
            embedded.start()


def _load(spec: object) -> Any:
    return load_factory(spec, "settings.HOSTKIT['BUILDER']")


def _start_on_request(sender: object, **kwargs: object) -> None:
    embedded = HostkitConfig.embedded
    if embedded is not None:
        embedded.ensure_started()


def embedded_host() -> EmbeddedHost:
    """The project's :class:`~hostkit._embed.EmbeddedHost` (its ``.host`` is this process's host).

    Raises:
        ConfigurationError: ``hostkit.django`` is not in ``INSTALLED_APPS`` or is disabled.
    """
    embedded = HostkitConfig.embedded
    if embedded is None:
        msg = "hostkit.django is not ready: add 'hostkit.django' to INSTALLED_APPS and keep HOSTKIT['ENABLED'] True"
        raise ConfigurationError(msg)
    return embedded
