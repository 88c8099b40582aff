"""Build-time validation: walk every registration's dependency graph once, at ``build()``.

Three mistakes are refused before anything runs, each naming the chain and the fix:
a dependency that is not registered (or has no usable type hint), a cycle, and a
captive dependency (a singleton that reaches a scoped service, or the current
scope, through any chain of transients and singletons).
"""

from __future__ import annotations

import typing
from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Any

from ..exceptions import CaptiveDependencyError, CircularDependencyError, ServiceNotFoundError
from .plans import MISSING, UnresolvedHint, display_name

if TYPE_CHECKING:
    from .provider import Recipe

__all__ = ["check_graph"]


def check_graph(recipes: Mapping[Any, Recipe], *, always_resolvable: Collection[Any], scope_key: Any) -> None:
    """Check every recipe's dependencies.

    Args:
        recipes: the compiled registrations, by key.
        always_resolvable: keys the provider answers itself (the provider, the resolver).
        scope_key: the key of "the current scope", which a singleton must not reach.

    Raises:
        CaptiveDependencyError: a singleton reaches a scoped service, directly or through a chain.
        ServiceNotFoundError: a dependency is not registered, or has no usable type hint.
        CircularDependencyError: services depend on each other in a cycle.
    """
    walk = _GraphWalk(recipes, always_resolvable, scope_key)
    for key, recipe in recipes.items():
        walk.visit(key, recipe, [], 0 if recipe.lifetime == "singleton" else None)


class _GraphWalk:
    """Memoized depth-first walks: each (key, under-a-singleton) pair is checked
    once, so a wide graph with shared dependencies stays linear."""

    def __init__(self, recipes: Mapping[Any, Recipe], always_resolvable: Collection[Any], scope_key: Any) -> None:
        self.recipes = recipes
        self.always_resolvable = always_resolvable
        self.scope_key = scope_key
        self.done: set[tuple[Any, bool]] = set()

    def visit(self, key: Any, recipe: Recipe, path: list[Any], held_from: int | None) -> None:
        """Check ``recipe``'s dependencies; ``held_from`` is the index in ``path`` of the
        singleton that (through transients) holds what is made here, or ``None``."""
        if (key, held_from is not None) in self.done:
            return
        if key in path:
            cycle = " -> ".join(display_name(k) for k in [*path[path.index(key) :], key])
            msg = (
                f"circular dependency: {cycle}; break the cycle (inject ServiceProvider into one side "
                f"and resolve the other later)"
            )
            raise CircularDependencyError(msg)
        path = [*path, key]
        for param in recipe.params:
            dep_key = param.key
            if any(dep_key is k for k in self.always_resolvable):
                continue
            if dep_key is self.scope_key:
                if held_from is not None:
                    _raise_captive(path[held_from:], dep_key, "the current scope")
                continue
            dep = self.recipes.get(dep_key)
            if dep is None:
                _raise_missing(recipe.display, param.name, dep_key)
            if dep.lifetime == "scoped" and held_from is not None:
                _raise_captive(path[held_from:], dep_key, "scoped")
            if dep.lifetime == "singleton":
                dep_held: int | None = len(path)
            elif dep.lifetime == "scoped":
                dep_held = None
            else:
                dep_held = held_from  # a transient lives as long as its consumer
            self.visit(dep_key, dep, path, dep_held)
        self.done.add((key, held_from is not None))


def _raise_missing(consumer: str, param_name: str, dep_key: Any) -> typing.NoReturn:
    if dep_key is MISSING:
        what = "has no type hint"
    elif isinstance(dep_key, UnresolvedHint):
        what = f"has the type hint {dep_key.text!r}, which cannot be evaluated ({dep_key.error})"
    else:
        what = f"needs {display_name(dep_key)}, which is not registered"
    msg = (
        f"{consumer} (parameter {param_name!r}) {what}; register it with "
        f"services.add_singleton/add_scoped/add_transient, or give the parameter a default"
    )
    raise ServiceNotFoundError(msg)


def _raise_captive(chain_keys: list[Any], dep_key: Any, what: str) -> typing.NoReturn:
    chain = " -> ".join(display_name(k) for k in [*chain_keys, dep_key])
    holder = display_name(chain_keys[0])
    msg = (
        f"captive dependency: {chain} ({what}). {holder} is a singleton and would keep one "
        f"{display_name(dep_key)} forever, shared by every thread. Fix: take the scope factory (a parameter typed "
        f"ServiceProvider) in {holder} and create a scope per unit of work: "
        f"`with provider.create_scope() as scope: scope.get(...)`, or provider.run_in_scope(func)"
    )
    raise CaptiveDependencyError(msg)
