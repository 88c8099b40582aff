"""Thread placement: ``execute`` runs on the runner's own supervising thread."""

from __future__ import annotations

from .._status import ServiceState
from .._util import thread_stack
from ._base import Runner

__all__ = ["ThreadRunner"]


class ThreadRunner(Runner):
    """``execute(stopping)`` on a dedicated daemon thread named ``hostkit-<service>``.

    Daemon, because a thread that ignores its token past the shutdown budget must
    not keep the interpreter alive after the host has reported and abandoned it.
    """

    def _run_once(self) -> None:
        self.service.execute(self.stopping)

    def where(self) -> str:
        return f"thread {self._thread.name if self._thread else '?'} is at:\n{thread_stack(self._thread)}"

    def escalate(self, grace: float) -> str:
        # A Python thread cannot be killed: report it and leave it (it is a daemon).
        self.record.mark(ServiceState.TIMED_OUT, detail="did not stop within the shutdown budget; thread abandoned")
        return "its thread was abandoned (threads cannot be killed; it is a daemon and will not block exit)"
