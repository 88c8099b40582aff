"""Dependency injection: a service collection, a provider, scopes, build-time validation.

Why our own (about 300 lines) rather than a library: the two maintained
candidates measured (dishka 1.10, wireup 2.13; see shared/facts.md) both catch
the captive dependency, but neither closes class-registered services at scope
end, and wireup also refuses a singleton that uses a transient, which .NET
allows. Both are requirements here.

Rules (.NET's): a singleton may depend on singletons and transients; a scoped
service on anything; a transient on anything its consumer may use. A singleton
that reaches a scoped service, through any chain, is refused at ``build()``.
"""

from __future__ import annotations

import inspect
import threading
import typing
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal, TypeVar, overload

from loguru import logger

from ._registration import HostedServiceRegistration, make_registration
from ._util import describe
from .exceptions import (
    CaptiveDependencyError,
    CircularDependencyError,
    InvalidServiceError,
    ScopeError,
    ServiceNotFoundError,
)

__all__ = ["Lifetime", "Scope", "ServiceCollection", "ServiceDescriptor", "ServiceProvider"]

T = TypeVar("T")
Lifetime = Literal["singleton", "scoped", "transient"]
_MISSING: Any = object()


@dataclass(frozen=True)
class _Param:
    name: str
    key: Any
    default: Any


@dataclass
class ServiceDescriptor:
    """One registration: what is asked for (``key``), for how long, and how it is made."""

    key: Any
    lifetime: Lifetime
    implementation: type | None = None
    factory: Callable[..., Any] | None = None
    instance: Any = _MISSING
    params: tuple[_Param, ...] = ()

    @property
    def display(self) -> str:
        return _name(self.key)

    def make(self, resolve: Callable[[Any], Any]) -> Any:
        if self.instance is not _MISSING:
            return self.instance
        target = self.factory if self.factory is not None else self.implementation
        assert target is not None
        kwargs = {}
        for p in self.params:
            kwargs[p.name] = resolve(p.key)
        return target(**kwargs)


def _name(key: Any) -> str:
    display = getattr(key, "display_name", None)
    if isinstance(display, str):
        return display
    return getattr(key, "__qualname__", None) or getattr(key, "__name__", None) or repr(key)


def _plan(target: Callable[..., Any], registered: Callable[[Any], bool]) -> tuple[_Param, ...]:
    """The parameters to inject into ``target``, from its type hints."""
    func = target.__init__ if isinstance(target, type) else target  # type: ignore[misc]
    if func is object.__init__:
        return ()
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):
        return ()
    try:
        hints = typing.get_type_hints(func)
    except Exception:
        hints = {}
    params = []
    items = list(signature.parameters.values())
    if isinstance(target, type) and items and items[0].name == "self":
        items = items[1:]
    for param in items:
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        key = hints.get(param.name, _MISSING)
        default = param.default if param.default is not param.empty else _MISSING
        key = _unwrap_optional(key)
        if key is _MISSING or (default is not _MISSING and not registered(key)):
            if default is _MISSING:
                params.append(_Param(param.name, key, _MISSING))
            continue
        params.append(_Param(param.name, key, default))
    return tuple(params)


def _unwrap_optional(key: Any) -> Any:
    if typing.get_origin(key) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(key) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return key


class ServiceCollection:
    """The registrations a host is built from.

    ``add_singleton``, ``add_scoped`` and ``add_transient`` take the type asked
    for, then one of: an implementation class, ``factory=`` (a callable whose
    typed parameters are injected), or ``instance=`` (singletons only).
    Constructor parameters are injected from their type hints; a parameter with a
    default whose type is not registered keeps its default.

    .. versionadded:: 0.1
    """

    def __init__(self) -> None:
        self._descriptors: dict[Any, ServiceDescriptor] = {}
        self.hosted: list[HostedServiceRegistration] = []

    def __contains__(self, key: object) -> bool:
        return key in self._descriptors

    def __len__(self) -> int:
        return len(self._descriptors)

    def __iter__(self) -> Iterator[ServiceDescriptor]:
        return iter(list(self._descriptors.values()))

    def add_singleton(
        self,
        key: Any,
        implementation: type | None = None,
        *,
        factory: Callable[..., Any] | None = None,
        instance: Any = _MISSING,
    ) -> ServiceCollection:
        """Register one instance for the whole provider (one per process)."""
        return self._add("singleton", key, implementation, factory, instance)

    def add_scoped(
        self, key: Any, implementation: type | None = None, *, factory: Callable[..., Any] | None = None
    ) -> ServiceCollection:
        """Register one instance per scope, closed when the scope ends."""
        return self._add("scoped", key, implementation, factory, _MISSING)

    def add_transient(
        self, key: Any, implementation: type | None = None, *, factory: Callable[..., Any] | None = None
    ) -> ServiceCollection:
        """Register a new instance for every resolution."""
        return self._add("transient", key, implementation, factory, _MISSING)

    def _add(
        self,
        lifetime: Lifetime,
        key: Any,
        implementation: type | None,
        factory: Callable[..., Any] | None,
        instance: Any,
    ) -> ServiceCollection:
        given = sum(x is not None for x in (implementation, factory)) + (instance is not _MISSING)
        if given > 1:
            msg = (
                f"add_{lifetime}({_name(key)}): give one of an implementation class, factory= or instance=, not several"
            )
            raise InvalidServiceError(msg)
        if given == 0:
            if not isinstance(key, type):
                msg = (
                    f"add_{lifetime}({describe(key)}): the key is not a class, so give an implementation, "
                    f"factory= or instance="
                )
                raise InvalidServiceError(msg)
            implementation = key
        if implementation is not None and not isinstance(implementation, type):
            msg = (
                f"add_{lifetime}({_name(key)}, ...): the implementation must be a class, not: {describe(implementation)}; "
                f"pass a callable as factory= instead"
            )
            raise InvalidServiceError(msg)
        if factory is not None and not callable(factory):
            msg = f"add_{lifetime}({_name(key)}, factory=...): factory must be callable, not: {describe(factory)}"
            raise InvalidServiceError(msg)
        self._descriptors[key] = ServiceDescriptor(key, lifetime, implementation, factory, instance)
        return self

    def add_hosted_service(
        self,
        service: Any,
        *,
        placement: str | None = None,
        restart: Any = None,
        name: str | None = None,
        heartbeat_timeout: float | timedelta | None = None,
        start_method: str | None = None,
        nice: int | None = None,
        cpu_affinity: Iterable[int] | None = None,
        memory_limit: int | str | None = None,
    ) -> HostedServiceRegistration:
        """Register a hosted or background service; it runs when the host runs.

        Args:
            service: a :class:`~hostkit.HostedService` or
                :class:`~hostkit.BackgroundService` subclass (built by the container,
                its constructor parameters injected) or instance.
            placement: for background services, ``"thread"`` (default) or
                ``"process"``. Moving a service is this one argument.
            restart: a :class:`~hostkit.RestartPolicy`, or ``None`` for no restarts.
            name: the name in logs, thread names and status (default: the class name).
            heartbeat_timeout: seconds without a ``heartbeat()`` that count as a hang.
            start_method: ``placement="process"`` only: ``"forkserver"``, ``"spawn"``
                or ``"fork"`` (default: ``HostOptions.start_method``).
            nice: ``placement="process"`` only: the child's nice value.
            cpu_affinity: ``placement="process"`` only: the CPUs the child may use.
            memory_limit: ``placement="process"`` only: RSS ceiling in bytes or as
                ``"512MB"``; over it the child is stopped and treated as failed.

        Raises:
            InvalidServiceError: ``service`` is not a service, or lacks ``execute``.
            ConfigurationError: an option has a wrong value, or applies to another placement.
        """
        registration = make_registration(
            service,
            existing=self.hosted,
            placement=placement,
            restart=restart,
            name=name,
            heartbeat_timeout=heartbeat_timeout,
            process_options={
                "start_method": start_method,
                "nice": nice,
                "cpu_affinity": cpu_affinity,
                "memory_limit": memory_limit,
            },
        )
        self.hosted.append(registration)
        return registration

    def descriptor(self, key: Any) -> ServiceDescriptor | None:
        return self._descriptors.get(key)

    def build_provider(self, *, validate: bool = True) -> ServiceProvider:
        """Freeze the registrations into a :class:`ServiceProvider`.

        Raises:
            CaptiveDependencyError: a singleton reaches a scoped service.
            ServiceNotFoundError: a dependency is not registered.
            CircularDependencyError: services depend on each other in a cycle.
        """
        descriptors = {}
        for key, d in self._descriptors.items():
            target = d.factory if d.factory is not None else d.implementation
            params = _plan(target, lambda k: k in self._descriptors or k in _BUILTIN_KEYS) if target else ()
            descriptors[key] = ServiceDescriptor(d.key, d.lifetime, d.implementation, d.factory, d.instance, params)
        provider = ServiceProvider(descriptors)
        if validate:
            provider.validate()
        return provider


class _Resolver:
    """What a provider and a scope share: resolution with a per-owner cache."""

    _descriptors: dict[Any, ServiceDescriptor]

    def _lookup(self, key: Any, consumer: str | None) -> ServiceDescriptor:
        descriptor = self._descriptors.get(key)
        if descriptor is None:
            needed = f"{consumer} needs {_name(key)}" if consumer else f"{_name(key)} was requested"
            msg = (
                f"{needed}, but it is not registered; register it with services.add_singleton/add_scoped/add_transient"
            )
            raise ServiceNotFoundError(msg)
        return descriptor


class ServiceProvider(_Resolver):
    """Resolves services; the root of every scope.

    Singletons live here (one per process) and are closed, in reverse creation
    order, by :meth:`close` (the host calls it when it stops). Scoped services
    can only be resolved from a scope: ``with provider.create_scope() as scope:``.

    .. versionadded:: 0.1
    """

    def __init__(self, descriptors: dict[Any, ServiceDescriptor]) -> None:
        self._descriptors = descriptors
        self._singletons: dict[Any, Any] = {}
        self._created: list[Any] = []
        self._lock = threading.RLock()
        self._closed = False

    # -- resolution ---------------------------------------------------------------

    @overload
    def get(self, key: type[T]) -> T: ...
    @overload
    def get(self, key: Any) -> Any: ...
    def get(self, key: Any) -> Any:
        """Resolve ``key`` (a type, or any registered key)."""
        return self._resolve(key, None, None)

    def _resolve(self, key: Any, scope: Scope | None, consumer: str | None) -> Any:
        if key is ServiceProvider:
            return self
        if key is Scope:
            if scope is None:
                msg = f"{consumer or 'the caller'} asked for the current Scope outside any scope; create one with provider.create_scope()"
                raise ScopeError(msg)
            return scope
        descriptor = self._lookup(key, consumer)
        lifetime = descriptor.lifetime
        if lifetime == "singleton":
            try:
                return self._singletons[key]
            except KeyError:
                pass
            with self._lock:
                if key not in self._singletons:
                    value = descriptor.make(lambda k: self._resolve(k, None, descriptor.display))
                    self._singletons[key] = value
                    if descriptor.instance is _MISSING and (hasattr(value, "close") or hasattr(value, "__exit__")):
                        self._created.append(value)
                return self._singletons[key]
        if lifetime == "scoped":
            if scope is None:
                msg = (
                    f"{descriptor.display} is scoped and cannot be resolved from the root provider"
                    f"{f' (needed by {consumer})' if consumer else ''}; resolve it inside "
                    f"`with provider.create_scope() as scope: scope.get({descriptor.display})`"
                )
                raise ScopeError(msg)
            return scope._scoped(key, descriptor)
        value = descriptor.make(lambda k: self._resolve(k, scope, descriptor.display))
        if scope is not None:
            scope._track(value)
        return value

    def create_scope(self) -> Scope:
        """A new scope: one instance of each scoped service, closed at its end."""
        if self._closed:
            msg = "this provider is closed (its host stopped); build a new host"
            raise ScopeError(msg)
        return Scope(self)

    # -- validation ---------------------------------------------------------------

    def validate(self) -> None:
        """Check every registration's graph (done by ``build()``)."""
        for key, descriptor in self._descriptors.items():
            self._walk(key, descriptor, [], descriptor.lifetime == "singleton")

    def _walk(self, key: Any, descriptor: ServiceDescriptor, path: list[Any], root_is_singleton: bool) -> None:
        if key in path:
            cycle = " -> ".join(_name(k) for k in [*path[path.index(key) :], key])
            msg = f"circular dependency: {cycle}; break the cycle (inject a factory or a scope instead of one side)"
            raise CircularDependencyError(msg)
        path = [*path, key]
        for param in descriptor.params:
            if param.key in _BUILTIN_KEYS:
                continue
            dep = self._descriptors.get(param.key)
            if dep is None:
                if param.default is not _MISSING:
                    continue
                what = (
                    "has no type hint"
                    if param.key is _MISSING
                    else f"needs {_name(param.key)}, which is not registered"
                )
                msg = (
                    f"{descriptor.display} (parameter {param.name!r}) {what}; register it with "
                    f"services.add_singleton/add_scoped/add_transient, or give the parameter a default"
                )
                raise ServiceNotFoundError(msg)
            if root_is_singleton and dep.lifetime == "scoped":
                chain = " -> ".join(_name(k) for k in [*path, param.key])
                msg = (
                    f"captive dependency: {chain} (scoped). A singleton would keep one scoped instance forever. "
                    f"Fix: inject ServiceProvider into {_name(path[0])} and resolve {_name(param.key)} inside "
                    f"`with provider.create_scope() as scope:` per unit of work, or register it as scoped/transient"
                )
                raise CaptiveDependencyError(msg)
            self._walk(param.key, dep, path, root_is_singleton and dep.lifetime != "scoped")

    # -- disposal -----------------------------------------------------------------

    def close(self) -> None:
        """Close every singleton this provider created, newest first (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            created, self._created = self._created, []
        _close_all(created, "singleton")

    def __repr__(self) -> str:
        return f"<ServiceProvider registrations={len(self._descriptors)} singletons={len(self._singletons)}>"


class Scope(_Resolver):
    """A unit of work: scoped services live here and are closed at its end.

    .. versionadded:: 0.1
    """

    def __init__(self, provider: ServiceProvider) -> None:
        self.provider = provider
        self._descriptors = provider._descriptors
        self._instances: dict[Any, Any] = {}
        self._created: list[Any] = []
        self._lock = threading.RLock()
        self._closed = False

    @overload
    def get(self, key: type[T]) -> T: ...
    @overload
    def get(self, key: Any) -> Any: ...
    def get(self, key: Any) -> Any:
        """Resolve ``key`` within this scope."""
        if self._closed:
            msg = f"this scope is closed; {_name(key)} cannot be resolved from it"
            raise ScopeError(msg)
        return self.provider._resolve(key, self, None)

    def _scoped(self, key: Any, descriptor: ServiceDescriptor) -> Any:
        try:
            return self._instances[key]
        except KeyError:
            pass
        with self._lock:
            if key not in self._instances:
                value = descriptor.make(lambda k: self.provider._resolve(k, self, descriptor.display))
                self._instances[key] = value
                self._track(value)
            return self._instances[key]

    def _track(self, value: Any) -> None:
        if hasattr(value, "close") or hasattr(value, "__exit__"):
            self._created.append(value)

    def close(self) -> None:
        """Close what the scope created, newest first; a failing close is logged and the rest still close."""
        if self._closed:
            return
        self._closed = True
        created, self._created = self._created, []
        self._instances.clear()
        _close_all(created, "scoped")

    def __enter__(self) -> Scope:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<Scope {state} instances={len(self._instances)} to_close={len(self._created)}>"


def _close_all(objects: list[Any], what: str) -> None:
    for obj in reversed(objects):
        try:
            if hasattr(obj, "close"):
                obj.close()
            else:
                obj.__exit__(None, None, None)
        except Exception:
            logger.opt(exception=True).warning("Closing the {} service {!r} failed; the others still close", what, obj)


_BUILTIN_KEYS: frozenset[Any] = frozenset({ServiceProvider, Scope})
