"""Resolution: the provider (root, singletons) and its scopes (scoped services, units of work).

:class:`ServiceProvider` compiles each registration into a :class:`Recipe` (its
injection plan, computed once), validates the graph, and resolves keys;
:class:`Scope` holds the scoped instances of one unit of work. The two share
their state on the resolution hot path (a scope's instance dict, an owner's list
of objects to finish), which is why they live in one module.
"""

from __future__ import annotations

import collections
import dataclasses
import inspect
import threading
import typing
import warnings
from collections.abc import Callable
from typing import Any, TypeVar, overload

from .._util import describe
from ..exceptions import ScopeError, ServiceNotFoundError
from .collection import ServiceCollection, ServiceDescriptor, collection_of
from .disposal import GENERATOR, KIND_BY_TYPE, disposal_kind, finish_all, run_end_hooks
from .plans import (
    MISSING,
    RESOLVER,
    CallArgument,
    InjectedParam,
    UnresolvedHint,
    callable_name,
    display_name,
    plan_call_arguments,
    plan_injections,
)
from .validation import check_graph

__all__ = ["Recipe", "Scope", "ServiceProvider"]

T = TypeVar("T")
R = TypeVar("R")


class Recipe:
    """A registration compiled for resolution: what to call, and with which dependencies."""

    __slots__ = ("deps", "display", "instance", "is_generator", "key", "lifetime", "params", "target")

    def __init__(self, d: ServiceDescriptor, params: tuple[InjectedParam, ...]) -> None:
        self.key = d.key
        self.lifetime = d.lifetime
        self.instance = d.instance
        self.target: Callable[..., Any] | None = d.factory if d.factory is not None else d.implementation
        self.is_generator = d.factory is not None and inspect.isgeneratorfunction(d.factory)
        self.params = params
        self.deps = tuple((p.name, p.key) for p in params)
        self.display = d.display


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
            collection = collection_of(collection)
        #: The registrations this provider was built from (picklable with dill when they are).
        self.collection = collection
        descriptors = {d.key: d for d in collection}
        # Registered classes by name: the local namespace string annotations are evaluated in.
        registered_names: dict[str, Any] = {}
        for key in [*descriptors, ServiceProvider, Scope]:
            if isinstance(key, type):
                # A name two registered classes share is left out: the hint would be ambiguous.
                registered_names[key.__name__] = key if key.__name__ not in registered_names else MISSING
        registered_names = {n: k for n, k in registered_names.items() if k is not MISSING}

        def registered(k: Any) -> bool:
            return k in descriptors or k is ServiceProvider or k is Scope

        self._recipes: dict[Any, Recipe] = {}
        self._descriptors: dict[Any, ServiceDescriptor] = {}
        for key, d in descriptors.items():
            target = d.factory if d.factory is not None else d.implementation
            params = (
                plan_injections(target, registered, registered_names)
                if target is not None and d.instance is MISSING
                else ()
            )
            self._recipes[key] = Recipe(d, params)
            self._descriptors[key] = dataclasses.replace(d, params=params)
        self._registered_names = registered_names
        self._hooks = list(collection.scope_hooks)
        self._singletons: dict[Any, Any] = {}
        self._to_close = []
        # One re-entrant lock for singleton creation: re-entrant because making a
        # singleton resolves its singleton dependencies on the same thread.
        self._lock = threading.RLock()
        self._closed = False
        self._call_plans: dict[Any, tuple[CallArgument, ...]] = {}
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
        entry = self._recipes.get(key)
        if entry is None:
            return self._special(key, scope, consumer)
        lifetime = entry.lifetime
        if lifetime == "scoped":
            if scope is None:
                self._raise_scoped_at_root(entry, consumer)
            value = scope._instances.get(key, MISSING)
            if value is MISSING:
                # No lock: a scope belongs to one thread (as the session it holds does).
                value = self._make(entry, scope, scope)
                scope._instances[key] = value
            return value
        if lifetime == "singleton":
            value = self._singletons.get(key, MISSING)
            return value if value is not MISSING else self._make_singleton(entry)
        return self._make(entry, scope, scope if scope is not None else self)

    def _make(self, entry: Recipe, scope: Scope | None, owner: _Owner) -> Any:
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
        if entry.is_generator:
            generator = value
            value = next(generator)
            owner._to_close.append((GENERATOR, generator))
        else:
            kind = KIND_BY_TYPE.get(type(value))
            if kind is None:
                kind = disposal_kind(type(value))
            if kind:
                # list.append is atomic under the GIL: concurrent resolutions at the
                # root never lose an entry.
                owner._to_close.append((kind, value))
        return value

    def _make_singleton(self, entry: Recipe) -> Any:
        with self._lock:
            # Checked again under the lock: another thread may have made it while
            # this one waited, and a singleton is made exactly once.
            value = self._singletons.get(entry.key, MISSING)
            if value is not MISSING:
                return value
            if self._closed:
                self._raise_closed(entry.key)
            value = entry.instance if entry.instance is not MISSING else self._make(entry, None, self)
            self._singletons[entry.key] = value
            return value

    def _special(self, key: Any, scope: Scope | None, consumer: str | None) -> Any:
        if key is ServiceProvider:
            return self
        if key is RESOLVER:
            return scope if scope is not None else self
        if key is Scope:
            if scope is None:
                msg = (
                    f"{consumer or 'the caller'} asked for the current Scope outside any scope; "
                    f"create one with provider.create_scope()"
                )
                raise ScopeError(msg)
            return scope
        needed = f"{consumer} needs {display_name(key)}" if consumer else f"{display_name(key)} was requested"
        msg = f"{needed}, but it is not registered; register it with services.add_singleton/add_scoped/add_transient"
        raise ServiceNotFoundError(msg)

    def _raise_scoped_at_root(self, entry: Recipe, consumer: str | None) -> typing.NoReturn:
        needed = f" (needed by {consumer})" if consumer else ""
        msg = (
            f"{entry.display} is scoped and cannot be resolved from the root provider{needed}; resolve it inside "
            f"`with provider.create_scope() as scope: scope.get({entry.display})`"
        )
        raise ScopeError(msg)

    def _raise_closed(self, key: Any) -> typing.NoReturn:
        msg = f"this provider is closed (its host stopped); {display_name(key)} cannot be resolved. Build a new host"
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
        plan = self._call_plan_for(func)
        with self.create_scope() as scope:
            given = len(args)
            for p in plan:
                if p.name in kwargs or (p.position is not None and p.position < given):
                    continue
                key = p.key
                if key in self._recipes or key is Scope or key is ServiceProvider:
                    kwargs[p.name] = scope._get(key, callable_name(func))
                elif p.default is MISSING:
                    self._raise_uninjectable(func, p)
            return func(*args, **kwargs)

    def _call_plan_for(self, func: Callable[..., Any]) -> tuple[CallArgument, ...]:
        # Cached by code object: a new bound-method object is made at every attribute
        # access, and a lambda written in a loop is a new function each time, but both
        # share their code (the plan keeps only whether a default exists, not its value).
        # Other callables (partials...) are keyed by themselves; the cache is bounded.
        # A race between threads only computes a plan twice.
        # functools.wraps wrappers share one code object but not one signature: keyed by themselves.
        inner = getattr(func, "__func__", func)
        cache_key = inner if hasattr(inner, "__wrapped__") else getattr(inner, "__code__", inner)
        try:
            return self._call_plans[cache_key]
        except (KeyError, TypeError):
            pass
        if not callable(typing.cast("object", func)):
            msg = f"run_in_scope() needs a callable, not: {describe(func)}"
            raise TypeError(msg)
        plan = plan_call_arguments(func, self._registered_names)
        if len(self._call_plans) >= 1024:
            self._call_plans.clear()
        try:
            self._call_plans[cache_key] = plan
        except TypeError:
            pass
        return plan

    def _raise_uninjectable(self, func: Callable[..., Any], p: CallArgument) -> typing.NoReturn:
        if p.key is MISSING:
            what = "has no type hint and no value was given"
        elif isinstance(p.key, UnresolvedHint):
            what = f"has the type hint {p.key.text!r}, which cannot be evaluated ({p.key.error})"
        else:
            what = f"needs {display_name(p.key)}, which is not registered"
        msg = (
            f"run_in_scope({callable_name(func)}): parameter {p.name!r} {what}; register it with "
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
        check_graph(self._recipes, always_resolvable=(ServiceProvider, RESOLVER), scope_key=Scope)

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
        finish_all(to_close, "singleton", None)

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
        needed: dict[Any, None] = {}  # insertion-ordered set
        todo = [key]
        while todo:
            k = todo.pop()
            if k in needed or k in BUILTIN_KEYS:
                continue
            if k not in self._recipes:
                continue
            needed[k] = None
            todo.extend(dep for _, dep in self._recipes[k].deps)
        return self.collection.copy(only=needed)

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
            entry = self._recipes.get(current)
            if entry is None:
                continue
            for _, dep in entry.deps:
                if dep in seen or dep in BUILTIN_KEYS or dep not in self._recipes:
                    continue
                seen.add(dep)
                dep_path = (*path, dep)
                if self._recipes[dep].lifetime == "singleton" and not self._descriptors[dep].per_process:
                    chains.append(tuple(display_name(k) for k in dep_path))
                todo.append((dep, dep_path))
        return chains

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return (
            f"<ServiceProvider {state} registrations={len(self._recipes)} singletons={len(self._singletons)} "
            f"to_close={len(self._to_close)}>"
        )


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
                run_end_hooks(hooks[:i])
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
        value = self._instances.get(key, MISSING)
        return value if value is not MISSING else self.provider._resolve(key, self, None)

    def _raise_closed(self, key: Any) -> typing.NoReturn:
        msg = f"this scope is closed; {display_name(key)} cannot be resolved from it. Create a new scope"
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
            finish_all(to_close, "scoped", exc)
        if self.provider._hooks:
            run_end_hooks(self.provider._hooks)

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


#: Keys the provider answers itself; never registrations.
BUILTIN_KEYS: frozenset[Any] = frozenset({ServiceProvider, Scope, RESOLVER})
