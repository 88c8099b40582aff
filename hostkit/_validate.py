"""The one place where durations and positive numbers are checked.

Every option that takes a duration accepts a number of seconds or a
:class:`~datetime.timedelta`, and is turned into a float here; every count that
must be at least one is checked here. The errors name the option and say what
was expected, and derive from the standard exceptions (``TypeError`` for a wrong
type, ``ValueError`` for a wrong value), so callers that catch those keep working.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, overload

if TYPE_CHECKING:
    from datetime import timedelta
    from types import ModuleType

__all__ = ["MAX_SECONDS", "describe", "positive_int", "to_seconds"]

#: The longest duration any option accepts: 365 days. A wait longer than that is a
#: mistake, not a timeout, and past about 292 years (``threading.TIMEOUT_MAX``) every
#: ``Event.wait`` raises ``OverflowError``, in the middle of a stop.
MAX_SECONDS = 365 * 24 * 3600.0


def _errors() -> ModuleType:
    """:mod:`hostkit.exceptions`, imported when an error is raised.

    Not at import: it derives from ``concurrent.futures`` and ``queue`` (about 1.3 ms
    to import), which a process-placed child, importing this module through its token,
    never needs unless a value is wrong.
    """
    from . import exceptions

    return exceptions


def describe(value: object) -> str:
    """``repr`` plus type, for error messages: ``'-1' (str)``."""
    return f"{value!r} ({type(value).__name__})"


@overload
def to_seconds(value: float | timedelta, name: str, *, allow_zero: bool = ..., allow_none: bool = ...) -> float: ...
@overload
def to_seconds(
    value: float | timedelta | None, name: str, *, allow_zero: bool = ..., allow_none: bool = ...
) -> float | None: ...
def to_seconds(
    value: float | timedelta | None, name: str, *, allow_zero: bool = True, allow_none: bool = False
) -> float | None:
    """``value`` as a float number of seconds, or a clear error naming ``name``.

    Args:
        value: a number of seconds or a timedelta.
        name: the option, as the user spells it, for the error message.
        allow_zero: ``False`` for an interval or a timeout that must be > 0 seconds.
        allow_none: ``None`` is accepted (and returned) for "no limit".

    Raises:
        ConfigurationTypeError: not a number or a timedelta (also a ``TypeError``).
        ConfigurationError: negative, zero when ``allow_zero`` is false, NaN,
            infinite or longer than :data:`MAX_SECONDS` (also a ``ValueError``).
    """
    if value is None and allow_none:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        # Imported only for a value that is no number: a process-placed child's start
        # (its token, its stop watcher) passes numbers, and need not import datetime.
        from datetime import timedelta

        if not isinstance(value, timedelta):
            msg = f"{name} must be a number of seconds or a timedelta, not: {describe(value)}"
            raise _errors().ConfigurationTypeError(msg)
        seconds = value.total_seconds()
    if math.isnan(seconds) or seconds < 0 or (seconds == 0 and not allow_zero):
        # One rule per option: an interval that must be > 0 says so for -1 as for 0.
        msg = f"{name} must be {'>=' if allow_zero else '>'} 0 seconds, not: {describe(value)}"
        raise _errors().ConfigurationError(msg)
    if seconds > MAX_SECONDS:
        msg = f"{name} must be a finite number of seconds, at most {MAX_SECONDS:.0f} (365 days), not: {describe(value)}"
        raise _errors().ConfigurationError(msg)
    return seconds


def positive_int(value: object, name: str) -> int:
    """``value`` if it is an int >= 1 (a bool is not), else a clear error naming ``name``.

    Raises:
        ConfigurationError: not an int, or below 1 (also a ``ValueError``).
    """
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        msg = f"{name} must be an int >= 1, not: {describe(value)}"
        raise _errors().ConfigurationError(msg)
    return value
