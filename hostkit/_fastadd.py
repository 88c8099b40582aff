"""loguru's ``logger.add()`` without its fixed cost after the first: hostkit's one way to add a sink.

Every ``logger.add()`` builds an exception formatter that lists the standard
library's folders, asking ``sysconfig.get_path`` for each install scheme and path
name (36 calls on CPython 3.11). Each call expands a whole scheme against
sysconfig's large table of build variables, so one ``add()`` costs about 7 ms on a
2-core machine, though the answers never change within a process. hostkit adds a
sink on every embedded host's start and in every process-placed child, where that
cost was most of a forked child's start.

:func:`add_sink` calls ``logger.add()`` with ``sysconfig.get_path`` answered from
this process's memo for the duration of the call: the same paths, computed once.
The memo is plain memory, so a forked child (and every child of a fork server that
filled it) inherits it filled. hostkit's package imports loguru inside
:func:`remembered_paths` (in a process-placed child, :mod:`hostkit._lateloguru`
runs loguru's import inside it), so the default sink loguru adds as it is imported
fills the memo at no extra cost. ``sysconfig.get_path`` is swapped back before the call
returns, under a lock, so hostkit's swaps never nest or interleave; any other
thread that calls it meanwhile gets the answers the real function gives. Only
calls with the default ``vars`` and ``expand`` are remembered, the others pass
through.
"""

from __future__ import annotations

import contextlib
import os
import sysconfig
import threading
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["add_sink", "fill_memo", "remembered_paths"]

_paths: dict[tuple[str, str], str] = {}
_lock = threading.Lock()
#: The real ``sysconfig.get_path`` while :func:`remembered_paths` has it swapped (empty otherwise).
_swapped: list[Callable[..., str]] = []
#: A level above any record's: the sink added only to fill the memo never receives one.
_UNREACHABLE_LEVEL = 1_000_000_000


def _remembering(real: Callable[..., str]) -> Callable[..., str]:
    def get_path(name: str, scheme: Any = None, vars: Any = None, expand: bool = True) -> str:
        if scheme is None:
            return real(name, vars=vars, expand=expand)
        if vars is not None or not expand:
            return real(name, scheme, vars, expand)
        key = (name, scheme)
        path = _paths.get(key)
        if path is None:
            path = _paths[key] = real(name, scheme)
        return path

    return get_path


@contextlib.contextmanager
def remembered_paths() -> Iterator[None]:
    """While inside, ``sysconfig.get_path`` answers from this process's memo (filling it on a miss)."""
    with _lock:
        real = sysconfig.get_path
        _swapped.append(real)
        sysconfig.get_path = _remembering(real)
        try:
            yield
        finally:
            sysconfig.get_path = real
            _swapped.clear()


def add_sink(sink: Any, **options: Any) -> int:
    """``logger.add(sink, **options)``, paying loguru's per-sink set-up once per process."""
    # Imported here: hostkit's package imports this module before loguru, to import
    # loguru inside remembered_paths().
    from loguru import logger

    with remembered_paths():
        return logger.add(sink, **options)


def _after_fork_in_child() -> None:
    # Forked while another thread was inside remembered_paths(): that thread does not
    # exist here, so nothing would give back the lock or the real function.
    global _lock
    _lock = threading.Lock()
    if _swapped:
        sysconfig.get_path = _swapped[0]
        _swapped.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


def fill_memo() -> None:
    """Pay loguru's per-sink set-up now, once, so that later sinks (and every fork) need not.

    Adds a sink no record reaches and removes it at once: loguru's ``min_level``, and
    so every record's cost, is unchanged meanwhile.
    """
    if _paths:
        return
    from loguru import logger

    handler_id = add_sink(lambda message: None, level=_UNREACHABLE_LEVEL, catch=False)
    logger.remove(handler_id)
