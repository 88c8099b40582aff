"""HostBuilder: registrations and options in, a validated Host out."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, NoReturn, cast

from ._host import Host
from ._hosting import HostServiceCollection, returning_owner
from ._lifetime import ApplicationLifetime
from ._options import HostOptions
from ._util import describe
from .exceptions import ConfigurationError, ConfigurationTypeError, HostStateError, NotBuiltError

__all__ = ["HostBuilder"]

# What a Host has and a HostBuilder does not: asked of a builder, they get "call build() first".
_HOST_ONLY = frozenset({"run", "start", "stop", "status", "state", "exit_code", "lifetime"})


class HostBuilder:
    """Collects services and options, then :meth:`build` makes the :class:`~hostkit.Host`.

    Example::

        builder = HostBuilder()
        builder.services.add_hosted_service(WarmCache)
        builder.services.add_hosted_service(Reporter, placement="process")
        host = builder.build()
        raise SystemExit(host.run())

    .. versionadded:: 0.1
    """

    def __init__(self, *, options: HostOptions | None = None) -> None:
        if options is not None and not isinstance(cast("object", options), HostOptions):
            msg = f"HostBuilder(options=...) must be a hostkit.HostOptions, not: {describe(options)}"
            raise ConfigurationTypeError(msg)
        self.services = HostServiceCollection()
        self.options = options if options is not None else HostOptions()
        self._built = False

    def configure_options(self, **changes: Any) -> HostBuilder:
        """Change :class:`~hostkit.HostOptions` fields by name; validated at once.

        Raises:
            ConfigurationError: an unknown option name, or a wrong value.
        """
        known = {f.name for f in dataclasses.fields(HostOptions)}
        unknown = sorted(set(changes) - known)
        if unknown:
            msg = f"unknown HostOptions field(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            raise ConfigurationError(msg)
        self.options = dataclasses.replace(self.options, **changes)
        return self

    @returning_owner(HostServiceCollection.add_hosted_service)
    def add_hosted_service(self) -> HostServiceCollection:
        """Shortcut for ``builder.services.add_hosted_service(...)`` that returns the builder.

        Takes the same arguments as :meth:`HostServiceCollection.add_hosted_service`.
        """
        return self.services

    def build(self) -> Host:
        """Validate everything and make the host; nothing runs yet.

        Raises:
            HostStateError: ``build()`` was called before on this builder.
            ConfigurationError: ``ApplicationLifetime`` or ``HostOptions`` is registered
                in the services: the host owns both (the lifetime is injected, the
                options come from the builder).
            CaptiveDependencyError, ServiceNotFoundError, CircularDependencyError:
                the dependency graph is wrong (see :class:`~hostkit.ServiceCollection`).
        """
        if self._built:
            msg = "HostBuilder.build() was called twice; a builder builds one host. Make a new HostBuilder"
            raise HostStateError(msg)
        self._refuse_host_owned_registrations()
        self._built = True
        lifetime = ApplicationLifetime()
        # A copy: the user's collection stays as they wrote it (and picklable for a child process).
        services = self.services.copy()
        # Both per process: a process-placed service's child has its own lifetime (its
        # stop_application() is passed on to this host) and a copy of the options.
        services.add_singleton(ApplicationLifetime, instance=lifetime, per_process=True)
        services.add_singleton(HostOptions, instance=self.options, per_process=True)
        for registration in services.hosted:
            if isinstance(registration.service, type):
                # One key per service it runs: the registration, or each thread-placed replica's own.
                for key in dict.fromkeys(registration.container_key(replica) for _, replica in registration.slots()):
                    services.add_singleton(
                        key,
                        registration.service,
                    )
        provider = services.build_provider(validate=True)
        return Host(provider, list(services.hosted), options=self.options, lifetime=lifetime)

    # Hidden from type checkers, so that they still flag `builder.run()` and `with builder:`;
    # at run time these turn the bare AttributeError/TypeError into the fix.
    if not TYPE_CHECKING:

        def __getattr__(self, name: str) -> NoReturn:
            if name in _HOST_ONLY:
                call = f"{name}()" if name in ("run", "start", "stop", "status") else name
                msg = (
                    f"HostBuilder has no {call}; call builder.build() first to get a Host, "
                    f"then host.{call} (the builder only collects services and options)"
                )
                raise NotBuiltError(msg)
            msg = f"{type(self).__name__!r} object has no attribute {name!r}"
            # name/obj: Python's own "Did you mean ...?" hint still works for a typo.
            raise AttributeError(msg, name=name, obj=self)

        def __enter__(self) -> NoReturn:
            msg = (
                "a HostBuilder is not a context manager; call builder.build() first to get a Host, "
                "then `with host:` (or host.run())"
            )
            raise NotBuiltError(msg)

        def __exit__(self, *exc: object) -> None:  # pragma: no cover - __enter__ always raises
            return None

    def _refuse_host_owned_registrations(self) -> None:
        """The lifetime and the options belong to the host: a registration of either would be ignored.

        Refused here, before anything runs, rather than leaving services holding a
        lifetime the host never sets, or options it never reads.
        """
        if ApplicationLifetime in self.services:
            msg = (
                "ApplicationLifetime is registered in the services, but a host always uses its own lifetime and "
                "would ignore this one. Remove the registration: a service that needs the lifetime takes an "
                "ApplicationLifetime parameter and gets the host's own injected (or use host.lifetime)"
            )
            raise ConfigurationError(msg)
        if HostOptions in self.services:
            msg = (
                "HostOptions is registered in the services, but a host takes its options from the builder and "
                "would ignore this registration. Remove it and set the options on the builder: "
                "HostBuilder(options=HostOptions(...)) or builder.configure_options(...); a service that needs "
                "them takes a HostOptions parameter and gets the builder's injected"
            )
            raise ConfigurationError(msg)

    def __repr__(self) -> str:
        return f"<HostBuilder hosted={len(self.services.hosted)} registrations={len(self.services)}>"
