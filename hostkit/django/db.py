"""Django database connections in background work: one fresh connection per unit of work.

Django closes stale connections around every *request* (``request_started`` and
``request_finished`` call :func:`django.db.close_old_connections`). A background
thread has no requests, so without help it keeps one connection for its whole
life: past ``CONN_MAX_AGE``, past the database's idle timeout ("server has gone
away"), or broken after an error. :func:`add_django_db` gives every hostkit scope
the request treatment::

    from hostkit.django.db import add_django_db

    add_django_db(builder.services)

    class Mailer(BackgroundService):
        def __init__(self, provider: ServiceProvider) -> None:
            self.provider = provider

        def execute(self, stopping):
            for _ in PeriodicTimer(5.0, stopping):
                self.provider.run_in_scope(self.send_due)   # one scope per unit of work

        def send_due(self) -> None:
            for mail in Outbox.objects.filter(sent=False)[:100]:
                ...

At each scope's start, a connection that is past ``CONN_MAX_AGE`` or unusable is
dropped (the next query opens a new one); at its end the same check runs again,
so with ``CONN_MAX_AGE = 0`` (Django's default) the thread's connection is closed
after each unit of work, and with a positive ``CONN_MAX_AGE`` it is reused until
it expires, exactly as across requests. Connections are per thread in Django:
the check applies to the thread that opens and closes the scope.

.. versionadded:: 0.1
"""

from __future__ import annotations

from typing import cast

from django.db import close_old_connections  # type: ignore[import-untyped,import-not-found,unused-ignore]
from loguru import logger

from .._di import ServiceCollection
from .._util import describe
from ..exceptions import InvalidServiceError

__all__ = ["add_django_db"]


def _at_scope_start() -> None:
    close_old_connections()


def _at_scope_end() -> None:
    close_old_connections()
    logger.bind(service="django.db").trace("Stale Django connections closed at scope end")


def add_django_db(services: ServiceCollection) -> ServiceCollection:
    """Close stale Django connections when every scope starts and ends.

    Args:
        services: the collection to add the scope hooks to (``builder.services``).

    Returns:
        ``services``, for chaining.

    Raises:
        InvalidServiceError: ``services`` is not a :class:`~hostkit.ServiceCollection`.

    .. versionadded:: 0.1
    """
    if not isinstance(cast("object", services), ServiceCollection):
        msg = f"add_django_db() needs a hostkit.ServiceCollection (builder.services), not: {describe(services)}"
        raise InvalidServiceError(msg)
    return services.add_scope_hooks(on_start=_at_scope_start, on_end=_at_scope_end)
