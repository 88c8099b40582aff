"""The probe listener as a hosted service, and :func:`use_health` to register it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._services import HostedService
from .._token import CancellationToken, Registration
from ..exceptions import ConfigurationError
from ._listener import ProbeListener, ProbeMode
from ._registry import HealthChecks

if TYPE_CHECKING:
    from .._builder import HostBuilder
    from .._host import Host


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

    def attach_host(self, host: Host) -> None:
        """:class:`~hostkit.HostAware`: the host calls this when it is built; same as :meth:`attach`."""
        self.attach(host)

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
    switch_interval: float | None = None,
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
        switch_interval: opt-in lower switch interval while the listener runs (``None``:
            leave it alone); see :class:`ProbeListener`.
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
