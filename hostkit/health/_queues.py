"""Queue gauges for autoscalers: each watched queue's counts, sampled on a short cache.

A probe answer or a ``/metrics`` scrape reads every watched queue's
:meth:`~hostkit.queues.Queue.stats` (depth, in flight, dead letters, oldest ready
message's age). Why on demand with a cache rather than a sampling thread: nothing
runs while nobody asks, and the figures are as fresh as the scrape; the cache
(``max_age``, 1 s) makes the load on the broker one ``stats()`` per queue per
second at most, however many scrapers, probes and dashboards ask.

Why a helper thread per sample: the probe listener answers every request on one
thread, liveness included. A broker behind a network partition can leave a call
hanging until the TCP timeout, minutes; the listener must not hang with it. Each
sample runs on a short-lived thread and is waited for up to ``timeout`` (1 s):
past that, the queue is reported unreachable and the call finishes on its own,
while later scrapes do not start another one for that queue until it has. A
failed sample is cached like a good one, so an outage costs one try per second.

This module does not import :mod:`hostkit.queues` (which imports this package):
a watched queue is anything with a ``name`` and a ``stats()`` returning an object
with ``depth``, ``in_flight``, ``dead`` and ``oldest_age``.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol

from loguru import logger

from .._summary import summarize_exception
from .._util import describe
from ..exceptions import ConfigurationError

__all__ = ["QueueGauges", "QueueSample", "WatchedQueue"]

_log = logger.bind(service="health")


class WatchedQueue(Protocol):
    """What the gauges need of a queue: its name and a ``stats()`` snapshot."""

    name: str

    def stats(self) -> Any: ...


@dataclass(frozen=True)
class QueueSample:
    """One queue's figures at one moment, or why there are none.

    Attributes:
        label: the ``queue`` label of its gauges.
        stats: the queue's :class:`~hostkit.queues.QueueStats`, or ``None`` when
            the broker could not be read (``error`` says why).
        error: the failure of the last sample, or ``None``.
        sampled_at: when the figures were read (``time.time()``).
    """

    label: str
    stats: Any | None
    error: BaseException | None
    sampled_at: float

    def to_dict(self, *, redact: bool = False) -> dict[str, Any]:
        """A JSON-ready dict: ``up`` and the counts, or ``up: false`` and the error."""
        if self.stats is None:
            error = self.error
            text = "no answer" if error is None else (type(error).__name__ if redact else summarize_exception(error))
            return {"up": False, "error": text, "sampled_at": round(self.sampled_at, 3)}
        s = self.stats
        return {
            "up": True,
            "depth": int(s.depth),
            "in_flight": int(s.in_flight),
            "dead": int(s.dead),
            "oldest_age": round(float(s.oldest_age), 3),
            "sampled_at": round(self.sampled_at, 3),
        }


class _Slot:
    def __init__(self, label: str, queue: WatchedQueue) -> None:
        self.label = label
        self.queue = queue
        self.lock = threading.Lock()
        self.sample: QueueSample | None = None
        self.taken_at = float("-inf")  # time.monotonic() of the last sample
        self.running: threading.Thread | None = None


class _StatsTimeout(TimeoutError):
    pass


class QueueGauges:
    """The queues one :class:`~hostkit.health.HealthChecks` registry reports on.

    Args:
        max_age: seconds a sample is served from the cache.
        timeout: seconds a scrape waits for one queue's ``stats()``.
    """

    def __init__(self, *, max_age: float = 1.0, timeout: float = 1.0) -> None:
        self.max_age = max_age
        self.timeout = timeout
        self._slots: dict[str, _Slot] = {}
        self._lock = threading.Lock()

    def add(self, queue: WatchedQueue, label: str | None = None) -> bool:
        """Watch ``queue`` under ``label`` (default: its name); ``False`` if it is watched already.

        Raises:
            TypeError: ``queue`` has no ``name`` and ``stats()``.
            ConfigurationError: ``label`` is taken by another queue.
        """
        if not isinstance(getattr(queue, "name", None), str) or not callable(getattr(queue, "stats", None)):
            msg = f"a watched queue needs a str name and a stats() method (a hostkit Queue), not: {describe(queue)}"
            raise TypeError(msg)
        label = queue.name if label is None else label
        if not isinstance(label, str) or not label:
            msg = f"a queue's label must be a non-empty str, not: {describe(label)}"
            raise ConfigurationError(msg)
        with self._lock:
            slot = self._slots.get(label)
            if slot is not None:
                # The same queue again (two consumers of it, or replicas of one): one gauge.
                # Queue objects compare by identity, so the same storage is recognised by
                # its class and its repr (which names the file or server, and the queue).
                if slot.queue is queue or (type(slot.queue) is type(queue) and repr(slot.queue) == repr(queue)):
                    return False
                msg = (
                    f"a different queue is already watched under the label {label!r} ({slot.queue!r}); "
                    f"pass label= to tell them apart"
                )
                raise ConfigurationError(msg)
            self._slots[label] = _Slot(label, queue)
        return True

    @property
    def labels(self) -> list[str]:
        """The watched queues' labels, in the order they were added."""
        with self._lock:
            return list(self._slots)

    def sample(self) -> list[QueueSample]:
        """Every watched queue's figures (from the cache when younger than ``max_age``); never raises."""
        with self._lock:
            slots = list(self._slots.values())
        return [self._sample(slot) for slot in slots]

    def _sample(self, slot: _Slot) -> QueueSample:
        with slot.lock:
            if slot.sample is not None and time.monotonic() - slot.taken_at < self.max_age:
                return slot.sample
            if slot.running is not None and slot.running.is_alive():
                # The last call has not answered yet: do not pile another one on the broker.
                sample = QueueSample(
                    slot.label, None, _StatsTimeout("the last stats() call has not answered"), time.time()
                )
            else:
                sample = self._read(slot)
            was_up = slot.sample is None or slot.sample.stats is not None
            if was_up and sample.stats is None:
                # Once per outage, not once per scrape: the gauges say the rest.
                _log.warning(
                    "Queue gauges: cannot read queue {!r} ({}); hostkit_queue_up is 0 until it answers",
                    slot.label,
                    summarize_exception(sample.error) if sample.error is not None else "no answer",
                )
            elif not was_up and sample.stats is not None:
                _log.info("Queue gauges: queue {!r} answers again", slot.label)
            slot.sample, slot.taken_at = sample, time.monotonic()
            return sample

    def _read(self, slot: _Slot) -> QueueSample:
        box: list[Any] = []

        def call() -> None:
            try:
                box.append(slot.queue.stats())
            except Exception as exc:  # reported in the sample: an outage, or a bug shown with its type
                box.append(exc)

        thread = threading.Thread(target=call, name=f"hostkit-queue-stats-{slot.label}", daemon=True)
        thread.start()
        thread.join(self.timeout)
        now = time.time()
        if thread.is_alive():
            slot.running = thread
            error = _StatsTimeout(f"stats() did not answer within {self.timeout:g} s")
            return QueueSample(slot.label, None, error, now)
        slot.running = None
        result = box[0]
        if isinstance(result, Exception):
            return QueueSample(slot.label, None, result, now)
        return QueueSample(slot.label, result, None, now)
