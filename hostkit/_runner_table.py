"""Which runner runs a service, without storing anything on the user's object.

A service asks for its runner (``heartbeat()``, a deployment lock's status, a
queue consumer's detail); a user class may use ``__slots__``, define ``__eq__``
without ``__hash__``, or pickle its ``__dict__``, and none of that should meet
hostkit's bookkeeping. So the table is keyed by ``id(service)`` and sits beside
the object::

    Host / child bootstrap --attach_runner(service, runner)--> _attached[id(service)]
    service.heartbeat()    --runner_for(self)----------------> runner.heartbeat()
    end of the run / stop  --detach_runner(service, runner)--> entry removed

The table holds the runner weakly: whoever made it owns it (the host's record of
the service; the child's bootstrap while ``execute`` runs; a service started by
hand keeps its own, see ``BackgroundService``). A host that is built and dropped
without running therefore leaves nothing behind. An entry never outlives its
runner, and a runner keeps its service alive (a child's stand-in runs in a
process the service outlives), so an id cannot name another object while listed.

Imports nothing heavy: a spawned child uses it without loading loguru.
"""

from __future__ import annotations

import threading
import weakref
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ._services import Replica
    from ._status import LockStatus, ServiceRecord

__all__ = ["RunnerLike", "attach_runner", "detach_runner", "runner_for"]


class RunnerLike(Protocol):
    """What a service may ask of whatever runs it: the host's runner, or a child's stand-in."""

    @property
    def record(self) -> ServiceRecord | None:
        """The host's record of the service (``None`` in a child process, which has none)."""

    @property
    def replica(self) -> Replica | None:
        """Which replica of its registration the service is (``None`` without ``replicas=``)."""

    def heartbeat(self) -> None:
        """Record that the service made progress."""

    def report_detail(self, text: str | None) -> None:
        """Show ``text`` as the service's status detail (``None`` clears it)."""

    def report_lock(self, status: LockStatus | None) -> None:
        """Record where the service stands with its deployment lock."""


_attached: dict[int, weakref.ref[RunnerLike]] = {}
# Re-entrant: a runner collected while the lock is held (the garbage collector may run
# on any allocation) calls forget() on this same thread.
_lock = threading.RLock()


def attach_runner(service: object, runner: RunnerLike) -> None:
    """Make ``runner`` the one :func:`runner_for` returns for ``service`` (replacing any other).

    The caller keeps ``runner`` alive for as long as it should be found.
    """
    key = id(service)

    def forget(ref: weakref.ref[RunnerLike]) -> None:
        with _lock:
            if _attached.get(key) is ref:
                _attached.pop(key, None)

    with _lock:
        _attached[key] = weakref.ref(runner, forget)


def detach_runner(service: object, runner: RunnerLike) -> None:
    """Forget ``runner`` for ``service``; a no-op if another runner (or none) is attached."""
    key = id(service)
    with _lock:
        ref = _attached.get(key)
        if ref is not None and ref() is runner:
            _attached.pop(key, None)


def runner_for(service: object) -> RunnerLike | None:
    """The runner attached to ``service``, or ``None``."""
    ref = _attached.get(id(service))
    return None if ref is None else ref()
