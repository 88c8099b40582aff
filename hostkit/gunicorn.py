"""gunicorn server hooks: start each worker's host after the fork, stop it at worker exit.

In ``gunicorn.conf.py``::

    from hostkit.gunicorn import post_worker_init, worker_exit  # noqa: F401  (gunicorn reads them)

Every host made through :class:`hostkit.flask.Hostkit`, the Django app, or
:func:`embed` (for any other WSGI app) is an :class:`~hostkit._embed.EmbeddedHost`;
``post_worker_init`` starts them in the worker (after the app is loaded, so with
or without ``--preload``), ``worker_exit`` stops them within their budget. No
thread exists in the master, and no signal handler is installed: the worker's
signals belong to gunicorn. Keep the host's ``shutdown_timeout`` below gunicorn's
``graceful_timeout`` (30 s by default), else gunicorn kills the worker first.

Services run once per worker; wrap one in :class:`hostkit.OncePerDeployment` to run
it in one worker of the machine, with takeover when that worker dies.

A worker's host logs through the stdlib logger ``"hostkit"`` (to the worker's stderr,
gunicorn's, unless ``logconfig_dict`` gives that logger a handler);
``embed(factory, embedded_logging=False)`` or the Flask/Django setting turns it off.

.. versionadded:: 0.1
"""

from __future__ import annotations

import os
from typing import Any

# This module is for gunicorn: fail at import, not in a hook, when it is missing.
import gunicorn  # type: ignore[import-untyped,import-not-found,unused-ignore]  # noqa: F401
from loguru import logger

from ._builder import HostBuilder
from ._embed import EmbeddedHost, HostFactory, start_all, stop_all

__all__ = ["embed", "post_worker_init", "worker_exit"]

_log = logger.bind(service="host")
# What embed() made, kept for the process's life: a gunicorn config module often calls
# embed() without keeping the result, and the post-fork hook must still start it (the
# embed registry only holds weak references).
_embedded: list[EmbeddedHost] = []


def embed(factory: HostFactory | HostBuilder, **options: Any) -> EmbeddedHost:
    """Make an embedded host for a plain WSGI app; the hooks start and stop it.

    Args:
        factory: a builder or a callable returning a builder or a host (called once per worker).
        options: passed to :class:`~hostkit._embed.EmbeddedHost` (``contention``, ``shutdown_timeout``...).
    """
    embedded = EmbeddedHost(factory, name=options.pop("name", "gunicorn"), **options)
    _embedded.append(embedded)
    return embedded


def post_worker_init(worker: Any) -> None:
    """gunicorn hook: the worker has loaded the app; start every embedded host in it."""
    hosts = start_all()
    _log.info("gunicorn worker {} started {} host(s)", os.getpid(), len(hosts))


def worker_exit(server: Any, worker: Any) -> None:
    """gunicorn hook: the worker is exiting; stop every host it started, within their budgets."""
    stop_all()
