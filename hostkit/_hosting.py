"""Hosted-service registration: the host's service collection.

The container (:class:`~hostkit.ServiceCollection`) is generic; registering a
service the host *runs* is hosting's job, as .NET's ``AddHostedService`` is an
extension outside its container. ``HostBuilder().services`` is a
:class:`HostServiceCollection`: every container registration, plus the hosted
services in registration order.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import Any, Concatenate, ParamSpec, TypeVar, overload

from ._di import ServiceCollection
from ._registration import HostedServiceRegistration, make_registration

__all__ = ["HostServiceCollection", "returning_owner"]

_P = ParamSpec("_P")
_S = TypeVar("_S")


class HostServiceCollection(ServiceCollection):
    """The registrations a host is built from: ``builder.services``.

    A :class:`~hostkit.ServiceCollection` (``add_singleton``, ``add_scoped``,
    ``add_transient``, ``add_scope_hooks``) that also records the hosted and
    background services the host runs, with :meth:`add_hosted_service`.

    .. versionadded:: 0.2
        Before, these were methods of :class:`~hostkit.ServiceCollection` itself.
    """

    def __init__(self) -> None:
        super().__init__()
        #: The hosted-service registrations, in the order they were added.
        self.hosted: list[HostedServiceRegistration] = []

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]} hosted={len(self.hosted)}>"

    @overload
    def copy(self) -> HostServiceCollection: ...
    @overload
    def copy(self, *, only: Iterable[Any]) -> ServiceCollection: ...
    def copy(self, *, only: Iterable[Any] | None = None) -> ServiceCollection:
        """As :meth:`ServiceCollection.copy`; without ``only=`` the hosted services are kept too."""
        if only is not None:
            return super().copy(only=only)
        new = super().copy()
        new.hosted = list(self.hosted)
        return new

    def add_hosted_service(
        self,
        service: Any,
        *,
        placement: str | None = None,
        restart: Any = None,
        name: str | None = None,
        heartbeat_timeout: float | timedelta | None = None,
        replicas: int | None = None,
        start_method: str | None = None,
        nice: int | None = None,
        cpu_affinity: Iterable[int] | None = None,
        memory_limit: int | str | None = None,
        cpu_priority: str | None = None,
        keep_cores: int | None = None,
    ) -> HostedServiceRegistration:
        """Register a hosted or background service; it runs when the host runs.

        A class is built by the container (a singleton, its constructor parameters
        injected, validated at ``build()`` like every singleton); an instance is
        used as it is.

        Args:
            service: a :class:`~hostkit.HostedService` or
                :class:`~hostkit.BackgroundService` subclass (built by the container,
                its constructor parameters injected) or instance.
            placement: for background services, ``"thread"`` (default) or
                ``"process"``. Moving a service is this one argument.
            restart: a :class:`~hostkit.RestartPolicy`, or ``None`` for no restarts.
            name: the name in logs, thread names and status (default: the class name).
            heartbeat_timeout: seconds without a ``heartbeat()`` that count as a hang.
            replicas: background services only: run N copies of the service, each
                supervised, restarted and reported on its own as ``name[0]`` to
                ``name[N-1]``; each reads its :attr:`~hostkit.BackgroundService.replica`.
                With ``placement="process"`` N children (each gets its own copy of an
                instance, or builds its own from the class); with ``placement="thread"``
                N threads, which needs the class (the container builds one per replica).
            start_method: ``placement="process"`` only: ``"forkserver"``, ``"spawn"``
                or ``"fork"`` (default: ``HostOptions.start_method``).
            nice: ``placement="process"`` only: the child's nice value.
            cpu_affinity: ``placement="process"`` only: the CPUs the child may use.
            memory_limit: ``placement="process"`` only: RSS ceiling in bytes or as
                ``"512MB"``; over it the child is stopped and treated as failed.
            cpu_priority: ``placement="process"`` only: ``"low"`` (nice 19, the default
                unless ``nice=`` is given), ``"batch"`` (SCHED_BATCH), ``"idle"``
                (SCHED_IDLE) or ``"inherit"`` (the host's own priority).
            keep_cores: ``placement="process"`` only: leave this many of the host's CPUs
                (``os.sched_getaffinity`` at start) to the host; the child runs on the others.

        Raises:
            InvalidServiceError: ``service`` is not a service, or lacks ``execute``.
            ConfigurationError: an option has a wrong value, or applies to another placement;
                ``replicas`` is not an int >= 1, names a hosted service, a thread-placed
                instance or a :class:`~hostkit.OncePerDeployment` (which runs once anyway).

        .. versionchanged:: 0.2
           ``replicas``.
        """
        registration = make_registration(
            service,
            existing=self.hosted,
            placement=placement,
            restart=restart,
            name=name,
            heartbeat_timeout=heartbeat_timeout,
            replicas=replicas,
            process_options={
                "start_method": start_method,
                "nice": nice,
                "cpu_affinity": cpu_affinity,
                "memory_limit": memory_limit,
                "cpu_priority": cpu_priority,
                "keep_cores": keep_cores,
            },
        )
        self.hosted.append(registration)
        return registration


def returning_owner(
    method: Callable[Concatenate[HostServiceCollection, _P], object],
) -> Callable[[Callable[[_S], HostServiceCollection]], Callable[Concatenate[_S, _P], _S]]:
    """Turn ``services_of(owner)`` into ``owner.<method>(...)``: the collection's method, returning the owner.

    The method's signature is written once (on :class:`HostServiceCollection`);
    the shortcut has it for type checkers (``ParamSpec``) and for ``inspect`` and
    the docs (``__signature__``).
    """

    def decorate(services_of: Callable[[_S], HostServiceCollection]) -> Callable[Concatenate[_S, _P], _S]:
        def shortcut(self: _S, /, *args: _P.args, **kwargs: _P.kwargs) -> _S:
            method(services_of(self), *args, **kwargs)
            return self

        functools.update_wrapper(shortcut, services_of)  # name, qualname, module and docstring
        signature = inspect.signature(method)
        shortcut.__signature__ = signature.replace(return_annotation=signature.empty)  # type: ignore[attr-defined]
        return shortcut

    return decorate
