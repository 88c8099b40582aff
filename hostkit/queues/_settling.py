"""How a queue consumer sends its settlements: in batches, counted and logged once they held.

Each consumer thread keeps the settlements it decided (ack, retry, dead letter) in a
list of its own until the next flush or lease (see :mod:`hostkit.queues._consumer`),
then sends them in one ``Queue.settle`` call. Per message the queue answers whether
its lease still held: only then does the outcome count, and its log line (a retry's
warning, a dead letter's error) is written.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from .._summary import summarize_exception
from ._base import Queue, Settlement
from ._outage import Link

__all__ = ["ACK_DELAY", "FAST", "Pending", "SettlementBatches"]

# Handlers faster than this have their settlements batched; after a slower one they go at once.
FAST = 0.005
# The longest a finished message waits for its batched settlement.
ACK_DELAY = 0.05


@dataclass(frozen=True)
class Pending:
    """A settlement decided but not sent yet; once it held, the count it adds to and the line it logs."""

    settlement: Settlement
    count: str = "handled"
    note: tuple[Any, ...] = ()  # level, exception (or None), message, *args


class SettlementBatches:
    """The settlement half of :class:`~hostkit.queues.QueueConsumer`: per-thread batches, their flush, their outcome."""

    name: str
    queue: Queue
    _lock: threading.Lock
    _pending: dict[str, list[Pending]]
    _counts: dict[str, int]
    _link: Link | None

    def _defer(self, consumer: str, pending: Pending) -> None:
        """Queue a claimed message's settlement for the thread's next flush or lease."""
        with self._lock:
            self._pending[consumer].append(pending)

    def _flush(self, consumer: str, log: Any) -> bool:
        """Send one consumer thread's pending settlements in one call; ``False`` if the broker was unreachable."""
        with self._lock:
            # Swap under the lock: the worker and, at a stuck stop, the service thread
            # may both flush; whoever takes the list settles it, so nothing is settled twice.
            batch, self._pending[consumer] = self._pending.get(consumer, []), []
        if not batch:
            return True
        try:
            settled = self.queue.settle([p.settlement for p in batch])
        except Exception as exc:
            self._settle_failed(batch, exc, log)
            return not self.queue.is_outage(exc)
        self._settled(batch, settled, log)
        return True

    def _settle_failed(self, batch: list[Pending], exc: Exception, log: Any) -> None:
        what = ", ".join(f"{p.settlement.outcome} of {p.settlement.message.id}" for p in batch)
        line = "Queue {!r}: settling {} message(s) failed ({}); they will be delivered again after their lease expires"
        self._log_failure(log, exc, "ERROR", line, self.queue.name, len(batch), what)

    def _settled(self, batch: list[Pending], settled: list[bool], log: Any) -> None:
        """Count and log what a settle call did: per message, whether its lease still held."""
        outcomes = list(zip(batch, settled, strict=True))
        lost = [f"{p.settlement.outcome} of {p.settlement.message.id}" for p, held in outcomes if not held]
        with self._lock:
            for pending, held in outcomes:
                self._counts[pending.count if held else "lease_lost"] += 1
        for pending, held in outcomes:
            if held and pending.note:
                level, exc, text, *args = pending.note
                log.opt(exception=exc).log(level, text, *args)
        if lost:
            log.warning(
                "Queue {!r}: {} lease(s) expired before the settle ({}; handler slower than lease_time {} s?); "
                "other consumers have those messages, so they may be handled twice",
                self.queue.name,
                len(lost),
                ", ".join(lost),
                self.queue.lease_time,
            )

    def _log_failure(self, log: Any, exc: Exception, level: str, message: str, *args: Any) -> None:
        """Log a failed queue call: one line for an outage (its traceback at DEBUG), else with the traceback.

        An outage fails every call the same way, and its traceback says nothing the
        line does not; other failures (bugs) keep theirs at ``level``.
        """
        if self.queue.is_outage(exc):
            # Expected while the broker is down, and the messages come back (at least
            # once): a warning, not an error; and only for the first failure of an
            # outage, which every thread's calls then hit: the link logs the rest.
            link = self._link
            news = link.notice(exc) if link is not None else True
            text = summarize_exception(exc)
            log.log("WARNING" if news else "DEBUG", message + ": {}", *args, text)
            log.opt(exception=exc).debug("Queue consumer {!r}: the traceback of that failure", self.name)
        else:
            log.opt(exception=exc).log(level, message, *args)
