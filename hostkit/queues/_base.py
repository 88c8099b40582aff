"""The queue contract every backend implements, and the records it hands out.

Delivery is *at least once*: a message leased by a consumer stays in the queue,
invisible to other consumers, until it is acknowledged (gone), released
(visible again, possibly after a delay) or dead-lettered; if its consumer dies,
the lease expires and another consumer gets the message. Each lease carries a
receipt, and acknowledging, releasing, renewing or dead-lettering with a receipt
that no longer holds the lease does nothing and returns ``False``: a consumer
whose lease expired cannot settle a message another consumer now holds.
"""

from __future__ import annotations

import abc
import threading
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any, Literal, TypeVar

from .._validate import describe, positive_int, to_seconds
from ..exceptions import ConfigurationError
from ._codec import Codec, CodecName, resolve_codec

__all__ = ["DeadLetter", "Message", "Queue", "QueueStats", "Settlement"]

_Q = TypeVar("_Q", bound="Queue")


@dataclass(frozen=True)
class Message:
    """One leased message.

    Attributes:
        id: the message's id in its queue (stable across retries).
        payload: the decoded payload.
        attempts: deliveries so far, this one included (1 on the first delivery).
        receipt: proves the lease; pass the message back to ``ack``/``release``.
        enqueued_at: when it was first enqueued (``time.time()``).

    .. versionadded:: 0.1
    """

    id: str
    payload: Any
    attempts: int
    receipt: str
    enqueued_at: float


@dataclass(frozen=True)
class DeadLetter:
    """A message that failed ``max_attempts`` times, kept with its last error.

    .. versionadded:: 0.1
    """

    id: str
    payload: Any
    attempts: int
    error: str
    failed_at: float


@dataclass(frozen=True)
class Settlement:
    """How one leased message ends its delivery, for :meth:`Queue.settle`.

    Attributes:
        message: the leased message (its receipt proves the lease).
        outcome: ``"ack"`` (done: it leaves the queue), ``"release"`` (visible again
            after ``delay`` seconds) or ``"dead_letter"`` (kept with ``error``).
        delay: for a release, seconds before it is delivered again.
        count_attempt: for a release, whether this delivery counts towards
            ``max_attempts`` (``False`` for a graceful stop).
        error: for a dead letter, its last error.

    .. versionadded:: 0.2
    """

    message: Message
    outcome: Literal["ack", "release", "dead_letter"]
    delay: float = 0.0
    count_attempt: bool = True
    error: str = ""


@dataclass(frozen=True)
class QueueStats:
    """Counts of a queue now.

    Attributes:
        depth: messages waiting (ready now or delayed for a retry).
        in_flight: messages leased by a consumer and not settled yet.
        dead: dead letters.
        oldest_age: seconds the oldest message ready for a consumer has waited
            since it became ready (its enqueue, or the end of its retry delay);
            ``0.0`` when none is ready. What an autoscaler or an alert watches:
            a growing age means the consumers do not keep up.

    .. versionadded:: 0.1
    .. versionchanged:: 0.2
       ``oldest_age``.
    """

    name: str
    depth: int
    in_flight: int
    dead: int
    oldest_age: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


#: The queue modules' name for :func:`hostkit._validate.positive_int`.
check_positive_int = positive_int


def check_name(name: object) -> str:
    if not isinstance(name, str) or not name or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        msg = f"a queue name must be a non-empty str of letters, digits, '-', '_' and '.', not: {describe(name)}"
        raise ConfigurationError(msg)
    return name


class Queue(abc.ABC):
    """A durable work queue: producers ``enqueue``, consumers ``lease`` and settle.

    Subclasses: :class:`~hostkit.queues.SQLiteQueue` (one machine, no server) and
    :class:`~hostkit.queues.RedisStreamQueue` (many machines). A queue object is
    safe to share between threads and may be pickled to another process (it
    reconnects there). Use it as a context manager or call :meth:`close`.

    Args:
        name: the queue's name (several queues can share one database or server).
        codec: ``"json"`` (default), ``"pickle"`` (trusted producers only) or a
            :class:`~hostkit.queues.Codec`.
        lease_time: how long a leased message stays invisible to other consumers
            before it is delivered again (consumers renew it while they work).

    .. versionadded:: 0.1
    """

    #: Whether a consumer should hold settlements back (up to 50 ms) so that several share
    #: one call: true where each settle call costs a disk sync (SQLite at ``"full"``).
    #: Elsewhere settlements go at the end of each batch, with the next lease.
    hold_settlements = False

    def __init__(self, name: str, *, codec: CodecName | Codec = "json", lease_time: float | timedelta = 30.0) -> None:
        self.name = check_name(name)
        self.codec = resolve_codec(codec)
        self.lease_time = to_seconds(lease_time, "lease_time", allow_zero=False)

    # -- producers -------------------------------------------------------------------

    def enqueue(self, payload: Any, *, delay: float | timedelta = 0.0) -> str:
        """Add one message; return its id. The payload is encoded before anything is written.

        Raises:
            PayloadError: the codec cannot encode ``payload`` (nothing was written).
        """
        return self.enqueue_many([payload], delay=delay)[0]

    def enqueue_many(self, payloads: Iterable[Any], *, delay: float | timedelta = 0.0) -> list[str]:
        """Add several messages at once (one transaction or round trip); all are encoded first.

        Raises:
            PayloadError: one payload cannot be encoded (nothing was written).
        """
        seconds = to_seconds(delay, "delay")
        encoded = [self.codec.encode(p) for p in payloads]
        if not encoded:
            return []
        return self._put(encoded, seconds)

    @abc.abstractmethod
    def _put(self, encoded: list[bytes], delay: float) -> list[str]: ...

    # -- consumers -------------------------------------------------------------------

    @abc.abstractmethod
    def lease(
        self, consumer: str, *, max_messages: int = 1, wait: float = 0.0, token: threading.Event | None = None
    ) -> list[Message]:
        """Lease up to ``max_messages`` visible messages for ``lease_time`` seconds.

        Messages whose lease expired (their consumer died or hung) are delivered
        again. With ``wait > 0`` blocks up to that long for a message to arrive;
        setting ``token`` ends the wait early where the backend can be woken.
        """

    @abc.abstractmethod
    def ack(self, message: Message) -> bool:
        """Settle a message as done: it leaves the queue. ``False`` if the lease was lost."""

    def ack_many(self, messages: list[Message]) -> int:
        """Ack several messages in one transaction or round trip; return how many were still held."""
        return sum(1 for m in messages if self.ack(m))

    @abc.abstractmethod
    def release(self, message: Message, *, delay: float = 0.0, count_attempt: bool = True) -> bool:
        """Give a message back: visible again after ``delay`` seconds. ``False`` if the lease was lost.

        With ``count_attempt=False`` (a graceful stop) the delivery does not count
        towards ``max_attempts``.
        """

    @abc.abstractmethod
    def dead_letter(self, message: Message, error: str) -> bool:
        """Move a message to the dead letters with its error. ``False`` if the lease was lost."""

    def settle(self, settlements: list[Settlement]) -> list[bool]:
        """Settle several messages at once, each its own way; per message, whether its lease still held.

        Backends settle the whole list in one transaction or round trip, each message
        checked against its receipt as :meth:`ack`, :meth:`release` and
        :meth:`dead_letter` check it. This default settles them one by one.

        .. versionadded:: 0.2
        """
        done = []
        for s in settlements:
            if s.outcome == "ack":
                done.append(self.ack(s.message))
            elif s.outcome == "release":
                done.append(self.release(s.message, delay=s.delay, count_attempt=s.count_attempt))
            else:
                done.append(self.dead_letter(s.message, s.error))
        return done

    def settle_and_lease(
        self,
        settlements: list[Settlement],
        consumer: str,
        *,
        max_messages: int = 1,
        wait: float = 0.0,
        token: threading.Event | None = None,
    ) -> tuple[list[bool], list[Message]]:
        """:meth:`settle`, then :meth:`lease`: in one transaction or round trip where the backend can.

        The settlements are applied before the lease waits for new messages, so
        waiting never delays them. If this raises, the settlements may or may not
        have been applied (their messages come back after ``lease_time`` if not).

        .. versionadded:: 0.2
        """
        settled = self.settle(settlements) if settlements else []
        return settled, self.lease(consumer, max_messages=max_messages, wait=wait, token=token)

    @abc.abstractmethod
    def renew(self, messages: list[Message]) -> int:
        """Extend the leases of ``messages`` by ``lease_time`` from now; return how many were still held."""

    # -- operations ------------------------------------------------------------------

    @abc.abstractmethod
    def stats(self) -> QueueStats:
        """Depth, in-flight and dead-letter counts, and the oldest ready message's age.

        Read-only and cheap (a few indexed queries or one or two round trips), so a
        metrics scrape may call it every few seconds.
        """

    @abc.abstractmethod
    def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        """The oldest ``limit`` dead letters."""

    @abc.abstractmethod
    def requeue_dead(self, ids: Iterable[str] | None = None) -> int:
        """Put dead letters (all, or those in ``ids``) back in the queue with fresh attempts; return how many."""

    def retire(self, consumer: str) -> None:
        """Forget a consumer that stopped for good (after it settled everything). Optional."""
        return  # an optional hook: backends without consumer records have nothing to forget

    def is_outage(self, error: BaseException) -> bool:
        """``True`` if ``error`` means the storage cannot be reached now, not that the call was wrong.

        A server down or restarting, a network cut, a lock held too long. A
        :class:`~hostkit.queues.QueueConsumer` rides out every failed lease with the
        same back-off; an outage is logged as one line per try (its traceback at
        DEBUG), anything else with its traceback. Backends add their own errors to
        the default, :class:`OSError`.

        .. versionadded:: 0.1
        """
        return isinstance(error, OSError)

    @abc.abstractmethod
    def purge(self) -> int:
        """Delete every message of this queue, dead letters included; return how many (tests, tooling)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Close connections (idempotent); the object reconnects if used again."""

    def __enter__(self: _Q) -> _Q:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
