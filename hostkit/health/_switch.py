"""The process-wide switch interval, lowered while a probe listener asks for it (opt-in)."""

from __future__ import annotations

import sys
import threading


class SwitchInterval:
    """The process-wide switch interval, lowered while any listener asks for it.

    Reference-counted: the first request saves the interval in force, every change
    sets the lowest interval still asked for, and the last release restores the
    saved one, unless someone else changed it meanwhile (then theirs is kept).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._wanted: list[float] = []
        self._saved = 0.0
        self._ours = 0.0  # what we last set, as sys.getswitchinterval() reports it back

    def lower(self, seconds: float) -> None:
        with self._lock:
            if not self._wanted:
                self._saved = self._ours = sys.getswitchinterval()
            self._wanted.append(seconds)
            self._apply(min(self._saved, *self._wanted))

    def release(self, seconds: float) -> None:
        with self._lock:
            self._wanted.remove(seconds)
            self._apply(min(self._saved, *self._wanted) if self._wanted else self._saved)

    def _apply(self, seconds: float) -> None:
        if sys.getswitchinterval() != self._ours:
            return  # changed by someone else while we held it: theirs wins
        sys.setswitchinterval(seconds)
        self._ours = sys.getswitchinterval()


#: The one instance: the switch interval is one per process.
process_switch_interval = SwitchInterval()
