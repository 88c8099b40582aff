"""The service collection: registrations in, validated as they are added.

A :class:`ServiceCollection` records what each key is made from (a class, a
factory, an instance) and for how long it lives; it knows nothing about hosting
(hosted services are registered on the host's own subclass,
``hostkit._hosting.HostServiceCollection``). :meth:`ServiceCollection.build_provider`
hands the registrations to the provider, which plans and validates them.
"""

from __future__ import annotations

import typing
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from .._util import describe
from ..exceptions import InvalidServiceError
from .plans import MISSING, InjectedParam, display_name

if TYPE_CHECKING:
    from .provider import ServiceProvider

__all__ = ["LIFETIMES", "Lifetime", "ScopeHook", "ServiceCollection", "ServiceDescriptor", "collection_of"]

Lifetime = Literal["singleton", "scoped", "transient"]
LIFETIMES: tuple[Lifetime, ...] = ("singleton", "scoped", "transient")
#: One ``add_scope_hooks`` call: (on_start, on_end).
ScopeHook = tuple[Callable[[], object] | None, Callable[[], object] | None]
_C = TypeVar("_C", bound="ServiceCollection")


@dataclass
class ServiceDescriptor:
    """One registration: what is asked for (``key``), for how long, and how it is made.

    .. versionadded:: 0.1
    """

    key: Any
    lifetime: Lifetime
    implementation: type | None = None
    factory: Callable[..., Any] | None = None
    instance: Any = MISSING
    #: The injection plan, filled in by the provider (empty in a collection).
    params: tuple[InjectedParam, ...] = ()
    #: A singleton meant to exist once per process: a process-placed service that
    #: depends on it gets its own in its child, and ``build()`` does not warn about it.
    per_process: bool = False

    @property
    def display(self) -> str:
        """The key's name, as error messages and logs show it."""
        return display_name(self.key)


class ServiceCollection:
    """Registrations: what each key is made from, and for how long it lives.

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
        self._scope_hooks: list[ScopeHook] = []

    if not TYPE_CHECKING:  # type checkers flag these names themselves

        def __getattr__(self, name: str) -> typing.NoReturn:
            # Hosted services were registered here before the container became generic:
            # say where they went rather than a bare AttributeError.
            if name in ("add_hosted_service", "hosted"):
                msg = (
                    f"{type(self).__name__} has no {name!r}: hosted services are registered on the host's "
                    f"collection, HostBuilder().services (a hostkit.HostServiceCollection); use that, or "
                    f"make a hostkit.HostServiceCollection() instead of a ServiceCollection()"
                )
            else:
                msg = f"{type(self).__name__!r} object has no attribute {name!r}"
            raise AttributeError(msg, name=name, obj=self)

    def __contains__(self, key: object) -> bool:
        return key in self._descriptors

    def __len__(self) -> int:
        return len(self._descriptors)

    def __iter__(self) -> Iterator[ServiceDescriptor]:
        return iter(list(self._descriptors.values()))

    def __repr__(self) -> str:
        counts = {lt: 0 for lt in LIFETIMES}
        for d in self._descriptors.values():
            counts[d.lifetime] += 1
        return (
            f"<{type(self).__name__} singleton={counts['singleton']} scoped={counts['scoped']} "
            f"transient={counts['transient']}>"
        )

    @typing.overload
    def copy(self: _C) -> _C: ...
    @typing.overload
    def copy(self, *, only: Iterable[Any]) -> ServiceCollection: ...
    def copy(self, *, only: Iterable[Any] | None = None) -> ServiceCollection:
        """A new collection with the same registrations (the registered objects are shared).

        Args:
            only: keep just these keys' registrations (keys not registered are
                skipped) and the scope hooks, in a plain :class:`ServiceCollection`:
                what a process-placed service's child rebuilds its own provider from.

        .. versionchanged:: 0.2
            ``only=``.
        """
        if only is None:
            new = type(self)()
            new._descriptors = dict(self._descriptors)
        else:
            new = ServiceCollection()
            new._descriptors = {k: self._descriptors[k] for k in only if k in self._descriptors}
        new._scope_hooks = list(self._scope_hooks)
        return new

    def remove(self, key: Any) -> ServiceDescriptor | None:
        """Remove ``key``'s registration; returns it, or ``None`` if there was none.

        .. versionadded:: 0.2
        """
        return self._descriptors.pop(key, None)

    @property
    def scope_hooks(self) -> tuple[ScopeHook, ...]:
        """The ``(on_start, on_end)`` pairs given to :meth:`add_scope_hooks`, in order.

        .. versionadded:: 0.2
        """
        return tuple(self._scope_hooks)

    def add_singleton(
        self: _C,
        key: Any,
        implementation: type | None = None,
        *,
        factory: Callable[..., Any] | None = None,
        instance: Any = MISSING,
        per_process: bool = False,
    ) -> _C:
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
            msg = (
                f"add_singleton({display_name(key)}, per_process=...) must be True or False, "
                f"not: {describe(per_process)}"
            )
            raise InvalidServiceError(msg)
        return self._add("singleton", key, implementation, factory, instance, per_process=per_process)

    def add_scoped(
        self: _C, key: Any, implementation: type | None = None, *, factory: Callable[..., Any] | None = None
    ) -> _C:
        """Register one instance per scope, closed when the scope ends.

        Raises:
            InvalidServiceError: both or neither of ``implementation`` and ``factory``, or a wrong kind.
        """
        return self._add("scoped", key, implementation, factory, MISSING)

    def add_transient(
        self: _C, key: Any, implementation: type | None = None, *, factory: Callable[..., Any] | None = None
    ) -> _C:
        """Register a new instance for every resolution, closed with the scope (or provider) that made it.

        Raises:
            InvalidServiceError: both or neither of ``implementation`` and ``factory``, or a wrong kind.
        """
        return self._add("transient", key, implementation, factory, MISSING)

    def add_scope_hooks(
        self: _C, *, on_start: Callable[[], object] | None = None, on_end: Callable[[], object] | None = None
    ) -> _C:
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
        self: _C,
        lifetime: Lifetime,
        key: Any,
        implementation: type | None,
        factory: Callable[..., Any] | None,
        instance: Any,
        *,
        per_process: bool = False,
    ) -> _C:
        given = sum(x is not None for x in (implementation, factory)) + (instance is not MISSING)
        if given > 1:
            msg = (
                f"add_{lifetime}({display_name(key)}): give one of an implementation class, factory= or instance=, "
                f"not several"
            )
            raise InvalidServiceError(msg)
        # Imported here: the provider module builds on this one.
        from .provider import Scope, ServiceProvider

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
                    f"add_{lifetime}({display_name(key)}, ...): the implementation must be a class, "
                    f"not: {describe(implementation)}; pass a callable as factory= instead"
                )
                raise InvalidServiceError(msg)
            if isinstance(key, type) and not _is_subclass(implementation, key):
                msg = (
                    f"add_{lifetime}({display_name(key)}, {display_name(implementation)}): "
                    f"{display_name(implementation)} is not a "
                    f"subclass of {display_name(key)}; register it under its own type, or use factory="
                )
                raise InvalidServiceError(msg)
        if factory is not None and not callable(typing.cast("object", factory)):
            msg = (
                f"add_{lifetime}({display_name(key)}, factory=...): factory must be callable, not: {describe(factory)}"
            )
            raise InvalidServiceError(msg)
        if instance is not MISSING and isinstance(key, type) and not _is_instance(instance, key):
            msg = (
                f"add_singleton({display_name(key)}, instance=...): the instance is not a {display_name(key)}: "
                f"{describe(instance)}"
            )
            raise InvalidServiceError(msg)
        self._descriptors[key] = ServiceDescriptor(
            key, lifetime, implementation, factory, instance, per_process=per_process
        )
        return self

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
        from .provider import ServiceProvider  # the provider module builds on this one

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


def collection_of(descriptors: Mapping[Any, ServiceDescriptor]) -> ServiceCollection:
    """A collection holding exactly these registrations (no scope hooks)."""
    collection = ServiceCollection()
    collection._descriptors = dict(descriptors)
    return collection
