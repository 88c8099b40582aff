"""Thread placement: ``execute`` runs on the runner's own supervising thread."""

from __future__ import annotations

import threading
import time

from .._status import ServiceState
from .._summary import heartbeat_age
from .._util import thread_stack
from ._base import Runner

__all__ = ["ThreadRunner"]


class ThreadRunner(Runner):
    """``execute(stopping)`` on a dedicated daemon thread named ``hostkit-<service>``.

    Daemon, because a thread that ignores its token past the shutdown budget must
    not keep the interpreter alive after the host has reported and abandoned it.

    With a ``heartbeat_timeout``, a watchdog thread checks the heartbeat: a thread
    cannot be killed, so a stale heartbeat marks the service unhealthy (status
    ``healthy=False`` and ``detail``) and is logged; a fresh beat clears it.
    """

    def start(self) -> None:
        super().start()
        if self.record.heartbeat_timeout is not None:
            threading.Thread(
                target=self._watch_heartbeat, name=f"hostkit-{self.record.name}-heartbeat", daemon=True
            ).start()

    def _run_once(self) -> None:
        self.service.execute(self.stopping)

    def _watch_heartbeat(self) -> None:
        timeout = self.record.heartbeat_timeout
        assert timeout is not None
        began = time.time()
        stale = False
        # Wait on `ended`, so the watchdog ends with the run and never outlives it.
        while not self.ended.wait(min(0.2, timeout / 4)):
            if self.record.state is not ServiceState.RUNNING:
                continue
            age = heartbeat_age(self.record.last_heartbeat_at, max(began, self.record.started_at or began)) or 0.0
            if age > timeout and not stale:
                stale = True
                note = (
                    f"no heartbeat for {age:.1f} s (heartbeat_timeout {timeout:g} s): hung? "
                    f"A thread cannot be killed; it is reported unhealthy"
                )
                self.record.update(healthy=False, detail=note)
                self._log.error("Background service {!r}: {}", self.record.name, note)
            elif age <= timeout and stale:
                stale = False
                self.record.update(healthy=True, detail=None)
                self._log.info("Background service {!r}: heartbeat resumed", self.record.name)

    def where(self) -> str:
        return f"thread {self._thread.name if self._thread else '?'} is at:\n{thread_stack(self._thread)}"

    def escalate(self, grace: float) -> str:
        # A Python thread cannot be killed: report it and leave it (it is a daemon).
        self.timed_out_detail = "did not stop within the shutdown budget; thread abandoned"
        self.record.mark(ServiceState.TIMED_OUT, detail=self.timed_out_detail)
        return "its thread was abandoned (threads cannot be killed; it is a daemon and will not block exit)"
