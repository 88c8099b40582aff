"""``DeferredService``: the host's stand-in for a process-placed service its child builds."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._services import BackgroundService
from .protocol import FromContainer

if TYPE_CHECKING:
    from .._di import ServiceProvider
    from .._registration import HostedServiceRegistration
    from .._token import CancellationToken

__all__ = ["DeferredService"]


class DeferredService(BackgroundService):
    """Stands in the host for a process-placed service registered as a class.

    The class is built in the child, by the child's own container (singletons are
    per process), so the host process never constructs it nor holds what its
    constructor opens.

    Its ``execute`` never runs in the host.
    """

    def __init__(self, registration: HostedServiceRegistration, provider: ServiceProvider) -> None:
        self.registration = registration
        self.provider = provider

    def execute(self, stopping: CancellationToken) -> None:  # pragma: no cover - never called
        msg = f"{self.registration.display_name} is built and run in its child process"
        raise RuntimeError(msg)

    def payload(self) -> FromContainer:
        """What the child builds its own container from: this service's registrations and its dependencies'.

        The host's ``ApplicationLifetime`` stays here (it refers to the host itself);
        the child makes its own.
        """
        from .._lifetime import ApplicationLifetime

        collection = self.provider.registrations_for(self.registration)  # a fresh copy: ours to edit
        collection.remove(ApplicationLifetime)
        return FromContainer(collection, self.registration)

    def __repr__(self) -> str:
        return f"<DeferredService {self.registration.name!r} built in its child>"
