"""Where a schedule records its slots: the seam between cron schedules and cluster locks.

A schedule that runs once per cluster must not repeat or skip a slot when the
lock changes hands. So the slot a run is for is written where the lock lives, in
the same atomic step that checks the writer still holds the lock (its fencing
token is the current one): a holder that lost its lease can no longer record
anything, and the next holder reads where the last one stopped.

The lock side (a lease on Redis or PostgreSQL, or the file lock) implements
:class:`SlotLedger`; the schedule side reads :func:`current_ledger`, which the
once-per-cluster wrapper sets for the thread that runs its service. Neither side
imports the other.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol, runtime_checkable

__all__ = ["SlotLedger", "SlotState", "current_ledger", "using_ledger"]


@dataclass(frozen=True)
class SlotState:
    """What a ledger knows of one schedule; datetimes are timezone-aware, in UTC.

    Attributes:
        completed: the latest slot whose run finished, or ``None`` (never ran).
        begun: a slot whose run began after ``completed`` and did not finish (its
            holder stopped, died or lost the lock mid-run), or ``None``.
    """

    completed: datetime | None = None
    begun: datetime | None = None


@runtime_checkable
class SlotLedger(Protocol):
    """Records which slot of a schedule ran, under the lock that let it run.

    ``schedule`` names one schedule (stable across restarts and hosts). Both
    writes are atomic with a check that the caller still holds the lock, and
    return ``False``, writing nothing, when it does not: the caller must then
    stop, since another holder owns the schedule now.
    """

    def slot_state(self, schedule: str) -> SlotState: ...

    def begin_slot(self, schedule: str, slot: datetime) -> bool: ...

    def complete_slot(self, schedule: str, slot: datetime) -> bool: ...


_current = threading.local()


def current_ledger() -> SlotLedger | None:
    """The ledger of the lock this thread runs under, or ``None`` outside any."""
    ledger: SlotLedger | None = getattr(_current, "ledger", None)
    return ledger


@contextlib.contextmanager
def using_ledger(ledger: SlotLedger | None) -> Iterator[None]:
    """Make ``ledger`` this thread's :func:`current_ledger` for the ``with`` block."""
    previous = getattr(_current, "ledger", None)
    _current.ledger = ledger
    try:
        yield
    finally:
        _current.ledger = previous
