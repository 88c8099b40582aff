"""One resolver of "where the host is" for every entry point.

``hostkit run MODULE:ATTR``, the embedded hosts (Flask, Django, gunicorn) and the
Django ``hostkit_run`` command all accept the same things, and resolve them here::

    "package.module:attr" --import_target()--> object
    object: Host ------------------------------------------------> Host
            HostBuilder ------(shutdown_timeout)-- build() ------> Host
            callable() -> Host | HostBuilder --------------------> (as above)
            anything else -> ConfigurationError naming it and what is accepted
"""

from __future__ import annotations

import importlib
from typing import Any

from ._builder import HostBuilder
from ._host import Host
from ._util import close_match, describe
from .exceptions import ConfigurationError, HostkitError

__all__ = ["import_target", "resolve_host", "target_name"]


def import_target(spec: object, what: str | None = None, *, searched: str = "on sys.path") -> Any:
    """``"package.module:attr"`` -> the object; anything else is returned as is.

    Args:
        spec: the import string (or the object itself).
        what: the setting the spec came from (``settings.HOSTKIT['BUILDER']``), named in
            the error message; ``None`` for the command line, whose errors name only the spec.
        searched: where modules were looked for, for the "no module named" message.

    Raises:
        ConfigurationError: the spec is malformed, its module cannot be imported, or it
            has no such attribute (with a did-you-mean hint and what it has instead).
    """
    if not isinstance(spec, str):
        return spec
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        if what is None:
            msg = f"expected MODULE:ATTR (like 'myworker.app:create_builder'), not: {spec!r}"
        else:
            msg = f"{what} must look like 'package.module:attr', not: {spec!r}"
        raise ConfigurationError(msg)

    def failed(reason: str) -> ConfigurationError:
        return ConfigurationError(reason if what is None else f"{what}={spec!r} could not be loaded: {reason}")

    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and (module_name == err.name or module_name.startswith(err.name + ".")):
            reason = f"no module named {err.name!r} (looked {searched})"
        else:
            reason = f"importing {module_name!r} failed: {type(err).__name__}: {err}"
        raise failed(reason) from err
    except Exception as err:
        reason = f"importing {module_name!r} failed: {type(err).__name__}: {err}"
        raise failed(reason) from err
    parts = attr.split(".")
    for i, part in enumerate(parts):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            owner = f"module {module_name!r}" if i == 0 else repr(f"{module_name}:{'.'.join(parts[:i])}")
            public = sorted(n for n in dir(obj) if not n.startswith("_"))
            guess = close_match(part, dir(obj) if part.startswith("_") else public)
            hint = f"; did you mean {guess!r}? It has: " if guess is not None else "; it has: "
            reason = f"{owner} has no attribute {part!r}{hint}{', '.join(public) or 'nothing public'}"
            raise failed(reason) from None
    return obj


def target_name(target: object) -> str:
    """How an error message names ``target``: its import path when it has one."""
    module = getattr(target, "__module__", None)
    qualname = getattr(target, "__qualname__", None)
    if isinstance(module, str) and isinstance(qualname, str):
        return f"{module}:{qualname}"
    return describe(target)


def resolve_host(
    target: object,
    *,
    name: str | None = None,
    what: str | None = None,
    searched: str = "on sys.path",
    shutdown_timeout: float | None = None,
    explain_failures: bool = False,
) -> Host:
    """The :class:`~hostkit.Host` that ``target`` gives (see the module docstring for what it may be).

    Args:
        target: a Host, a HostBuilder, a callable returning either, or a
            ``"package.module:attr"`` string naming one.
        name: how messages name the target (default: :func:`target_name`).
        what: the setting a string target came from, for import errors (see :func:`import_target`).
        searched: where modules were looked for (see :func:`import_target`).
        shutdown_timeout: set on the builder before ``build()`` and on the host.
        explain_failures: wrap an exception raised by the factory or by ``build()`` in a
            :class:`~hostkit.exceptions.ConfigurationError` that says which step failed
            (the CLI reports it as one line); otherwise it propagates unchanged.

    Raises:
        ConfigurationError: ``target`` gives no Host, naming what it gave.
    """
    value = import_target(target, what, searched=searched)
    label = name if name is not None else (target if isinstance(target, str) else target_name(value))
    # A class is called only if it makes builders: `hostkit run app:SomeService` must say
    # that a service class is no host, not construct one and complain about the instance.
    is_factory = callable(value) and (not isinstance(value, type) or issubclass(value, HostBuilder))
    if not isinstance(value, (Host, HostBuilder)) and is_factory:
        try:
            value = value()
        except Exception as err:
            if not explain_failures:
                raise
            msg = f"calling {label}() failed: {type(err).__name__}: {err}"
            raise ConfigurationError(msg) from err
        if not isinstance(value, (Host, HostBuilder)):
            msg = f"{label}() returned {describe(value)}; it must return a hostkit.Host or a hostkit.HostBuilder"
            raise ConfigurationError(msg)
    if isinstance(value, HostBuilder):
        try:
            if shutdown_timeout is not None:
                value.configure_options(shutdown_timeout=shutdown_timeout)
            value = value.build()
        except HostkitError as err:
            if not explain_failures:
                raise
            msg = f"building the host from {label} failed: {err}"
            raise ConfigurationError(msg) from err
    if not isinstance(value, Host):
        msg = f"{label} is {describe(value)}, not a hostkit.Host, a hostkit.HostBuilder, or a callable returning one"
        raise ConfigurationError(msg)
    if shutdown_timeout is not None:
        value.options.shutdown_timeout = shutdown_timeout
    return value
