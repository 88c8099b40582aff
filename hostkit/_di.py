"""Dependency injection: a service collection, a provider, scopes, build-time validation.

Why our own (this one module) rather than a library: the two maintained
candidates measured (dishka 1.10, wireup 2.13; see shared/facts.md) both catch
the captive dependency, but neither closes class-registered services at scope
end, and wireup also refuses a singleton that uses a transient, which .NET
allows. Both are requirements here.

Rules (.NET's): a singleton may depend on singletons and transients; a scoped
service on anything; a transient on anything its consumer may use. A singleton
that reaches a scoped service (or the current :class:`Scope`), through any
chain, is refused at ``build()``.

Data flow::

    ServiceCollection --build_provider()--> ServiceProvider (root: singletons)
        (descriptors)     plans + validation      |
                                                  +--create_scope()--> Scope (scoped + its transients)
                                                  |                      closed at ``with`` exit, LIFO
                                                  +--close()  singletons and root transients, LIFO
"""

from __future__ import annotations

import collections
import dataclasses
import inspect
import threading
import types
import typing
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal, TypeVar, overload

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
R = TypeVar("R")
Lifetime = Literal["singleton", "scoped", "transient"]
_LIFETIMES: tuple[Lifetime, ...] = ("singleton", "scoped", "transient")


class _Missing:
    """The "no value" marker. It pickles *by name*, so that after a dill round trip
    (a process-placed service's child rebuilds the container) ``x is _MISSING``
    still holds; a bare ``object()`` would come back as a different object."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return f"<{self._name.strip('_').lower()}>"

    def __reduce__(self) -> str:
        return self._name


_MISSING: Any = _Missing("_MISSING")


@dataclass(frozen=True)
class _Unresolved:
    """A type hint that could not be evaluated (kept to report it at build time)."""

    text: str
    error: str


@dataclass(frozen=True)
class _Param:
    name: str
    key: Any
    default: Any


@dataclass
class ServiceDescriptor:
    """One registration: what is asked for (``key``), for how long, and how it is made.

    .. versionadded:: 0.1
    """

    key: Any
    lifetime: Lifetime
    implementation: type | None = None
    factory: Callable[..., Any] | None = None
    instance: Any = _MISSING
    #: The injection plan, filled in by the provider (empty in a collection).
    params: tuple[_Param, ...] = ()
    #: A singleton meant to exist once per process: a process-placed service that
    #: depends on it gets its own in its child, and ``build()`` does not warn about it.
    per_process: bool = False

    @property
    def display(self) -> str:
        """The key's name, as error messages and logs show it."""
        return _name(self.key)


def _name(key: Any) -> str:
    display = getattr(key, "display_name", None)
    if isinstance(display, str):
        return display
    if isinstance(key, _Unresolved):
        return repr(key.text)
    if key is _MISSING:
        return "<no type hint>"
    name = getattr(key, "__qualname__", None) or getattr(key, "__name__", None)
    return name if isinstance(name, str) else repr(key)


def _unwrap_optional(key: Any) -> Any:
    """``X | None`` and ``Optional[X]`` -> ``X``; anything else unchanged."""
    if typing.get_origin(key) in (typing.Union, getattr(types, "UnionType", None)):
        args = [a for a in typing.get_args(key) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return key


def _hints(func: Callable[..., Any], names: dict[str, Any]) -> dict[str, Any]:
    """Evaluate ``func``'s parameter annotations.

    ``names`` (registered classes by name) is passed as the local namespace, so a
    class defined inside a function, and named in a string annotation (``from
    __future__ import annotations``), still resolves when it is registered.
    An annotation that cannot be evaluated comes back as :class:`_Unresolved`.
    """
    try:
        return typing.get_type_hints(func, localns=names)
    except Exception:  # fall back to one annotation at a time, to name the bad one
        pass
    raw = getattr(func, "__annotations__", {}) or {}
    globalns = getattr(func, "__globals__", {})
    hints: dict[str, Any] = {}
    for pname, ann in raw.items():
        if not isinstance(ann, str):
            hints[pname] = ann
            continue
        try:
            hints[pname] = eval(ann, dict(globalns), dict(names))  # an annotation, evaluated as typing does
        except Exception as err:  # reported by validation, naming the parameter
            hints[pname] = _Unresolved(ann, f"{type(err).__name__}: {err}")
    return hints


def _plan(target: Callable[..., Any], registered: Callable[[Any], bool], names: dict[str, Any]) -> tuple[_Param, ...]:
    """The parameters to inject into ``target``, from its type hints.

    A parameter with a default is injected only when its type is registered;
    otherwise it keeps its default (an optional dependency). A factory whose only
    parameter has no type hint receives the resolver (the current scope, or the
    provider), as in .NET's ``sp => new Foo(sp.GetRequiredService<Bar>())``:
    ``factory=lambda sp: Foo(sp.get(Bar))``.
    """
    is_class = isinstance(target, type)
    func: Any = target.__init__ if is_class else target
    if func is object.__init__:
        return ()
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):
        return ()
    hints = _hints(func, names)
    items = [p for p in signature.parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if is_class and items and items[0].kind in (items[0].POSITIONAL_ONLY, items[0].POSITIONAL_OR_KEYWORD):
        items = items[1:]  # self
    if not is_class and len(items) == 1 and items[0].name not in hints and items[0].default is items[0].empty:
        return (_Param(items[0].name, _RESOLVER, _MISSING),)
    params = []
    for param in items:
        key = _unwrap_optional(hints.get(param.name, _MISSING))
        default = param.default if param.default is not param.empty else _MISSING
        if default is not _MISSING and (key is _MISSING or isinstance(key, _Unresolved) or not registered(key)):
            continue  # optional and not registered: the default stays
        params.append(_Param(param.name, key, default))
    return tuple(params)


@dataclass(frozen=True)
class _CallParam:
    name: str
    key: Any
    default: Any
    position: int | None  # index among the positional parameters, None if keyword-only


def _call_plan(func: Callable[..., Any], names: dict[str, Any]) -> tuple[_CallParam, ...]:
    """Every named parameter of ``func`` (bound methods without ``self``), for run_in_scope."""
    signature = inspect.signature(func)
    hints = _hints(func, names)
    plan = []
    position = 0
    for param in signature.parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        pos: int | None = None
        if param.kind in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD):
            pos = position
            position += 1
        key = _unwrap_optional(hints.get(param.name, _MISSING))
        default = param.default if param.default is not param.empty else _MISSING
        plan.append(_CallParam(param.name, key, default, pos))
    return tuple(plan)


# The key of a factory's untyped single parameter: it receives the resolver.
_RESOLVER: Any = _Missing("_RESOLVER")


class ServiceCollection:
    """The registrations a host is built from: ``builder.services``.

    ``add_singleton``, ``add_scoped`` and ``add_transient`` take the type asked
    for, then one of: an implementation class, ``factory=`` (a callable whose
    typed parameters are injected; a generator function is run up to its
    ``yield``, and finished when its owner closes), or ``instance=`` (singletons
    only; hostkit never closes an instance it did not create). Registering the
    same key again replaces the earlier registration.

    Constructor parameters are injected from their type hints; a parameter with a
    default whose type is not registered keeps its default. Parameters typed
    :class:`ServiceProvider` receive the root provider (the scope factory), and
    parameters typed :class:`Scope` the current scope.

    A collection whose classes and factories are importable or dill-picklable
    (lambdas and closures are) survives a dill round trip, so a child process can
    build its own provider from it: singletons are per process.

    .. versionadded:: 0.1
    """

    def __init__(self) -> None:
        self._descriptors: dict[Any, ServiceDescriptor] = {}
        self._scope_hooks: list[tuple[Callable[[], object] | None, Callable[[], object] | None]] = []
        self.hosted: list[HostedServiceRegistration] = []

    def __contains__(self, key: object) -> bool:
        return key in self._descriptors

    def __len__(self) -> int:
        return len(self._descriptors)

    def __iter__(self) -> Iterator[ServiceDescriptor]:
        return iter(list(self._descriptors.values()))

    def __repr__(self) -> str:
        counts = {lt: 0 for lt in _LIFETIMES}
        for d in self._descriptors.values():
            counts[d.lifetime] += 1
        return (
            f"<ServiceCollection singleton={counts['singleton']} scoped={counts['scoped']} "
            f"transient={counts['transient']} hosted={len(self.hosted)}>"
        )

    def copy(self) -> ServiceCollection:
        """A new collection with the same registrations (the registered objects are shared)."""
        new = ServiceCollection()
        new._descriptors = dict(self._descriptors)
        new._scope_hooks = list(self._scope_hooks)
        new.hosted = list(self.hosted)
        return new

    def without(self, *keys: Any) -> ServiceCollection:
        """A copy of this collection without the registrations of ``keys`` (absent keys are ignored)."""
        new = self.copy()
        for key in keys:
            new._descriptors.pop(key, None)
        return new

    def add_singleton(
        self,
        key: Any,
        implementation: type | None = None,
        *,
        factory: Callable[..., Any] | None = None,
        instance: Any = _MISSING,
        per_process: bool = False,
    ) -> ServiceCollection:
        """Register one instance for the whole provider (one per process).

        Created at its first resolution, exactly once even when threads race for
        it; closed (if it has ``close()`` or is a context manager) when the host
        stops, newest first. An ``instance=`` is never closed by hostkit.

        A ``placement="process"`` service registered as a class is built in its
        child by the child's own container, so it gets its own instance of every
        singleton it depends on (an ``instance=`` crosses as a pickled copy), not
        the one this process built and filled. ``build()`` logs a WARNING naming
        the chain for each such service.

        Args:
            per_process: this singleton is meant to exist once per process (it
                loads what it holds itself, or holds nothing another process
                needs: settings, a client, a connection pool). Process-placed
                services that depend on it get their own without a warning.

        Raises:
            InvalidServiceError: not exactly one way to make it, or a wrong kind of one, or
                ``per_process`` is not a bool.
        """
        if not isinstance(typing.cast("object", per_process), bool):
            msg = f"add_singleton({_name(key)}, per_process=...) must be True or False, not: {describe(per_process)}"
            raise InvalidServiceError(msg)
        return self._add("singleton", key, implementation, factory, instance, per_process=per_process)

    def add_scoped(
        self, key: Any, implementation: type | None = None, *, factory: Callable[..., Any] | None = None
    ) -> ServiceCollection:
        """Register one instance per scope, closed when the scope ends.

        Raises:
            InvalidServiceError: both or neither of ``implementation`` and ``factory``, or a wrong kind.
        """
        return self._add("scoped", key, implementation, factory, _MISSING)

    def add_transient(
        self, key: Any, implementation: type | None = None, *, factory: Callable[..., Any] | None = None
    ) -> ServiceCollection:
        """Register a new instance for every resolution, closed with the scope (or provider) that made it.

        Raises:
            InvalidServiceError: both or neither of ``implementation`` and ``factory``, or a wrong kind.
        """
        return self._add("transient", key, implementation, factory, _MISSING)

    def add_scope_hooks(
        self, *, on_start: Callable[[], object] | None = None, on_end: Callable[[], object] | None = None
    ) -> ServiceCollection:
        """Run ``on_start`` when every scope opens and ``on_end`` when it ends.

        ``on_end`` runs after the scope's services are closed, in the thread that
        closes the scope, in reverse order of registration; a failing ``on_end``
        is logged and the others still run. Used by
        :func:`hostkit.django.db.add_django_db` to drop stale connections.

        Raises:
            InvalidServiceError: neither hook given, or one is not callable.

        .. versionadded:: 0.1
        """
        if on_start is None and on_end is None:
            msg = "add_scope_hooks() needs on_start=, on_end= or both"
            raise InvalidServiceError(msg)
        for what, hook in (("on_start", on_start), ("on_end", on_end)):
            if hook is not None and not callable(typing.cast("object", hook)):
                msg = f"add_scope_hooks({what}=...) must be a callable taking no arguments, not: {describe(hook)}"
                raise InvalidServiceError(msg)
        self._scope_hooks.append((on_start, on_end))
        return self

    def _add(
        self,
        lifetime: Lifetime,
        key: Any,
        implementation: type | None,
        factory: Callable[..., Any] | None,
        instance: Any,
        *,
        per_process: bool = False,
    ) -> ServiceCollection:
        given = sum(x is not None for x in (implementation, factory)) + (instance is not _MISSING)
        if given > 1:
            msg = (
                f"add_{lifetime}({_name(key)}): give one of an implementation class, factory= or instance=, not several"
            )
            raise InvalidServiceError(msg)
        if key is None or key is ServiceProvider or key is Scope:
            msg = f"add_{lifetime}({describe(key)}): this key cannot be registered; use your own type as the key"
            raise InvalidServiceError(msg)
        if given == 0:
            if not isinstance(key, type):
                msg = (
                    f"add_{lifetime}({describe(key)}): the key is not a class, so give an implementation class, "
                    f"factory= or instance="
                )
                raise InvalidServiceError(msg)
            implementation = key
        if implementation is not None:
            if not isinstance(typing.cast("object", implementation), type):
                msg = (
                    f"add_{lifetime}({_name(key)}, ...): the implementation must be a class, "
                    f"not: {describe(implementation)}; pass a callable as factory= instead"
                )
                raise InvalidServiceError(msg)
            if isinstance(key, type) and not _is_subclass(implementation, key):
                msg = (
                    f"add_{lifetime}({_name(key)}, {_name(implementation)}): {_name(implementation)} is not a "
                    f"subclass of {_name(key)}; register it under its own type, or use factory="
                )
                raise InvalidServiceError(msg)
        if factory is not None and not callable(typing.cast("object", factory)):
            msg = f"add_{lifetime}({_name(key)}, factory=...): factory must be callable, not: {describe(factory)}"
            raise InvalidServiceError(msg)
        if instance is not _MISSING and isinstance(key, type) and not _is_instance(instance, key):
            msg = f"add_singleton({_name(key)}, instance=...): the instance is not a {_name(key)}: {describe(instance)}"
            raise InvalidServiceError(msg)
        self._descriptors[key] = ServiceDescriptor(
            key, lifetime, implementation, factory, instance, per_process=per_process
        )
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
        """The registration of ``key``, or ``None``."""
        return self._descriptors.get(key)

    def build_provider(self, *, validate: bool = True) -> ServiceProvider:
        """Freeze the registrations into a :class:`ServiceProvider`.

        Args:
            validate: check the whole graph now (default); ``False`` defers every
                error to the first resolution that meets it.

        Raises:
            CaptiveDependencyError: a singleton reaches a scoped service.
            ServiceNotFoundError: a dependency is not registered, or has no usable type hint.
            CircularDependencyError: services depend on each other in a cycle.
        """
        return ServiceProvider(self.copy(), validate=validate)


def _is_subclass(cls: type, key: type) -> bool:
    try:
        return issubclass(cls, key)
    except TypeError:  # a non-runtime Protocol or similar: duck typing, accept
        return True


def _is_instance(obj: object, key: type) -> bool:
    try:
        return isinstance(obj, key)
    except TypeError:
        return True


# How an object the container created is finished: by close(), by __exit__, or by
# resuming the generator its factory was.
_CLOSE, _EXIT, _GEN = 1, 2, 3


class _Entry:
    """A registration compiled for resolution: the plan is computed once, at build."""

    __slots__ = ("deps", "display", "instance", "is_gen", "key", "lifetime", "params", "target")

    def __init__(self, d: ServiceDescriptor, params: tuple[_Param, ...]) -> None:
        self.key = d.key
        self.lifetime = d.lifetime
        self.instance = d.instance
        self.target: Callable[..., Any] | None = d.factory if d.factory is not None else d.implementation
        self.is_gen = d.factory is not None and inspect.isgeneratorfunction(d.factory)
        self.params = params
        self.deps = tuple((p.name, p.key) for p in params)
        self.display = d.display


def _disposal(cls: type) -> int:
    # close() is preferred: most context managers (files, sessions, sockets) have it,
    # and __exit__ without a matching __enter__ is only the fallback.
    if callable(getattr(cls, "close", None)):
        return _CLOSE
    if callable(getattr(cls, "__exit__", None)):
        return _EXIT
    return 0


# type -> how its instances are finished; looked up once per type (benchmarks/di.py:
# a failed hasattr costs as much as the rest of a resolution).
_KINDS: dict[type, int] = {}


class _Owner:
    """What a provider and a scope share: a list of objects to finish, newest last."""

    __slots__ = ()

    _to_close: list[tuple[int, Any]]


class ServiceProvider(_Owner):
    """Resolves services; the root of every scope (the "scope factory").

    Singletons live here (one per process) and are closed, newest first, by
    :meth:`close` (the host calls it at the end of its stop), as are transients
    resolved from the root. Scoped services are resolved only from a scope::

        with provider.create_scope() as scope:
            scope.get(ReportRepository).flush()

    .. versionadded:: 0.1
    """

    def __init__(self, collection: ServiceCollection | dict[Any, ServiceDescriptor], *, validate: bool = True) -> None:
        if isinstance(collection, dict):
            # A mapping of descriptors (what a process-placed service's child receives).
            descriptors_only = ServiceCollection()
            descriptors_only._descriptors = dict(collection)
            collection = descriptors_only
        #: The registrations this provider was built from (picklable with dill when they are).
        self.collection = collection
        descriptors = collection._descriptors
        names: dict[str, Any] = {}
        for key in [*descriptors, ServiceProvider, Scope]:
            if isinstance(key, type):
                # A name two registered classes share is left out: the hint would be ambiguous.
                names[key.__name__] = key if key.__name__ not in names else _MISSING
        names = {n: k for n, k in names.items() if k is not _MISSING}

        def registered(k: Any) -> bool:
            return k in descriptors or k is ServiceProvider or k is Scope

        self._entries: dict[Any, _Entry] = {}
        self._descriptors: dict[Any, ServiceDescriptor] = {}
        for key, d in descriptors.items():
            target = d.factory if d.factory is not None else d.implementation
            params = _plan(target, registered, names) if target is not None and d.instance is _MISSING else ()
            self._entries[key] = _Entry(d, params)
            self._descriptors[key] = dataclasses.replace(d, params=params)
        self._names = names
        self._hooks = list(collection._scope_hooks)
        self._singletons: dict[Any, Any] = {}
        self._to_close = []
        # One re-entrant lock for singleton creation: re-entrant because making a
        # singleton resolves its singleton dependencies on the same thread.
        self._lock = threading.RLock()
        self._closed = False
        self._plans: dict[Any, tuple[_CallParam, ...]] = {}
        if validate:
            self.validate()

    # -- resolution ---------------------------------------------------------------

    @overload
    def get(self, key: type[T]) -> T: ...
    @overload
    def get(self, key: Any) -> Any: ...
    def get(self, key: Any) -> Any:
        """Resolve ``key`` (a type, or any registered key) from the root.

        Raises:
            ServiceNotFoundError: ``key`` is not registered.
            ScopeError: ``key`` is scoped (or needs a scoped service), or the provider is closed.
        """
        if self._closed:
            self._raise_closed(key)
        return self._resolve(key, None, None)

    def _resolve(self, key: Any, scope: Scope | None, consumer: str | None) -> Any:
        # The hot path (benchmarks/di.py): one dict lookup and a branch per lifetime;
        # misses use a sentinel, not KeyError (raising costs more than the lookup).
        # Everything unusual (built-in keys, errors) is in _special.
        entry = self._entries.get(key)
        if entry is None:
            return self._special(key, scope, consumer)
        lifetime = entry.lifetime
        if lifetime == "scoped":
            if scope is None:
                self._raise_scoped_at_root(entry, consumer)
            value = scope._instances.get(key, _MISSING)
            if value is _MISSING:
                # No lock: a scope belongs to one thread (as the session it holds does).
                value = self._make(entry, scope, scope)
                scope._instances[key] = value
            return value
        if lifetime == "singleton":
            value = self._singletons.get(key, _MISSING)
            return value if value is not _MISSING else self._make_singleton(entry)
        return self._make(entry, scope, scope if scope is not None else self)

    def _make(self, entry: _Entry, scope: Scope | None, owner: _Owner) -> Any:
        """Call ``entry``'s target with its dependencies; ``owner`` will finish the result."""
        deps = entry.deps
        if deps:
            resolve = self._resolve
            display = entry.display
            kwargs = {}
            for name, key in deps:
                kwargs[name] = resolve(key, scope, display)
            value = entry.target(**kwargs)  # type: ignore[misc]
        else:
            value = entry.target()  # type: ignore[misc]
        if entry.is_gen:
            generator = value
            value = next(generator)
            owner._to_close.append((_GEN, generator))
        else:
            kind = _KINDS.get(type(value))
            if kind is None:
                kind = _KINDS[type(value)] = _disposal(type(value))
            if kind:
                # list.append is atomic under the GIL: concurrent resolutions at the
                # root never lose an entry.
                owner._to_close.append((kind, value))
        return value

    def _make_singleton(self, entry: _Entry) -> Any:
        with self._lock:
            # Checked again under the lock: another thread may have made it while
            # this one waited, and a singleton is made exactly once.
            value = self._singletons.get(entry.key, _MISSING)
            if value is not _MISSING:
                return value
            if self._closed:
                self._raise_closed(entry.key)
            value = entry.instance if entry.instance is not _MISSING else self._make(entry, None, self)
            self._singletons[entry.key] = value
            return value

    def _special(self, key: Any, scope: Scope | None, consumer: str | None) -> Any:
        if key is ServiceProvider:
            return self
        if key is _RESOLVER:
            return scope if scope is not None else self
        if key is Scope:
            if scope is None:
                msg = (
                    f"{consumer or 'the caller'} asked for the current Scope outside any scope; "
                    f"create one with provider.create_scope()"
                )
                raise ScopeError(msg)
            return scope
        needed = f"{consumer} needs {_name(key)}" if consumer else f"{_name(key)} was requested"
        msg = f"{needed}, but it is not registered; register it with services.add_singleton/add_scoped/add_transient"
        raise ServiceNotFoundError(msg)

    def _raise_scoped_at_root(self, entry: _Entry, consumer: str | None) -> typing.NoReturn:
        needed = f" (needed by {consumer})" if consumer else ""
        msg = (
            f"{entry.display} is scoped and cannot be resolved from the root provider{needed}; resolve it inside "
            f"`with provider.create_scope() as scope: scope.get({entry.display})`"
        )
        raise ScopeError(msg)

    def _raise_closed(self, key: Any) -> typing.NoReturn:
        msg = f"this provider is closed (its host stopped); {_name(key)} cannot be resolved. Build a new host"
        raise ScopeError(msg)

    def create_scope(self) -> Scope:
        """A new scope: one instance of each scoped service, all closed at its end.

        Use it as a context manager, one per unit of work. Scopes are cheap
        (microseconds); a scope belongs to the thread that uses it.

        Raises:
            ScopeError: the provider is closed.
        """
        if self._closed:
            msg = "this provider is closed (its host stopped); no new scope can be created. Build a new host"
            raise ScopeError(msg)
        return Scope(self)

    def run_in_scope(self, func: Callable[..., R], /, *args: Any, **kwargs: Any) -> R:
        """Call ``func`` in a new scope, its other typed parameters injected from that scope.

        The one-line unit of work for a loop: the scope is closed when ``func``
        returns *or raises* (the exception propagates)::

            def execute(self, stopping):
                for _ in PeriodicTimer(5.0, stopping):
                    self.provider.run_in_scope(self.flush_reports)

            def flush_reports(self, repo: ReportRepository) -> None:
                repo.flush()

        Parameters given in ``args``/``kwargs`` are passed through; a parameter
        typed :class:`Scope` receives the scope; a parameter with a default whose
        type is not registered keeps its default.

        Raises:
            ServiceNotFoundError: a parameter without a default or a value has no registered type.
            ScopeError: the provider is closed.

        .. versionadded:: 0.1
        """
        plan = self._plan_call(func)
        with self.create_scope() as scope:
            given = len(args)
            for p in plan:
                if p.name in kwargs or (p.position is not None and p.position < given):
                    continue
                key = p.key
                if key in self._entries or key is Scope or key is ServiceProvider:
                    kwargs[p.name] = scope._get(key, _call_name(func))
                elif p.default is _MISSING:
                    self._raise_uninjectable(func, p)
            return func(*args, **kwargs)

    def _plan_call(self, func: Callable[..., Any]) -> tuple[_CallParam, ...]:
        # Cached by code object: a new bound-method object is made at every attribute
        # access, and a lambda written in a loop is a new function each time, but both
        # share their code (the plan keeps only whether a default exists, not its value).
        # Other callables (partials...) are keyed by themselves; the cache is bounded.
        # A race between threads only computes a plan twice.
        # functools.wraps wrappers share one code object but not one signature: keyed by themselves.
        inner = getattr(func, "__func__", func)
        cache_key = inner if hasattr(inner, "__wrapped__") else getattr(inner, "__code__", inner)
        try:
            return self._plans[cache_key]
        except (KeyError, TypeError):
            pass
        if not callable(typing.cast("object", func)):
            msg = f"run_in_scope() needs a callable, not: {describe(func)}"
            raise TypeError(msg)
        plan = _call_plan(func, self._names)
        if len(self._plans) >= 1024:
            self._plans.clear()
        try:
            self._plans[cache_key] = plan
        except TypeError:
            pass
        return plan

    def _raise_uninjectable(self, func: Callable[..., Any], p: _CallParam) -> typing.NoReturn:
        if p.key is _MISSING:
            what = "has no type hint and no value was given"
        elif isinstance(p.key, _Unresolved):
            what = f"has the type hint {p.key.text!r}, which cannot be evaluated ({p.key.error})"
        else:
            what = f"needs {_name(p.key)}, which is not registered"
        msg = (
            f"run_in_scope({_call_name(func)}): parameter {p.name!r} {what}; register it with "
            f"services.add_scoped/add_transient/add_singleton, pass it, or give the parameter a default"
        )
        raise ServiceNotFoundError(msg)

    # -- validation ---------------------------------------------------------------

    def validate(self) -> None:
        """Check every registration's graph (``build()`` does this).

        Raises:
            CaptiveDependencyError: a singleton reaches a scoped service, directly or through a chain.
            ServiceNotFoundError: a dependency is not registered, or has no usable type hint.
            CircularDependencyError: services depend on each other in a cycle.
        """
        # Memoized depth-first walks: each (key, under-a-singleton) pair is checked
        # once, so a wide graph with shared dependencies stays linear.
        done: set[tuple[Any, bool]] = set()
        for key, entry in self._entries.items():
            self._walk(key, entry, [], 0 if entry.lifetime == "singleton" else None, done)

    def _walk(
        self, key: Any, entry: _Entry, path: list[Any], held_from: int | None, done: set[tuple[Any, bool]]
    ) -> None:
        """Check ``entry``'s dependencies; ``held_from`` is the index in ``path`` of the
        singleton that (through transients) holds what is made here, or ``None``."""
        if (key, held_from is not None) in done:
            return
        if key in path:
            cycle = " -> ".join(_name(k) for k in [*path[path.index(key) :], key])
            msg = (
                f"circular dependency: {cycle}; break the cycle (inject ServiceProvider into one side "
                f"and resolve the other later)"
            )
            raise CircularDependencyError(msg)
        path = [*path, key]
        for param in entry.params:
            dep_key = param.key
            if dep_key is ServiceProvider or dep_key is _RESOLVER:
                continue
            if dep_key is Scope:
                if held_from is not None:
                    self._raise_captive(path[held_from:], dep_key, "the current scope")
                continue
            dep = self._entries.get(dep_key)
            if dep is None:
                if dep_key is _MISSING:
                    what = "has no type hint"
                elif isinstance(dep_key, _Unresolved):
                    what = f"has the type hint {dep_key.text!r}, which cannot be evaluated ({dep_key.error})"
                else:
                    what = f"needs {_name(dep_key)}, which is not registered"
                msg = (
                    f"{entry.display} (parameter {param.name!r}) {what}; register it with "
                    f"services.add_singleton/add_scoped/add_transient, or give the parameter a default"
                )
                raise ServiceNotFoundError(msg)
            if dep.lifetime == "scoped" and held_from is not None:
                self._raise_captive(path[held_from:], dep_key, "scoped")
            if dep.lifetime == "singleton":
                dep_held: int | None = len(path)
            elif dep.lifetime == "scoped":
                dep_held = None
            else:
                dep_held = held_from  # a transient lives as long as its consumer
            self._walk(dep_key, dep, path, dep_held, done)
        done.add((key, held_from is not None))

    @staticmethod
    def _raise_captive(chain_keys: list[Any], dep_key: Any, what: str) -> typing.NoReturn:
        chain = " -> ".join(_name(k) for k in [*chain_keys, dep_key])
        holder = _name(chain_keys[0])
        msg = (
            f"captive dependency: {chain} ({what}). {holder} is a singleton and would keep one "
            f"{_name(dep_key)} forever, shared by every thread. Fix: take the scope factory (a parameter typed "
            f"ServiceProvider) in {holder} and create a scope per unit of work: "
            f"`with provider.create_scope() as scope: scope.get(...)`, or provider.run_in_scope(func)"
        )
        raise CaptiveDependencyError(msg)

    # -- disposal -----------------------------------------------------------------

    def close(self) -> None:
        """Close every singleton (and root transient) this provider created, newest first.

        A failing close is logged with its traceback and the others still close.
        Idempotent; after it, :meth:`get` and :meth:`create_scope` raise :class:`ScopeError`.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            to_close, self._to_close = self._to_close, []
        _finish_all(to_close, "singleton", None)

    @property
    def closed(self) -> bool:
        """``True`` once :meth:`close` ran."""
        return self._closed

    def registrations_for(self, key: Any) -> ServiceCollection:
        """The registrations ``key`` needs (itself and its dependencies, transitively) and the scope hooks.

        What a process-placed service's child rebuilds its own provider from
        (singletons are per process). Picklable with dill when the registered
        classes, factories and instances are.
        """
        needed: dict[Any, ServiceDescriptor] = {}
        todo = [key]
        while todo:
            k = todo.pop()
            if k in needed or k in _BUILTIN_KEYS:
                continue
            d = self.collection._descriptors.get(k)
            if d is None:
                continue
            needed[k] = d
            todo.extend(dep for _, dep in self._entries[k].deps)
        subset = ServiceCollection()
        subset._descriptors = needed
        subset._scope_hooks = list(self.collection._scope_hooks)
        return subset

    def singleton_chains(self, key: Any) -> list[tuple[str, ...]]:
        """The singletons ``key`` depends on, directly or through its graph, each with the chain to it.

        Each chain is the names from ``key`` to the singleton, shortest first:
        ``("Reporter", "Repository", "PriceCache")``. Singletons registered with
        ``per_process=True`` are left out (what they depend on is not). A
        process-placed service's child builds every one of these again; ``build()``
        warns with them.
        """
        chains: list[tuple[str, ...]] = []
        seen = {key}
        todo: collections.deque[tuple[Any, tuple[Any, ...]]] = collections.deque([(key, (key,))])
        while todo:  # breadth first, so each singleton is named by its shortest chain
            current, path = todo.popleft()
            entry = self._entries.get(current)
            if entry is None:
                continue
            for _, dep in entry.deps:
                if dep in seen or dep in _BUILTIN_KEYS or dep not in self._entries:
                    continue
                seen.add(dep)
                dep_path = (*path, dep)
                if self._entries[dep].lifetime == "singleton" and not self._descriptors[dep].per_process:
                    chains.append(tuple(_name(k) for k in dep_path))
                todo.append((dep, dep_path))
        return chains

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return (
            f"<ServiceProvider {state} registrations={len(self._entries)} singletons={len(self._singletons)} "
            f"to_close={len(self._to_close)}>"
        )


def _call_name(func: Callable[..., Any]) -> str:
    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", None)
    return name if isinstance(name, str) else repr(func)


class Scope(_Owner):
    """A unit of work: scoped services live here, and everything it made is closed at its end.

    Closing runs in reverse creation order, also when the unit of work raised;
    a failing close is logged (WARNING, with traceback) and the rest still close.
    A generator factory sees the unit of work's exception at its ``yield``,
    as with :func:`contextlib.contextmanager`. "Closed" means ``close()`` when the
    object's class has one, else ``__exit__(...)`` when it is a context manager.

    A scope belongs to one thread, as the database session it holds does: create
    one per unit of work in the thread doing the work. Scopes in different threads
    never share scoped instances.

    .. versionadded:: 0.1
    """

    # Slots: a scope is made per unit of work, and slot attributes are quicker to set and read.
    __slots__ = ("__weakref__", "_closed", "_instances", "_to_close", "provider")

    def __init__(self, provider: ServiceProvider) -> None:
        self.provider = provider
        self._instances: dict[Any, Any] = {}
        self._to_close: list[tuple[int, Any]] = []
        self._closed = False
        if provider._hooks:
            self._run_starts()

    def _run_starts(self) -> None:
        hooks = self.provider._hooks
        for i, (start, _) in enumerate(hooks):
            if start is None:
                continue
            try:
                start()
            except BaseException:
                # Undo what already started, then fail the scope's creation.
                self._closed = True
                _run_ends(hooks[:i])
                raise

    @overload
    def get(self, key: type[T]) -> T: ...
    @overload
    def get(self, key: Any) -> Any: ...
    def get(self, key: Any) -> Any:
        """Resolve ``key`` within this scope.

        Raises:
            ServiceNotFoundError: ``key`` is not registered.
            ScopeError: the scope is closed.
        """
        if self._closed:
            self._raise_closed(key)
        value = self._instances.get(key, _MISSING)
        return value if value is not _MISSING else self.provider._resolve(key, self, None)

    def _raise_closed(self, key: Any) -> typing.NoReturn:
        msg = f"this scope is closed; {_name(key)} cannot be resolved from it. Create a new scope"
        raise ScopeError(msg)

    def _get(self, key: Any, consumer: str | None) -> Any:
        if self._closed:
            self._raise_closed(key)
        return self.provider._resolve(key, self, consumer)

    def close(self) -> None:
        """Close what the scope created, newest first (idempotent)."""
        self._finish(None)

    def _finish(self, exc: BaseException | None) -> None:
        if self._closed:
            return
        self._closed = True
        to_close = self._to_close
        self._instances = {}
        if to_close:
            self._to_close = []
            _finish_all(to_close, "scoped", exc)
        if self.provider._hooks:
            _run_ends(self.provider._hooks)

    def __enter__(self) -> Scope:
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        if not self._closed:
            self._finish(exc)

    def __del__(self, _warn: Callable[..., None] = warnings.warn) -> None:
        # A scope that was never closed leaks what it made (sessions, connections):
        # say so, as files and sockets do. `_warn` is bound at definition time, since
        # module globals may already be gone when this runs at interpreter exit.
        if not self._closed and self._to_close:
            _warn(
                f"a hostkit Scope holding {len(self._to_close)} object(s) to close was never closed; "
                f"use `with provider.create_scope() as scope:`",
                ResourceWarning,
                stacklevel=1,
                source=self,
            )

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<Scope {state} instances={len(self._instances)} to_close={len(self._to_close)}>"


_BUILTIN_KEYS: frozenset[Any] = frozenset({ServiceProvider, Scope, _RESOLVER})


def _run_ends(hooks: list[tuple[Callable[[], object] | None, Callable[[], object] | None]]) -> None:
    for _, end in reversed(hooks):
        if end is None:
            continue
        try:
            end()
        except Exception:
            from loguru import logger  # only on failure: a process-placed child imports _di, not loguru

            logger.opt(exception=True).bind(service=_call_name(end)).warning(
                "Scope end hook {} failed; the others still run", _call_name(end)
            )


def _finish_all(to_close: list[tuple[int, Any]], what: str, exc: BaseException | None) -> None:
    for kind, obj in reversed(to_close):
        try:
            if kind == _GEN:
                _finish_generator(obj, exc)
            elif kind == _CLOSE:
                obj.close()
            else:
                obj.__exit__(type(exc) if exc is not None else None, exc, exc.__traceback__ if exc else None)
        except Exception:
            name = _call_name(obj) if kind == _GEN else type(obj).__qualname__
            from loguru import logger  # only on failure: a process-placed child imports _di, not loguru

            logger.opt(exception=True).bind(service=name).warning(
                "Closing the {} service {} failed; the others still close", what, name
            )


def _finish_generator(gen: Any, exc: BaseException | None) -> None:
    """Resume a generator factory after its ``yield``, like ``contextlib.contextmanager``'s exit."""
    if exc is None:
        try:
            next(gen)
        except StopIteration:
            return
        gen.close()
        msg = f"the generator factory {_call_name(gen)} yielded more than once; a factory yields exactly one value"
        raise RuntimeError(msg)
    try:
        gen.throw(exc)
    except StopIteration:
        return
    except BaseException as err:
        if err is exc:
            return  # the unit of work's own exception: its caller sees it, not us
        raise
    gen.close()
    msg = f"the generator factory {_call_name(gen)} yielded again after an exception"
    raise RuntimeError(msg)
