"""hostkit's loguru set-up, run when loguru is first imported: how a child avoids paying loguru's import.

loguru's import costs more than everything else a process-placed child imports
(about 45 ms cold on a 2-core machine: it brings asyncio). A child whose service
never logs through loguru has no use for it, so the child side of hostkit does not
import it; what hostkit must do once loguru is there (disable hostkit's own
logger, install the child's forwarding sink) is registered with :func:`when_imported`
instead. If loguru is already imported, the callback runs at once; otherwise an
import hook on ``sys.meta_path`` runs it right after loguru's package has executed,
inside the same import, before the importing code gets the module back: no record
can be written through loguru before the callbacks have run, whichever thread
imports it, and however late (inside ``execute``).

loguru's package is executed inside :func:`hostkit._fastadd.remembered_paths`, as
``import hostkit`` does in the host, so the default sink loguru adds on import
fills the memo that later sinks use.

Only the interpreters multiprocess starts for hostkit (the fork server and spawned
children, :func:`in_multiprocess_child`) defer loguru this way; a host imports it
with ``import hostkit``, as it always has.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from importlib.abc import Loader
    from importlib.machinery import ModuleSpec

__all__ = ["in_multiprocess_child", "when_imported"]

#: How the command lines of multiprocess's fork server and of a spawned child begin
#: (the argument of ``-c``); a child forked by the fork server shares the server's.
_CHILD_COMMANDS = ("from multiprocess.forkserver import main", "from multiprocess.spawn import spawn_main")

_lock = threading.RLock()
_callbacks: list[Callable[[], None]] = []
_finder: _LoguruFinder | None = None


def in_multiprocess_child() -> bool:
    """``True`` in multiprocess's fork server, each child it forks, and each spawned child."""
    return any(arg.startswith(_CHILD_COMMANDS) for arg in sys.orig_argv)


def when_imported(callback: Callable[[], None]) -> None:
    """Run ``callback`` now if loguru is imported, else as soon as it is (once, in registration order)."""
    global _finder
    with _lock:
        if _finder is None and "loguru" in sys.modules:
            callback()
            return
        _callbacks.append(callback)
        if _finder is None:
            _finder = _LoguruFinder()
            sys.meta_path.insert(0, _finder)


def _run_callbacks() -> None:
    global _finder
    with _lock:
        if _finder is not None:
            try:
                sys.meta_path.remove(_finder)
            except ValueError:
                pass  # someone else's code rebuilt sys.meta_path: nothing left to remove
            _finder = None
        pending = list(_callbacks)
        _callbacks.clear()
    for callback in pending:
        callback()


class _LoguruFinder:
    """Finds loguru with the finders after it, and wraps its loader so the callbacks run after it."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname != "loguru":
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = cast("Loader", _ThenCallbacks(spec.loader))
                return spec
        return None


class _ThenCallbacks:
    """loguru's own loader; after it has executed the package, hostkit's callbacks run."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        module: ModuleType | None = self._loader.create_module(spec)
        return module

    def exec_module(self, module: ModuleType) -> None:
        from ._fastadd import remembered_paths

        # The loader the module keeps is loguru's own (importlib.resources and the
        # like ask it), not this wrapper.
        module.__loader__ = self._loader
        if module.__spec__ is not None:
            module.__spec__.loader = self._loader
        with remembered_paths():
            self._loader.exec_module(module)
        _run_callbacks()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)
