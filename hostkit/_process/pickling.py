"""What crosses to a child pickled: dill, plus hostkit's rules for loggers and locks.

- A loguru logger crosses as the *child's* own logger, with the options (bound
  extras, patchers) it had: pickled by value it would drag the host's sinks (open
  files, pytest's capture) along, and fail.
- A ``threading.Lock``/``RLock`` (also inside an ``Event``, a ``Condition``, a
  ``queue.Queue``) is refused, as a socket is: dill would send a fresh, unlocked
  copy that guards nothing the host holds.

The rules live in this module's own dispatch table; dill's global one is left alone.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Iterable
from typing import Any

import dill
from loguru import logger

from ..exceptions import ServicePicklingError

__all__ = ["dumps", "pickled_copy", "pickling_error", "restore_logger"]


def restore_logger(options: tuple[Any, ...]) -> Any:
    """The child's own loguru logger, with the options (bound extras, patchers) it was pickled with.

    loguru offers no public way to rebuild a logger from its options: its class is
    called with the core of this process's logger, as ``logger.bind`` does.
    """
    logger_type: Any = type(logger)
    return logger_type(getattr(logger, "_core"), *options)  # noqa: B009 - loguru's own state, on purpose


def _save_logger(pickler: Any, obj: Any) -> None:
    pickler.save_reduce(restore_logger, (getattr(obj, "_options"),), obj=obj)  # noqa: B009 - see restore_logger


def _refuse_lock(pickler: Any, obj: Any) -> None:
    # dill would send a fresh, unlocked lock: the child's copy guards nothing the parent
    # (or another child) holds, so code that relies on it is silently unsynchronised.
    kind = type(obj)
    msg = (
        f"cannot pickle '{kind.__module__}.{kind.__qualname__}' object "
        f"(a copy in the child would not be shared with this process)"
    )
    raise TypeError(msg)


class _Pickler(dill.Pickler):  # type: ignore[misc]
    """dill with the logger and lock rules in its own dispatch table."""

    dispatch = dill.Pickler.dispatch.copy()
    dispatch[type(logger)] = _save_logger
    dispatch[type(threading.Lock())] = _refuse_lock
    dispatch[type(threading.RLock())] = _refuse_lock


def dumps(obj: object) -> bytes:
    """dill with ``recurse=True`` (a function's globals are pickled by what it uses) and hostkit's rules."""
    buffer = io.BytesIO()
    _Pickler(buffer, recurse=True).dump(obj)
    return buffer.getvalue()


def _key_name(key: Any) -> str:
    display = getattr(key, "display_name", None)
    if isinstance(display, str):
        return display
    name = getattr(key, "__qualname__", None) or getattr(key, "__name__", None)
    return name if isinstance(name, str) else repr(key)


def pickling_error(
    service: str, *, attributes: dict[str, Any] | None = None, dependencies: Iterable[Any] = (), err: Exception
) -> ServicePicklingError:
    """Name the first attribute of the service, or registration it depends on, that dill cannot pickle.

    ``attributes`` is the service object's state (a service registered as an
    instance); ``dependencies`` are the registrations (``ServiceDescriptor``) sent
    for a service the child builds itself.
    """
    head = f"process-placed service {service!r} cannot be sent to its child process"
    for descriptor in dependencies:
        try:
            dumps(descriptor)
        except Exception as inner:
            msg = (
                f"{head}: its dependency {_key_name(descriptor.key)} (a {descriptor.lifetime} registration) cannot "
                f"be pickled, even with dill: {inner}. Register it by class or factory= instead of instance=, so "
                f"the child builds its own"
            )
            return ServicePicklingError(msg)
    for attr, value in (attributes or {}).items():
        try:
            dumps(value)
        except Exception as inner:
            msg = (
                f"{head}: its attribute {attr!r} ({type(value).__name__}) cannot be pickled, even with dill: "
                f"{inner}. Create it inside execute() (it then lives in the child), or register the class so "
                f"the child builds it"
            )
            return ServicePicklingError(msg)
    return ServicePicklingError(f"{head}, even with dill: {err}")


def pickled_copy(service: Any, name: str) -> Any:
    """A copy of ``service`` made as its child would get it (dill, hostkit's rules, ``__getstate__``).

    Raises:
        ServicePicklingError: it cannot be pickled; names the attribute that cannot.
    """
    try:
        blob = dumps(service)
    except Exception as err:
        raise pickling_error(name, attributes=service.__getstate__(), err=err) from err
    return dill.loads(blob)
