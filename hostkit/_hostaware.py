"""The protocol of a service that wants the host it runs in."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from ._host import Host


@runtime_checkable
class HostAware(Protocol):
    """A service (or other registered object) that is handed the :class:`~hostkit.Host` it runs in.

    Services are registered on the builder before the host exists. When the host is
    built, it calls :meth:`attach_host` on every registered hosted service that has
    the method, before any service starts: a service that reports on the whole host
    (health checks, the systemd notifier, a queue consumer's readiness check) keeps
    the host from there. The call comes once per host, on the thread that builds it;
    an exception it raises fails the build.

    Example::

        class Reporter(BackgroundService):
            def attach_host(self, host: Host) -> None:
                self.host = host

            def execute(self, stopping: CancellationToken) -> None:
                while not stopping.wait(60):
                    print(self.host.status())

    .. versionadded:: 0.1
    """

    def attach_host(self, host: Host) -> None:
        """Keep ``host``: the host that was just built with this service registered."""
        ...
