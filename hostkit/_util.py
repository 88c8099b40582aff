"""Small helpers shared by several modules."""

from __future__ import annotations

import gc
import math
import sys
import threading
import traceback
from collections.abc import Iterable
from datetime import timedelta

__all__ = ["MAX_SECONDS", "close_match", "describe", "thread_stack", "to_seconds"]

#: The longest duration any option accepts: 365 days. A wait longer than that is a
#: mistake, not a timeout, and past about 292 years (``threading.TIMEOUT_MAX``) every
#: ``Event.wait`` raises ``OverflowError``, in the middle of a stop.
MAX_SECONDS = 365 * 24 * 3600.0


def describe(value: object) -> str:
    """``repr`` plus type, for error messages: ``'-1' (str)``."""
    return f"{value!r} ({type(value).__name__})"


def to_seconds(value: float | timedelta, what: str, *, allow_none: bool = False) -> float:
    """Turn a duration into seconds, rejecting negatives, NaN, infinity, absurd lengths and wrong types.

    Raises:
        TypeError: ``value`` is not a number or a timedelta.
        ValueError: ``value`` is negative, NaN, infinite or longer than :data:`MAX_SECONDS`.
    """
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        msg = f"{what} must be a number of seconds or a timedelta, not: {describe(value)}"
        raise TypeError(msg)
    if math.isnan(seconds) or seconds < 0:
        msg = f"{what} must be >= 0 seconds, not: {describe(value)}"
        raise ValueError(msg)
    if seconds > MAX_SECONDS:
        msg = f"{what} must be a finite number of seconds, at most {MAX_SECONDS:.0f} (365 days), not: {describe(value)}"
        raise ValueError(msg)
    return seconds


def thread_stack(thread: threading.Thread | None) -> str:
    """The current stack of a live thread, most recent call last, or a note why not."""
    if thread is None or thread.ident is None:
        return "  (thread not started)\n"
    # No garbage collection while the interpreter lists its threads: on Python 3.11 it holds
    # its thread-list lock while it builds the answer, and a collection that frees a
    # threading.local there waits for that same lock, forever (seen as a hang of a host's
    # stop that was naming a hung hook). Later versions pause collection themselves.
    paused = gc.isenabled()
    gc.disable()
    try:
        frame = sys._current_frames().get(thread.ident)
    finally:
        if paused:
            gc.enable()
    if frame is None:
        return "  (thread has ended)\n"
    stack = traceback.extract_stack(frame)
    # Drop threading's own bootstrap frames (_bootstrap, _bootstrap_inner, run): they are
    # the same for every thread and push the frames that matter out of view.
    while len(stack) > 1 and stack[0].filename == threading.__file__:
        del stack[0]
    return "".join(traceback.format_list(stack))


def pid_alive(pid: int) -> bool:
    """``True`` if process ``pid`` exists and is not a zombie (one we may not inspect counts as alive)."""
    import psutil  # imported here: _util is on the child's start-up path, which does not need psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def close_match(name: str, candidates: Iterable[str]) -> str | None:
    """The candidate that stands out as the likely intended spelling of ``name`` (for "did you mean"), or ``None``.

    A candidate that differs only in case wins; otherwise the closest one by
    ``difflib``'s ratio, if it is close (>= 0.75) and clearly closer than the next
    (by 0.1): two equally likely names suggest neither.
    """
    import difflib

    names = sorted(set(candidates) - {name})
    folded = [c for c in names if c.casefold() == name.casefold()]
    if len(folded) == 1:
        return folded[0]
    scored = sorted(
        ((difflib.SequenceMatcher(None, name, c).ratio(), c) for c in names),
        reverse=True,
    )
    if not scored or scored[0][0] < 0.75:
        return None
    if len(scored) > 1 and scored[0][0] - scored[1][0] < 0.1:
        return None
    return scored[0][1]
