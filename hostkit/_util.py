"""Small helpers shared by several modules.

The duration and error-message helpers live in :mod:`hostkit._validate`; they are
re-exported here for the modules that import them from this one.
"""

from __future__ import annotations

import gc
import sys
import threading
import traceback
from collections.abc import Iterable

from ._validate import MAX_SECONDS, describe, to_seconds

__all__ = ["MAX_SECONDS", "close_match", "describe", "thread_stack", "to_seconds"]


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
