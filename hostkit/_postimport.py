"""Run a callback once a module is imported: at once if it already is, else right after its first import.

hostkit uses it for loguru, which costs a child process tens of milliseconds to
import (it imports asyncio): the package disables its own logger only once loguru
exists, and a process-placed child installs its log-forwarding sink only when the
service's code imports loguru, never before.

A finder at the front of ``sys.meta_path`` watches for the awaited names only. It
lets the other finders find the module, wraps the loader so the callbacks run just
after the module's code has run (still under the module's import lock: another
thread importing it waits until they have run), then puts the real loader back on the module
and removes itself once nothing is awaited.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import threading
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from importlib.abc import Loader
    from importlib.machinery import ModuleSpec

__all__ = ["when_imported"]

Callback = Callable[[ModuleType], None]

_lock = threading.RLock()
_awaited: dict[str, list[Callback]] = {}


def _after_fork_in_child() -> None:
    # Another thread of the parent may have held the lock at the fork.
    global _lock
    _lock = threading.RLock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def when_imported(name: str, callback: Callback) -> None:
    """Call ``callback(module)`` once module ``name`` is imported: now if it already is.

    Callbacks for one module run in the order they were registered, in the thread
    that imports it. An exception from a callback propagates from that import.
    """
    with _lock:
        if name not in sys.modules:
            _awaited.setdefault(name, []).append(callback)
            if _finder not in sys.meta_path:
                sys.meta_path.insert(0, _finder)
            return
    # Already imported, or being imported by another thread: import_module waits for
    # that import to finish rather than hand out a half-initialised module.
    callback(importlib.import_module(name))


def _imported(name: str, module: ModuleType) -> None:
    with _lock:
        callbacks = _awaited.pop(name, [])
        if not _awaited:
            with contextlib.suppress(ValueError):
                sys.meta_path.remove(_finder)
    for callback in callbacks:
        callback(module)


class _Loader:
    """The real loader, plus the callbacks once the module's code has run.

    Plain classes, not ``importlib.abc``'s: that module imports ``importlib.resources``,
    which a child should not pay for.
    """

    def __init__(self, real: Any, name: str) -> None:
        self._real = real
        self._name = name

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        create = getattr(self._real, "create_module", None)
        return create(spec) if create is not None else None

    def exec_module(self, module: ModuleType) -> None:
        self._real.exec_module(module)
        # The module looks as if imported without us.
        module.__loader__ = self._real
        if module.__spec__ is not None:
            module.__spec__.loader = self._real
        _imported(self._name, module)

    def __getattr__(self, attr: str) -> Any:
        # get_resource_reader, is_package, get_code...: the real loader answers.
        return getattr(self._real, attr)


class _Finder:
    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname not in _awaited:
            return None
        for finder in list(sys.meta_path):
            if finder is self:
                continue
            find = getattr(finder, "find_spec", None)
            if find is None:
                continue
            spec: ModuleSpec | None = find(fullname, path, target)
            if spec is None:
                continue
            # A loader without exec_module (legacy load_module only) is left alone.
            if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                spec.loader = cast("Loader", _Loader(spec.loader, fullname))
            return spec
        return None


_finder = _Finder()
