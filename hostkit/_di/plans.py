"""Injection plans: read a callable's type hints into the list of what to pass it.

Two plans, for two callers:

* :func:`plan_injections` for a registered class or factory: only the
  parameters the container fills (a parameter with a default whose type is not
  registered keeps its default). Computed once per registration, at build.
* :func:`plan_call_arguments` for :meth:`ServiceProvider.run_in_scope`: every
  named parameter with its position, because the caller may pass some of them.

Also here: the markers a plan uses (:data:`MISSING`, :data:`RESOLVER`,
:class:`UnresolvedHint`) and how keys and callables are named in messages.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "MISSING",
    "RESOLVER",
    "CallArgument",
    "InjectedParam",
    "Marker",
    "UnresolvedHint",
    "callable_name",
    "display_name",
    "evaluate_hints",
    "plan_call_arguments",
    "plan_injections",
    "strip_optional",
]


class Marker:
    """A named "no value" marker. It pickles *by name*, so that after a dill round trip
    (a process-placed service's child rebuilds the container) ``x is MISSING``
    still holds; a bare ``object()`` would come back as a different object."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return f"<{self._name.strip('_').lower()}>"

    def __reduce__(self) -> str:
        return self._name


#: No value: no default, no type hint, no instance.
MISSING: Any = Marker("MISSING")
#: The key of a factory's untyped single parameter: it receives the resolver
#: (the current scope, or the provider).
RESOLVER: Any = Marker("RESOLVER")


@dataclass(frozen=True)
class UnresolvedHint:
    """A type hint that could not be evaluated (kept to report it at build time)."""

    text: str
    error: str


@dataclass(frozen=True)
class InjectedParam:
    """One parameter the container fills when it makes a registered service."""

    name: str
    key: Any
    default: Any


@dataclass(frozen=True)
class CallArgument:
    """One named parameter of a function given to ``run_in_scope``."""

    name: str
    key: Any
    default: Any
    position: int | None  # index among the positional parameters, None if keyword-only


def display_name(key: Any) -> str:
    """A registration key's name, as error messages and logs show it."""
    display = getattr(key, "display_name", None)
    if isinstance(display, str):
        return display
    if isinstance(key, UnresolvedHint):
        return repr(key.text)
    if key is MISSING:
        return "<no type hint>"
    name = getattr(key, "__qualname__", None) or getattr(key, "__name__", None)
    return name if isinstance(name, str) else repr(key)


def callable_name(func: Any) -> str:
    """A function's (or generator's) name, as error messages and logs show it."""
    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", None)
    return name if isinstance(name, str) else repr(func)


def strip_optional(key: Any) -> Any:
    """``X | None`` and ``Optional[X]`` -> ``X``; anything else unchanged."""
    if typing.get_origin(key) in (typing.Union, getattr(types, "UnionType", None)):
        args = [a for a in typing.get_args(key) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return key


def evaluate_hints(func: Callable[..., Any], registered_names: dict[str, Any]) -> dict[str, Any]:
    """Evaluate ``func``'s parameter annotations.

    ``registered_names`` (registered classes by name) is passed as the local
    namespace, so a class defined inside a function, and named in a string
    annotation (``from __future__ import annotations``), still resolves when it
    is registered. An annotation that cannot be evaluated comes back as
    :class:`UnresolvedHint`.
    """
    try:
        return typing.get_type_hints(func, localns=registered_names)
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
            # An annotation, evaluated as typing does.
            hints[pname] = eval(ann, dict(globalns), dict(registered_names))
        except Exception as err:  # reported by validation, naming the parameter
            hints[pname] = UnresolvedHint(ann, f"{type(err).__name__}: {err}")
    return hints


def plan_injections(
    target: Callable[..., Any], registered: Callable[[Any], bool], registered_names: dict[str, Any]
) -> tuple[InjectedParam, ...]:
    """The parameters to inject into ``target`` (a class or a factory), from its type hints.

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
    hints = evaluate_hints(func, registered_names)
    items = [p for p in signature.parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if is_class and items and items[0].kind in (items[0].POSITIONAL_ONLY, items[0].POSITIONAL_OR_KEYWORD):
        items = items[1:]  # self
    if not is_class and len(items) == 1 and items[0].name not in hints and items[0].default is items[0].empty:
        return (InjectedParam(items[0].name, RESOLVER, MISSING),)
    params = []
    for param in items:
        key = strip_optional(hints.get(param.name, MISSING))
        default = param.default if param.default is not param.empty else MISSING
        if default is not MISSING and (key is MISSING or isinstance(key, UnresolvedHint) or not registered(key)):
            continue  # optional and not registered: the default stays
        params.append(InjectedParam(param.name, key, default))
    return tuple(params)


def plan_call_arguments(func: Callable[..., Any], registered_names: dict[str, Any]) -> tuple[CallArgument, ...]:
    """Every named parameter of ``func`` (bound methods without ``self``), for ``run_in_scope``."""
    signature = inspect.signature(func)
    hints = evaluate_hints(func, registered_names)
    plan = []
    position = 0
    for param in signature.parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        pos: int | None = None
        if param.kind in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD):
            pos = position
            position += 1
        key = strip_optional(hints.get(param.name, MISSING))
        default = param.default if param.default is not param.empty else MISSING
        plan.append(CallArgument(param.name, key, default, pos))
    return tuple(plan)
